"""Stable Diffusion 1.x/2.x: one CLIP tokenizer and text encoder, a UNet conditioned on the encoder's last hidden
state, a VAE, DDPM training (epsilon or v-prediction, from the scheduler)."""

import os

import torch

from trainkit.cli import InputError, first_line
from trainkit.families import loading


class StableDiffusion:
    name = "sd"
    title = "Stable Diffusion"
    described = "a Stable Diffusion"  # "... model", "... pipeline folder"
    parts = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
    tokenizer_parts = ("tokenizer",)
    text_encoder_parts = ("text_encoder",)
    denoiser_part = "unet"
    objective = "ddpm"
    # The diffusers pipeline each task validates with and saves as (by class name).
    pipelines = {
        "text_to_image": "StableDiffusionPipeline",
        "dreambooth_lora": "StableDiffusionPipeline",
        "controlnet": "StableDiffusionControlNetPipeline",
        "instruct_pix2pix": "StableDiffusionInstructPix2PixPipeline",
        "textual_inversion": "StableDiffusionPipeline",
    }
    # Extra pipeline arguments: an SD pipeline folder may hold a safety checker, which training never needs.
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    hub_tag = "stable-diffusion"
    license = "creativeml-openrail-m"

    def recognises(self, path, index):
        """SD is what is left once the more specific families said no; its folder check reports anything else."""
        return True

    def check_folder(self, path, parts=None):
        """The parts the script loads are in the folder (default: all of the family's), before anything loads."""
        loading.check_parts(path, self.parts if parts is None else parts, self.described)

    # --- loading ---------------------------------------------------------------------------------------------------

    def pipeline_class(self, task):
        import diffusers

        return getattr(diffusers, self.pipelines[task])

    def text_encoder_classes(self):
        from transformers import CLIPTextModel

        return (CLIPTextModel,)

    def load_tokenizers(self, args, **kwargs):
        from transformers import CLIPTokenizer

        return [loading.load_part(args, part, CLIPTokenizer.from_pretrained, **kwargs) for part in self.tokenizer_parts]

    def load_text_encoders(self, args, **kwargs):
        """The frozen text encoders (`torch_dtype=` loads them directly in the training dtype)."""
        return [loading.load_part(args, part, model_class.from_pretrained, variant=args.variant, **kwargs)
                for part, model_class in zip(self.text_encoder_parts, self.text_encoder_classes())]

    def load_vae(self, args, **kwargs):
        return loading.load_vae(args, **kwargs)

    def vae_dtype(self, args, weight_dtype):
        """The dtype the VAE encodes in: the frozen models' dtype."""
        return weight_dtype

    def latent_dist(self, vae, pixels):
        """The VAE's latent distribution of `pixels` (batch, 3, height, width), (batch, channels, h, w) latents
        (Qwen-Image's video VAE takes a frame axis)."""
        return vae.encode(pixels).latent_dist

    def latent_scaling(self, vae, device):
        """(scale, shift) such that (latents - shift) * scale are the denoiser's latents: the VAE's scaling_factor and
        shift_factor (FLUX.1's VAE has one, SD's none); Qwen-Image's are per channel."""
        return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)

    def tokenize_prompt(self, tokenizer, prompts, max_length=None):
        """One tokenizer's ids (and attention mask) of `prompts`, padded to `max_length` (default its
        model_max_length) as the pipeline pads them; Qwen-Image's wrap them in its prompt template."""
        return tokenizer(prompts, truncation=True, padding="max_length",
                         max_length=max_length or tokenizer.model_max_length, return_tensors="pt")

    def encode_kwargs(self, args):
        """encode_prompt's arguments from the flags (Qwen-Image: --max_sequence_length); none here."""
        return {}

    # --- prompts ---------------------------------------------------------------------------------------------------

    def tokenize(self, tokenizers, prompts):
        """Token ids of `prompts` (a string or a list) for each tokenizer, padded to its maximum length, as the
        pipeline tokenizes them: a list of (batch, max_length) tensors, one per tokenizer."""
        return [
            tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            for tokenizer in tokenizers
        ]

    def encode_prompt(self, text_encoders, input_ids, attention_mask=None):
        """(encoder_hidden_states, pooled embedding or None) of token ids, one tensor per encoder: SD's is the last
        hidden state of its one encoder and has no pooled embedding. `attention_mask`: passed to the encoder
        (DreamBooth's --text_encoder_use_attention_mask, for DeepFloyd IF's T5)."""
        text_encoder = text_encoders[0]
        return text_encoder(input_ids[0].to(text_encoder.device), attention_mask=attention_mask,
                            return_dict=False)[0], None

    def added_conditions(self, pooled_prompt_embeds, original_sizes, crops_top_left, target_sizes):
        """The UNet's `added_cond_kwargs` (SD's UNet takes none)."""
        return None

    def check_crop_flags(self, args):
        """--crops_coords_top_left_h/_w go into SDXL's time ids only."""
        for name in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
            if getattr(args, name, None) is not None:
                raise InputError(f"--{name} applies to SDXL models only (SDXL's time ids); "
                                 f"{args.pretrained_model_name_or_path!r} is {self.described} model")

    def time_id_crops(self, args, crops_top_left):
        """The crop top-lefts `added_conditions` receives: each sample's real crop (SD has no time ids and refuses
        the crop flags, see check_crop_flags)."""
        return crops_top_left

    # Flags of a task's script that cannot apply to this family: {task: {flag: why}}, refused by `refuse_flags`.
    refused_flags = {
        "dreambooth_lora": {
            **{flag: "it is upstream's train_dreambooth_lora_flux.py's flag (FLUX.1 models only)"
               for flag in ("--guidance_scale", "--enable_npu_flash_attention")},
            **{flag: "it is a flag of upstream's flow-matching scripts (train_dreambooth_lora_flux.py, _sd3.py, "
                     "_qwen_image.py: FLUX.1, SD3/3.5 and Qwen-Image models only)"
               for flag in ("--weighting_scheme", "--max_sequence_length", "--upcast_before_saving")},
            **{flag: "upstream's train_dreambooth_lora_qwen_image.py takes it and never reads it (Qwen-Image models "
                     "only)" for flag in ("--pretrained_tokenizer_4_name_or_path",
                                          "--pretrained_text_encoder_4_name_or_path")},
            "--do_edm_style_training": "upstream trains EDM-style on SDXL models only (train_dreambooth_lora_sdxl.py)",
        },
        "instruct_pix2pix": {
            "--vae_precision": "it applies to SDXL only (SD's VAE runs in the mixed-precision dtype)",
            "--crops_coords_top_left_h": "it applies to SDXL only (SDXL's time ids)",
            "--crops_coords_top_left_w": "it applies to SDXL only (SDXL's time ids)",
        },
    }

    # Flags of a task's script that only this family's upstream script has: {task: {flag: why others refuse it}}.
    own_flags = {}

    def refuse_flags(self, args, task):
        """A flag given that cannot apply to this family in `task` (`refused_flags`, or another family's
        `own_flags`) is refused in one line naming the flag and the model; the families differ in their data only
        (what each one lacks)."""
        from trainkit.families import FAMILIES

        # Flags only some families' upstream scripts have (a family's `own_flags`) are refused by the others.
        mine = getattr(self, "own_flags", {}).get(task, {})
        others = {flag: reason for family in FAMILIES.values()
                  for flag, reason in getattr(family, "own_flags", {}).get(task, {}).items() if flag not in mine}
        for flag, reason in {**others, **self.refused_flags.get(task, {})}.items():
            value = getattr(args, flag.lstrip("-"), None)
            if value is not None and value is not False:
                raise InputError(f"{flag} cannot apply to the {self.title} model "
                                 f"{args.pretrained_model_name_or_path!r}: {reason}")

    # Whether the denoiser is conditioned on each image's original size and crop (SDXL's time ids): the training data
    # then keeps them per sample (SD's UNet is not).
    size_conditioned = False

    # --- instruct_pix2pix ---
    def edit_size_kwargs(self, image):
        """The InstructPix2Pix pipeline call's arguments that make it edit `image` at its own size: none for SD's,
        which always does (and takes no height/width)."""
        return {}

    # --- dreambooth_lora ---
    # Upstream's DreamBooth LoRA targets; add_k_proj/add_v_proj exist only in DeepFloyd IF UNets (ignored elsewhere).
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    # The LoRA file's key names: diffusers' lora.down/lora.up (upstream's SD scripts), not peft's lora_A/lora_B.
    peft_lora_names = False
    denoiser_name = "UNet"  # in messages
    # Training sizes: multiples of this (the VAE downsamples by 8); the reason goes into the message.
    size_multiple, size_reason = 8, "the VAE downsamples by 8"
    # Conditions on hidden states below the encoder's last layer (SDXL): that layer's LoRA then gets no gradient.
    text_encoder_last_layer_unused = False
    # The frozen text encoders encode every prompt once and leave memory (FLUX.1's T5 is 9 GB); SD's stay loaded.
    encodes_prompts_once = False
    # Validation renders with a negative (empty) prompt: classifier-free guidance (FLUX.1 [dev] is guidance-distilled).
    negative_prompt = True
    # Upstream's SD scripts save the final LoRA weights in fp32; its Flux script in the training dtype.
    saves_in_training_dtype = False
    # --cache_latents without --center_crop: refused (a random crop changes every epoch); FLUX.1 caches centre crops.
    caches_centre_crops = False
    # The text encoder is always given the tokenizer's attention mask (Z-Image pads its prompt ids to
    # --max_sequence_length, as its pipeline does); SD's only with --text_encoder_use_attention_mask.
    encodes_with_attention_mask = False
    # Train on the mode of the VAE's latent distribution instead of a sample of it (FLUX.2, as upstream).
    latents_from_mode = False
    card_tags = ()  # the model card's tags beside hub_tag

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def required_parts(self, args):
        """The parts DreamBooth loads from the folder: vae/ is optional (DeepFloyd IF trains in pixel space) and
        --tokenizer_name replaces tokenizer/."""
        return tuple(part for part in self.parts
                     if part != "vae" and not (part == "tokenizer" and getattr(args, "tokenizer_name", None)))

    def prompt_lengths(self, args):
        """Each tokenizer's padded length (None: its model_max_length): --tokenizer_max_length for SD's one."""
        return (getattr(args, "tokenizer_max_length", None),) + (None,) * (len(self.tokenizer_parts) - 1)

    def trainable_text_encoders(self, text_encoders):
        """The text encoders --train_text_encoder adapts: all of them (FLUX.1 keeps T5 frozen)."""
        return list(text_encoders)

    def prompt_kwargs(self, args):
        """The pipeline call's prompt arguments besides the prompt (FLUX.1: its T5 length)."""
        return {}

    def pipeline_embeddings(self, embeddings):
        """Precomputed prompt embeddings ({"prompt_embeds": (1, tokens, features) tensor, ...}) as the pipeline call
        takes them: as they are here (Z-Image's pipeline takes lists of per-prompt tensors)."""
        return embeddings

    def text_cache_config(self, args):
        """What the text-embedding cache keys besides the encoders and token ids (FLUX.1: its encoding)."""
        return {}

    def load_dreambooth_models(self, args):
        """(DDPMScheduler, [tokenizer], [text encoder], vae or None, UNet), as upstream's DreamBooth LoRA loads them:
        --tokenizer_name replaces tokenizer/; the text encoder class is the one its config names (CLIP, or
        DeepFloyd IF's T5, or AltDiffusion's Roberta); a model without vae/ (DeepFloyd IF) trains in pixel space.
        Load errors are InputErrors naming the part."""
        import transformers
        from diffusers import DDPMScheduler

        source, flag = args.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
        noise_scheduler = loading.load_part(args, "scheduler", DDPMScheduler.from_pretrained)
        if args.tokenizer_name is not None:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision,
                                                                       use_fast=False)
            except Exception as error:
                raise InputError(f"--tokenizer_name {args.tokenizer_name!r}: cannot load the tokenizer "
                                 f"({first_line(error)})") from None
        else:
            tokenizer = loading.load_part(args, "tokenizer", transformers.AutoTokenizer.from_pretrained,
                                          use_fast=False)
        config = loading.load_part(args, "text_encoder", transformers.AutoConfig.from_pretrained)
        architecture = (config.architectures or ["CLIPTextModel"])[0]
        if architecture not in ("CLIPTextModel", "RobertaSeriesModelWithTransformation", "T5EncoderModel"):
            raise InputError(f"{flag} {source!r}: text encoder {architecture} is not supported")
        if architecture == "RobertaSeriesModelWithTransformation":
            from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
                RobertaSeriesModelWithTransformation as text_encoder_class,
            )
        else:
            text_encoder_class = getattr(transformers, architecture)
        text_encoder = loading.load_part(args, "text_encoder", text_encoder_class.from_pretrained,
                                         variant=args.variant)
        vae, vae_problem = None, f"{flag} {source!r}: no vae/ for a latent-space UNet"
        if args.pretrained_vae_model_name_or_path is not None:
            vae = self.load_vae(args)
        elif not os.path.isdir(source) or os.path.isdir(os.path.join(source, "vae")):
            try:
                vae = self.load_vae(args)
            except InputError as error:
                if os.path.isdir(source):
                    raise
                vae_problem = str(error)  # perhaps a hub model without a VAE: its UNet decides below
        unet = loading.load_denoiser(args)  # quantized with --bnb_quantization_config_path
        if vae is None and unet.config.in_channels not in (3, 6):  # pixel space: RGB, or RGB + the upscaler's input
            raise InputError(vae_problem)
        if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"{flag} {source!r}: unsupported prediction type "
                             f"{noise_scheduler.config.prediction_type!r}")
        return noise_scheduler, [tokenizer], [text_encoder], vae, unet

    def batch_added_conditions(self, pooled, batch, args, dtype):
        """The UNet's added_cond_kwargs for a training batch, in `dtype`: none for SD; SDXL's pooled embedding and
        time ids from each sample's real size and crop (`time_id_crops`) and the size it trains at (its bucket, or
        the --resolution square)."""
        if not self.size_conditioned:
            return None
        target_size = batch.get("target_size", (args.resolution, args.resolution))
        added = self.added_conditions(pooled.to(dtype), batch["original_size"],
                                      self.time_id_crops(args, batch["crop_top_left"]), target_size)
        return {key: value.to(dtype) for key, value in added.items()}

    def denoise(self, unet, noisy_latents, timesteps, prompt_embeds, pooled, batch, args, dtype):
        """The UNet's prediction for `noisy_latents` at `timesteps` (DDPM's integer steps), run in `dtype`, with the
        batch's added conditions. DeepFloyd IF leftovers: an upscaler UNet takes the noisy image twice (its
        conditioning channels), --class_labels_conditioning timesteps passes the timesteps as class labels, and a
        learned variance in the output is dropped (not trained here, as upstream)."""
        channels = noisy_latents.shape[1]
        if getattr(unet, "module", unet).config.in_channels == channels * 2:  # through a DDP wrapper
            noisy_latents = torch.cat([noisy_latents, noisy_latents], dim=1)
        class_labels = timesteps if getattr(args, "class_labels_conditioning", None) == "timesteps" else None
        prediction = unet(noisy_latents.to(dtype), timesteps, prompt_embeds.to(dtype), class_labels=class_labels,
                          added_cond_kwargs=self.batch_added_conditions(pooled, batch, args, dtype),
                          return_dict=False)[0]
        if prediction.shape[1] == channels * 2:
            prediction, _ = torch.chunk(prediction, 2, dim=1)
        return prediction



FAMILY = StableDiffusion()
