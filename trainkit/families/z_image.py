"""Z-Image: a Qwen3 text encoder whose second-to-last hidden state (after ZImagePipeline's chat template, each prompt
its own length) conditions a single-stream DiT, ZImageTransformer2DModel, on AutoencoderKL latents (scaled and
shifted by the VAE's factors), given as a list of (channels, 1, height, width) latents and a list of per-prompt
states; trained by flow matching as upstream's train_dreambooth_lora_z_image.py trains it (the transformer is given
(1000 - t) / 1000 and predicts the negated velocity, as ZImagePipeline uses it)."""

import warnings

import torch

from trainkit.cli import require_package
from trainkit.families import loading
from trainkit.families.sd import StableDiffusion


def chat_prompts(tokenizer, prompts):
    """`prompts` in the chat template as ZImagePipeline._encode_prompt writes them: one user message each, the
    assistant's turn opened, thinking enabled (no empty think block)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    return [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True) for prompt in prompts]


class ZImage(StableDiffusion):
    name = "z_image"
    title = "Z-Image"
    described = "a Z-Image"
    parts = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
    tokenizer_parts = ("tokenizer",)
    text_encoder_parts = ("text_encoder",)
    denoiser_part = "transformer"
    denoiser_name = "transformer"
    objective = "flow_matching"
    pipelines = {"dreambooth_lora": "ZImagePipeline"}
    pipeline_kwargs = {}
    hub_tag = "z-image"
    license = "apache-2.0"
    card_tags = ("template:sd-lora",)
    # Upstream's train_dreambooth_lora_z_image.py targets: the attention projections of every block.
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0"]
    peft_lora_names = True  # upstream writes peft's lora_A/lora_B key names
    size_multiple, size_reason = 16, "the VAE downsamples by 8, then 2x2 latent pixels make one transformer token"
    size_conditioned = False
    text_encoder_last_layer_unused = False
    # The frozen Qwen3 (4B) encodes every prompt once and leaves memory, as upstream.
    encodes_prompts_once = True
    # ZImagePipeline pads the prompt ids to --max_sequence_length and gives its text encoder the attention mask.
    encodes_with_attention_mask = True
    # Upstream validates at ZImagePipeline's default guidance (5.0): true CFG against the empty prompt.
    negative_prompt = True
    # Upstream trains on the mode of the VAE's latent distribution (cached or not), not a sample of it.
    latents_from_mode = True
    saves_in_training_dtype = True  # upstream saves in the training dtype unless --upcast_before_saving
    caches_centre_crops = True  # upstream crops each image once, before training; its command lines omit --center_crop
    refused_flags = {
        "dreambooth_lora": {
            "--train_text_encoder": "upstream's Z-Image script trains the transformer only (its Qwen3 text encoder "
                                    "stays frozen and encodes each prompt once)",
            "--snr_gamma": "Min-SNR weights DDPM noise levels; Z-Image trains by flow matching (see "
                           "--weighting_scheme)",
            "--use_dora": "DoRA is not built for Z-Image here (upstream's Z-Image script has none)",
            "--output_kohya_format": "diffusers has no converter that writes kohya Z-Image LoRA files",
            "--tokenizer_name": "its Qwen2 tokenizer must be the one its text encoder and chat template were made "
                                "with (tokenizer/)",
            "--tokenizer_max_length": "its prompt length is --max_sequence_length",
            "--text_encoder_use_attention_mask": "ZImagePipeline always gives its text encoder the attention mask",
            "--pretrained_vae_model_name_or_path": "its VAE is the AutoencoderKL in vae/",
            "--class_labels_conditioning": "it is for DeepFloyd IF",
            "--validation_images": "it is for DeepFloyd IF's upscaler",
            "--do_edm_style_training": "EDM-style training is for SDXL (upstream)",
            "--crops_coords_top_left_h": "they go into SDXL's time ids",
            "--crops_coords_top_left_w": "they go into SDXL's time ids",
            "--enable_xformers_memory_efficient_attention": "the Z-Image transformer has no xformers attention",
            "--pretrained_tokenizer_4_name_or_path": "it is upstream's Qwen-Image script's (unread) flag",
            "--pretrained_text_encoder_4_name_or_path": "it is upstream's Qwen-Image script's (unread) flag",
        },
    }

    def recognises(self, path, index):
        """ZImagePipeline in model_index.json or, in a local folder without one, a transformer/ whose config names
        ZImageTransformer2DModel. (The img2img, inpaint, controlnet and omni pipelines take images as input: they are
        not this family.)"""
        if index.get("_class_name"):
            return index["_class_name"] == "ZImagePipeline"
        return loading.read_part_config(path, "transformer").get("_class_name") == "ZImageTransformer2DModel"

    def required_parts(self, args):
        return self.parts

    def refuse_flags(self, args, task):
        """`refused_flags`, --enable_npu_flash_attention with torch_npu, and a warning for --guidance_scale, which
        upstream takes (its README's commands pass 5.0) and never reads."""
        StableDiffusion.refuse_flags(self, args, task)
        if getattr(args, "enable_npu_flash_attention", False):
            require_package("torch_npu", "--enable_npu_flash_attention", "it runs on Ascend NPUs with torch_npu")
        if getattr(args, "guidance_scale", None) is not None:
            warnings.warn("--guidance_scale is ignored on Z-Image: upstream's Z-Image script takes it and never reads "
                          "it (the transformer has no guidance embedding; validation uses ZImagePipeline's default "
                          "classifier-free guidance, 5.0)", stacklevel=1)

    def check_crop_flags(self, args):
        """The crop flags are refused (refuse_flags): Z-Image has no time ids."""

    def denoiser_class(self):
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel

    def load_dreambooth_models(self, args):
        """(FlowMatchEulerDiscreteScheduler as stored, [Qwen2Tokenizer], [Qwen3Model, loaded in the training dtype],
        AutoencoderKL, ZImageTransformer2DModel (quantized with --bnb_quantization_config_path)), as upstream loads
        them. Load errors are InputErrors naming the part."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2Tokenizer, Qwen3Model

        from trainkit import big_models

        noise_scheduler = loading.load_part(args, "scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained)
        tokenizer = loading.load_part(args, "tokenizer", Qwen2Tokenizer.from_pretrained)
        text_encoder = loading.load_part(args, "text_encoder", Qwen3Model.from_pretrained, variant=args.variant,
                                         torch_dtype=big_models.training_dtype(args))
        vae = self.load_vae(args)
        transformer = loading.load_denoiser(args)  # quantized with --bnb_quantization_config_path
        return noise_scheduler, [tokenizer], [text_encoder], vae, transformer

    # --- prompts ---------------------------------------------------------------------------------------------------

    def tokenize_prompt(self, tokenizer, prompts, max_length=None):
        """The ids and attention mask of `prompts` as ZImagePipeline._encode_prompt tokenizes them: in the chat
        template (chat_prompts), padded and truncated to `max_length` (--max_sequence_length) tokens."""
        return tokenizer(chat_prompts(tokenizer, prompts), padding="max_length", max_length=max_length,
                         truncation=True, return_tensors="pt")

    def prompt_lengths(self, args):
        return (args.max_sequence_length,)

    def prompt_kwargs(self, args):
        """The prompt length trained with, for the pipeline call."""
        return {"max_sequence_length": args.max_sequence_length}

    def text_cache_config(self, args):
        return {"encoding": "z_image: chat template (thinking), hidden_states[-2], each prompt's real tokens",
                "max_sequence_length": args.max_sequence_length}

    def encode_prompt(self, text_encoders, input_ids, attention_mask=None):
        """The prompt embeddings of template token ids (tokenize_prompt), as ZImagePipeline.encode_prompt computes
        them: the text encoder's second-to-last hidden state under the attention mask, each prompt's real tokens
        only, so a list of (tokens, features) tensors of each prompt's own length; and None (no pooled embedding).
        Prompts of different lengths are padded by the batch collation (prompt_embeds_mask, used by denoise)."""
        text_encoder = text_encoders[0]
        ids = input_ids[0].to(text_encoder.device)
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)).bool()
        hidden_states = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [states[row_mask] for states, row_mask in zip(hidden_states, mask)], None

    def pipeline_embeddings(self, embeddings):
        """ZImagePipeline takes prompt_embeds and negative_prompt_embeds as lists of per-prompt tensors."""
        return {key: list(value.unbind(0)) for key, value in embeddings.items()}

    def trainable_text_encoders(self, text_encoders):
        return []  # --train_text_encoder is refused

    # --- the transformer's forward ---------------------------------------------------------------------------------

    def denoise(self, transformer, noisy_latents, timesteps, prompt_embeds, pooled, batch, args, dtype):
        """The velocity predicted for `noisy_latents` ((batch, channels, height, width)) at `timesteps` (the
        scheduler's 0-1000 units), as ZImagePipeline runs the transformer and upstream's script trains it: a list of
        (channels, 1, height, width) latents, the time (1000 - t) / 1000, a list of each sample's prompt states (its
        real tokens: the batch's prompt_embeds_mask marks them where prompts of different lengths were padded to one),
        and the transformer's output negated (the pipeline steps its scheduler with -output)."""
        mask = batch.get("prompt_embeds_mask")
        captions = list(prompt_embeds.to(dtype).unbind(0))
        if mask is not None:
            captions = [states[row_mask.bool()] for states, row_mask in zip(captions, mask)]
        latents = list(noisy_latents.to(dtype).unsqueeze(2).unbind(0))
        prediction = transformer(latents, (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack(prediction).squeeze(2)


FAMILY = ZImage()
