"""FLUX.2 [dev]: a Mistral-3 text encoder (Mistral3ForConditionalGeneration) whose hidden states of a few chosen layers
(--text_encoder_out_layers, stacked per token), after Flux2Pipeline's chat template with its system message, condition
Flux2Transformer2DModel on AutoencoderKLFlux2 latents patchified 2x2 and normalised by the VAE's batch-norm statistics,
with 4-axis position ids and a guidance embedding, trained by flow matching as upstream's
train_dreambooth_lora_flux2.py trains it.

The transformer, VAE, latents, packing, position ids, guidance, LoRA targets and flag checks hold for FLUX.2 [klein]
too (trainkit/families/flux2_klein.py subclasses Flux2); the text-encoder parts are the small methods and attributes
under "text encoder" below."""

import warnings

import torch

from trainkit.cli import InputError, require_package
from trainkit.families import loading
from trainkit.families.sd import StableDiffusion


class Flux2(StableDiffusion):
    name = "flux2"
    title = "FLUX.2 [dev]"
    described = "a FLUX.2 [dev]"
    parts = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
    tokenizer_parts = ("tokenizer",)
    text_encoder_parts = ("text_encoder",)
    denoiser_part = "transformer"
    denoiser_name = "transformer"
    objective = "flow_matching"
    pipelines = {"dreambooth_lora": "Flux2Pipeline"}
    pipeline_kwargs = {}
    hub_tag = "flux2"
    card_tags = ("template:sd-lora",)  # upstream's Flux2 model card
    license = "other"  # FLUX.2 [dev]'s non-commercial license
    # Upstream's train_dreambooth_lora_flux2.py targets: the attention projections of the double-stream blocks (the
    # single-stream ones fuse theirs into to_qkv_mlp_proj; --lora_layers reaches them).
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0"]
    peft_lora_names = True  # upstream writes peft's lora_A/lora_B key names
    # The VAE downsamples by 8, then 2x2 latent pixels are patchified into one transformer token.
    size_multiple, size_reason = 16, "the VAE downsamples by 8, then 2x2 latent pixels make one transformer token"
    size_conditioned = False
    text_encoder_last_layer_unused = False
    # The frozen text encoder (Mistral Small 3.1, 24B) encodes every prompt once and leaves memory, as upstream.
    encodes_prompts_once = True
    negative_prompt = False  # guidance-distilled: upstream validates with the prompt embeddings alone
    saves_in_training_dtype = True  # upstream saves in the training dtype unless --upcast_before_saving
    caches_centre_crops = True  # upstream crops each image once, before training
    # Upstream trains on the VAE distribution's mode (and the pipeline encodes images so), not on a sample of it.
    latents_from_mode = True
    # The tokenizer's attention mask goes to the text encoder (the prompts are padded to --max_sequence_length).
    encodes_with_attention_mask = True

    # --- text encoder (FLUX.2 [klein] overrides these) -------------------------------------------------------------

    @property
    def pipeline_class_name(self):
        """The pipeline class whose encode_prompt, system message and chat template the conditioning follows; the
        class recognised in model_index.json (`pipelines`)."""
        return self.pipelines["dreambooth_lora"]

    # The most prompt tokens the pipeline's text encoding takes (its tokenizer_max_length).
    max_sequence_length = 512
    text_encoder_description = "Mistral-3"  # in messages

    def text_encoder_class(self):
        from transformers import Mistral3ForConditionalGeneration

        return Mistral3ForConditionalGeneration

    def load_text_encoding(self, args):
        """([tokenizer], [text encoder, loaded in the training dtype]): tokenizer/ as the pipeline loads it, by
        AutoProcessor (FLUX.2-dev's PixtralProcessor, whose image processor needs torchvision; a plain tokenizer
        folder loads as its tokenizer), and the Mistral-3 text encoder (upstream loads it in fp32 and casts it to
        the training dtype: the same weights). Load errors are InputErrors naming the part."""
        from transformers import AutoProcessor

        from trainkit import big_models

        tokenizer = loading.load_part(args, "tokenizer", AutoProcessor.from_pretrained)
        text_encoder = loading.load_part(args, "text_encoder", self.text_encoder_class().from_pretrained,
                                         variant=args.variant, torch_dtype=big_models.training_dtype(args))
        return [tokenizer], [text_encoder]

    def text_pipeline(self, tokenizer=None, text_encoder=None):
        """The pipeline holding only the tokenizer and text encoder (upstream's "text encoding pipeline"): its
        encode_prompt and system message are the ones used here."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)(scheduler=None, vae=None, text_encoder=text_encoder,
                                                           tokenizer=tokenizer, transformer=None)

    def chat_messages(self, pipeline, prompts):
        """The conversations the pipeline's chat template renders for `prompts` (its system message, then the
        prompt)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        return format_input(prompts=prompts, system_message=pipeline.system_message)

    def tokenize_prompt(self, tokenizer, prompts, max_length=None):
        """The ids and attention mask of `prompts` in the pipeline's chat template, padded and truncated to
        `max_length` (--max_sequence_length) tokens, as its encode_prompt tokenizes them."""
        pipeline = self.text_pipeline(tokenizer)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return tokenizer.apply_chat_template(
            self.chat_messages(pipeline, prompts), add_generation_prompt=False, tokenize=True, return_dict=True,
            return_tensors="pt", padding="max_length", truncation=True,
            max_length=max_length or self.max_sequence_length)

    def hidden_states(self, text_encoder, input_ids, attention_mask, text_encoder_out_layers):
        """The prompt embeddings of template ids: the text encoder's hidden states of `text_encoder_out_layers`,
        each token's concatenated (the pipeline's _get_mistral_3_small_prompt_embeds after its tokenization)."""
        output = text_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                              use_cache=False)
        out = torch.stack([output.hidden_states[k] for k in text_encoder_out_layers], dim=1)
        out = out.to(dtype=text_encoder.dtype, device=input_ids.device)
        batch_size, num_channels, seq_len, hidden_dim = out.shape
        return out.permute(0, 2, 1, 3).reshape(batch_size, seq_len, num_channels * hidden_dim)

    # --- family ----------------------------------------------------------------------------------------------------

    refused_flags = {
        "dreambooth_lora": {
            "--train_text_encoder": "upstream's FLUX.2 script trains the transformer only (its text encoder stays "
                                    "frozen and encodes each prompt once)",
            "--remote_text_encoder": "it needs Hugging Face's hosted text-encoder service; --cache_text_embeddings "
                                     "encodes every prompt once, keeps the embeddings on disk and trains without "
                                     "the text encoder in memory",
            "--snr_gamma": "Min-SNR weights DDPM noise levels; FLUX.2 trains by flow matching (see "
                           "--weighting_scheme)",
            "--use_dora": "DoRA is not built for FLUX.2 here (upstream's FLUX.2 script has none)",
            "--output_kohya_format": "diffusers has no converter that writes kohya FLUX.2 LoRA files",
            "--tokenizer_name": "its tokenizer must be the one its text encoder and chat template were made with "
                                "(tokenizer/)",
            "--tokenizer_max_length": "its prompt length is --max_sequence_length",
            "--text_encoder_use_attention_mask": "the pipeline always gives its text encoder the attention mask",
            "--pretrained_vae_model_name_or_path": "its VAE is the AutoencoderKLFlux2 in vae/, whose batch-norm "
                                                   "statistics normalise the latents",
            "--class_labels_conditioning": "it is for DeepFloyd IF",
            "--validation_images": "it is for DeepFloyd IF's upscaler",
            "--do_edm_style_training": "EDM-style training is for SDXL (upstream)",
            "--crops_coords_top_left_h": "they go into SDXL's time ids",
            "--crops_coords_top_left_w": "they go into SDXL's time ids",
            "--enable_xformers_memory_efficient_attention": "the FLUX.2 transformer has no xformers attention",
            "--pretrained_tokenizer_4_name_or_path": "it is upstream's Qwen-Image script's flag",
            "--pretrained_text_encoder_4_name_or_path": "it is upstream's Qwen-Image script's flag",
        },
    }
    # Flags only the FLUX.2 families take: given on any other family, families.select refuses them in one line.
    own_flags = {"dreambooth_lora": {
        flag: "it is a flag of upstream's FLUX.2 scripts (FLUX.2 models only)"
        for flag in ("--text_encoder_out_layers", "--remote_text_encoder")}}
    # Upstream's FLUX.2 script takes these and never reads them (its text encoder does not train).
    unused_upstream_flags = ("--text_encoder_lr", "--adam_weight_decay_text_encoder")

    def recognises(self, path, index):
        """The pipeline class in model_index.json or, in a local folder without one, a transformer/ whose config
        names Flux2Transformer2DModel and a text_encoder/ of this family's class."""
        if index.get("_class_name"):
            return index["_class_name"] == self.pipeline_class_name
        if loading.read_part_config(path, "transformer").get("_class_name") != "Flux2Transformer2DModel":
            return False
        architectures = loading.read_part_config(path, "text_encoder").get("architectures") or []
        return self.text_encoder_class().__name__ in architectures

    def required_parts(self, args):
        return self.parts

    def refuse_flags(self, args, task):
        """`refused_flags`; --max_sequence_length up to the pipeline's limit; --text_encoder_out_layers against the
        folder's configs (check_out_layers); --enable_npu_flash_attention needs torch_npu; a warning for the flags
        upstream takes but never reads."""
        StableDiffusion.refuse_flags(self, args, task)
        length = getattr(args, "max_sequence_length", None)
        if length is not None and length > self.max_sequence_length:
            raise InputError(f"--max_sequence_length {length} is over {self.max_sequence_length}, the most prompt "
                             f"tokens {self.title} takes ({self.pipeline_class_name}'s limit)")
        self.check_out_layers(args)
        if getattr(args, "enable_npu_flash_attention", False):
            require_package("torch_npu", "--enable_npu_flash_attention", "it runs on Ascend NPUs with torch_npu")
        for flag in self.unused_upstream_flags:
            if getattr(args, flag.lstrip("-"), None) is not None:
                warnings.warn(f"{flag} is ignored: upstream's {self.title} script takes it but never reads it (the "
                              "text encoder does not train)", stacklevel=1)

    def check_crop_flags(self, args):
        """The crop flags are refused (refuse_flags): FLUX.2 has no time ids."""

    def denoiser_class(self):
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel

    def check_out_layers(self, args):
        """--text_encoder_out_layers, on the folder's configs before any model loads: at least one layer, each one
        of the text encoder's hidden states (hidden_states[0] is the embeddings, [n] layer n's output), and as many
        as the transformer's joint_attention_dim takes side by side. (A hub model whose configs cannot be read is
        checked by its first forward.)"""
        layers = getattr(args, "text_encoder_out_layers", None)
        if layers is None:
            return
        if not layers:
            raise InputError("--text_encoder_out_layers needs at least one layer index")
        path, given = args.pretrained_model_name_or_path, " ".join(map(str, layers))
        encoder = loading.read_part_config(path, "text_encoder")
        encoder = encoder.get("text_config") or encoder  # Mistral-3's text model config is nested
        count = encoder.get("num_hidden_layers")
        if not count:
            return
        for layer in layers:
            if not -(count + 1) <= layer <= count:
                raise InputError(f"--text_encoder_out_layers {given}: layer {layer} is not one of the "
                                 f"{self.text_encoder_description} text encoder's hidden states in {path!r} "
                                 f"(0..{count}: it has {count} layers)")
        hidden = encoder.get("hidden_size")
        joint = loading.read_part_config(path, "transformer").get("joint_attention_dim")
        if hidden and joint and len(layers) * hidden != joint:
            raise InputError(f"--text_encoder_out_layers {given}: {len(layers)} layers, but the {self.title} "
                             f"transformer of {path!r} takes {joint // hidden} ({joint} = {joint // hidden} x the text "
                             f"encoder's {hidden} hidden units)")

    def load_dreambooth_models(self, args):
        """(FlowMatchEulerDiscreteScheduler, [tokenizer], [text encoder] (load_text_encoding), AutoencoderKLFlux2,
        Flux2Transformer2DModel (quantized with --bnb_quantization_config_path)), as upstream loads them. Load
        errors are InputErrors naming the part."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        noise_scheduler = loading.load_part(args, "scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained)
        tokenizers, text_encoders = self.load_text_encoding(args)
        vae = self.load_vae(args)
        transformer = loading.load_denoiser(args)  # quantized with --bnb_quantization_config_path
        return noise_scheduler, tokenizers, text_encoders, vae, transformer

    def text_encoder_classes(self):
        return (self.text_encoder_class(),)

    def load_vae(self, args, **kwargs):
        from diffusers import AutoencoderKLFlux2

        return loading.load_part(args, "vae", AutoencoderKLFlux2.from_pretrained, variant=args.variant, **kwargs)

    # --- images to latents ------------------------------------------------------------------------------------------

    def latent_dist(self, vae, pixels):
        """The distribution of the transformer's latents of `pixels` (batch, 3, height, width), on the VAE's grid
        (batch, channels, height / 8, width / 8): the VAE's latents, patchified 2x2 and normalised by its batch-norm
        statistics ((x - running_mean) / sqrt(running_var + eps), as upstream and Flux2Pipeline._encode_vae_image),
        then unpatchified again, so that the loss mask (on the VAE's grid) and the flow-matching maths apply as
        they are; denoise patchifies them for the transformer. Its mode (latents_from_mode) is exactly the
        pipeline's image latents, unpatchified; its log-variance is the normalised one."""
        from diffusers import Flux2Pipeline
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = vae.encode(pixels).latent_dist
        patchify, unpatchify = Flux2Pipeline._patchify_latents, Flux2Pipeline._unpatchify_latents
        mean = patchify(dist.mean)
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(mean.device, mean.dtype)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(mean.device,
                                                                                                    mean.dtype)
        normalised = unpatchify((mean - bn_mean) / bn_std)
        logvar = unpatchify(patchify(dist.logvar) - 2 * torch.log(bn_std))
        return DiagonalGaussianDistribution(torch.cat([normalised, logvar], dim=1))

    def latent_scaling(self, vae, device):
        """(1, None): latent_dist's latents are the transformer's already (normalised by the batch-norm
        statistics)."""
        return 1.0, None

    # --- prompts ---------------------------------------------------------------------------------------------------

    def prompt_lengths(self, args):
        return (args.max_sequence_length,)

    def encode_kwargs(self, args):
        return {"text_encoder_out_layers": tuple(args.text_encoder_out_layers)}

    def prompt_kwargs(self, args):
        """The prompt length and hidden layers trained with, for the pipeline call."""
        return {"max_sequence_length": args.max_sequence_length,
                "text_encoder_out_layers": tuple(args.text_encoder_out_layers)}

    def text_cache_config(self, args):
        return {"encoding": f"{self.name}: chat template, hidden states of the chosen layers",
                "max_sequence_length": args.max_sequence_length,
                "text_encoder_out_layers": list(args.text_encoder_out_layers)}

    def encode_prompt(self, text_encoders, input_ids, attention_mask=None, text_encoder_out_layers=(10, 20, 30)):
        """(prompt_embeds, None) of chat-template ids and their attention mask (tokenize_prompt), as the pipeline's
        encode_prompt computes them: the hidden states of `text_encoder_out_layers` (hidden_states), then its own
        encode_prompt on those."""
        text_encoder = text_encoders[0]
        ids = input_ids[0].to(text_encoder.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
        prompt_embeds = self.hidden_states(text_encoder, ids, mask, text_encoder_out_layers)
        prompt_embeds, _ = self.text_pipeline(text_encoder=text_encoder).encode_prompt(
            None, device=ids.device, prompt_embeds=prompt_embeds)
        return prompt_embeds, None

    def trainable_text_encoders(self, text_encoders):
        return []  # --train_text_encoder is refused

    # --- the transformer's forward ---------------------------------------------------------------------------------

    def denoise(self, transformer, noisy_latents, timesteps, prompt_embeds, pooled, batch, args, dtype):
        """The velocity predicted for `noisy_latents` ((batch, channels, height, width) on the VAE's grid) at
        `timesteps` (the scheduler's 0-1000 units), as upstream's train_dreambooth_lora_flux2.py runs the
        transformer: patchified 2x2 and packed into tokens with their 4-axis position ids as Flux2Pipeline does it,
        the prompt's text ids (the pipeline's _prepare_text_ids), --guidance_scale in the guidance embedding (none
        for a transformer without one), timesteps / 1000; the image tokens' prediction unpacked by its ids and
        unpatchified again."""
        from diffusers import Flux2KleinPipeline, Flux2Pipeline

        latents = Flux2Pipeline._patchify_latents(noisy_latents)
        latent_ids = Flux2Pipeline._prepare_latent_ids(latents).to(latents.device)
        packed = Flux2Pipeline._pack_latents(latents)
        text_ids = Flux2Pipeline._prepare_text_ids(prompt_embeds).to(latents.device)
        config = getattr(transformer, "module", transformer).config  # through a DDP wrapper
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full([1], args.guidance_scale, device=latents.device).expand(latents.shape[0])
        prediction = transformer(
            hidden_states=packed.to(dtype), timestep=timesteps / 1000, guidance=guidance,
            encoder_hidden_states=prompt_embeds.to(dtype), txt_ids=text_ids, img_ids=latent_ids,
            return_dict=False)[0]
        # Unpacked by its ids with the grid's size given: Flux2Pipeline's own unpacking reads the size back from the
        # ids on the device, a host sync every step; the klein pipeline's takes it (the same scatter otherwise).
        height, width = latents.shape[-2:]
        prediction = Flux2KleinPipeline._unpack_latents_with_ids(prediction[:, :packed.shape[1]], latent_ids,
                                                                 height, width)
        return Flux2Pipeline._unpatchify_latents(prediction)


FAMILY = Flux2()
