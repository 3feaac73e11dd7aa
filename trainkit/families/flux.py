"""FLUX.1: CLIP (pooled) and T5 (sequence) text encoders, a transformer on 2x2-packed latents with position ids and a
guidance embedding, a VAE with a shift factor, trained by flow matching."""

import torch

from trainkit.cli import InputError, require_package
from trainkit.families import loading
from trainkit.families.sd import StableDiffusion


class Flux:
    name = "flux"
    title = "FLUX.1"
    described = "a FLUX.1"
    parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "transformer", "scheduler")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    denoiser_part = "transformer"
    denoiser_name = "transformer"  # in messages
    objective = "flow_matching"
    pipelines = {"dreambooth_lora": "FluxPipeline"}
    pipeline_kwargs = {}
    hub_tag = "flux"
    card_tags = ("template:sd-lora",)  # as upstream's Flux model card
    license = "other"  # FLUX.1 [dev]'s own non-commercial license is "other" on the hub
    # The most T5 prompt tokens FLUX.1 takes (FluxPipeline's limit).
    max_sequence_length = 512
    # Upstream's train_dreambooth_lora_flux.py targets: attention and feed-forward projections of the double-stream
    # blocks and the attention of the single-stream ones.
    lora_targets = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2"]
    peft_lora_names = True  # upstream's Flux script writes peft's lora_A/lora_B key names
    # 2x2 latent pixels (1/8 of the image each) make one transformer token.
    size_multiple, size_reason = 16, "the VAE downsamples by 8, then 2x2 latent pixels make one transformer token"
    size_conditioned = False
    text_encoder_last_layer_unused = False  # CLIP's pooled output and T5's last hidden state
    # The frozen text encoders (T5-XXL alone is 9 GB in bf16) encode the prompts once and leave memory, as upstream.
    encodes_prompts_once = True
    negative_prompt = False  # FLUX.1 [dev] is guidance-distilled: no classifier-free guidance
    saves_in_training_dtype = True  # upstream saves in the training dtype unless --upcast_before_saving
    caches_centre_crops = True  # upstream caches one crop per image, made once; its command lines omit --center_crop
    # As StableDiffusion's (Flux is not its subclass): latents sampled from the VAE's distribution, as upstream; the
    # text encoders get no attention mask (FluxPipeline passes none).
    latents_from_mode = False
    encodes_with_attention_mask = False
    refused_flags = {
        "dreambooth_lora": {
            "--snr_gamma": "Min-SNR weights DDPM noise levels; FLUX.1 trains by flow matching (see --weighting_scheme)",
            "--use_dora": "DoRA is not built for FLUX.1 here (upstream's Flux script has none)",
            "--output_kohya_format": "diffusers reads kohya FLUX.1 LoRA files but has no converter that writes them",
            "--tokenizer_name": "it has two tokenizers, tokenizer/ (CLIP) and tokenizer_2/ (T5)",
            "--tokenizer_max_length": "its CLIP prompts take 77 tokens and T5's length is --max_sequence_length",
            "--text_encoder_use_attention_mask": "FluxPipeline passes its text encoders no attention mask",
            "--class_labels_conditioning": "it is for DeepFloyd IF",
            "--validation_images": "it is for DeepFloyd IF's upscaler",
            "--do_edm_style_training": "EDM-style training is for SDXL (upstream)",
            "--crops_coords_top_left_h": "they go into SDXL's time ids",
            "--crops_coords_top_left_w": "they go into SDXL's time ids",
            "--enable_xformers_memory_efficient_attention": "the Flux transformer has no xformers attention",
            **{flag: "upstream's train_dreambooth_lora_qwen_image.py takes it and never reads it (Qwen-Image models "
                     "only)" for flag in ("--pretrained_tokenizer_4_name_or_path",
                                          "--pretrained_text_encoder_4_name_or_path")},
        },
    }

    def recognises(self, path, index):
        """A Flux* pipeline in model_index.json (not a FLUX.2 one: Flux2*) or, in a local folder, a transformer/
        whose config names FluxTransformer2DModel."""
        name = str(index.get("_class_name", ""))
        if name.startswith("Flux"):
            return not name.startswith("Flux2")
        return loading.read_part_config(path, "transformer").get("_class_name") == "FluxTransformer2DModel"

    def check_folder(self, path, parts=None):
        loading.check_parts(path, self.parts if parts is None else parts, self.described)

    def required_parts(self, args):
        """All of its parts (SD's may lack vae/: DeepFloyd IF)."""
        return self.parts

    def refuse_flags(self, args, task):
        """`refused_flags` (as StableDiffusion.refuse_flags), then FLUX.1's own limits: --max_sequence_length up to
        512 T5 tokens, --enable_npu_flash_attention with torch_npu."""
        StableDiffusion.refuse_flags(self, args, task)
        if getattr(args, "enable_npu_flash_attention", False):
            require_package("torch_npu", "--enable_npu_flash_attention", "it runs on Ascend NPUs with torch_npu")
        length = getattr(args, "max_sequence_length", None)
        if length is not None and length > self.max_sequence_length:
            raise InputError(f"--max_sequence_length {length} is over {self.max_sequence_length}, the most T5 prompt "
                             "tokens FLUX.1 takes (FluxPipeline's limit)")

    def check_crop_flags(self, args):
        """The crop flags are refused (refuse_flags): FLUX.1 has no time ids."""

    def pipeline_class(self, task):
        import diffusers

        return getattr(diffusers, self.pipelines[task])

    def denoiser_class(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def load_dreambooth_models(self, args):
        """(FlowMatchEulerDiscreteScheduler, [CLIP tokenizer, T5 tokenizer] (fast ones, as FluxPipeline's),
        [CLIPTextModel, T5EncoderModel] in the training dtype, vae, FluxTransformer2DModel). Load errors are
        InputErrors naming the part."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        from trainkit import big_models

        noise_scheduler = loading.load_part(args, "scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained)
        tokenizers = [loading.load_part(args, part, AutoTokenizer.from_pretrained) for part in self.tokenizer_parts]
        # Straight in the training dtype (T5-XXL is 19 GB in fp32), as the script runs them.
        text_encoders = [loading.load_part(args, part, model_class.from_pretrained, variant=args.variant,
                                           torch_dtype=big_models.training_dtype(args))
                         for part, model_class in zip(self.text_encoder_parts, (CLIPTextModel, T5EncoderModel))]
        vae = loading.load_vae(args)
        transformer = loading.load_denoiser(args)  # quantized with --bnb_quantization_config_path
        return noise_scheduler, tokenizers, text_encoders, vae, transformer

    def vae_dtype(self, args, weight_dtype):
        """The VAE encodes in the frozen models' dtype."""
        return weight_dtype

    # As SD's: the VAE's latent distribution, its scaling and shift factors, CLIP / T5 ids padded to their lengths.
    latent_dist = StableDiffusion.latent_dist
    latent_scaling = StableDiffusion.latent_scaling
    tokenize_prompt = StableDiffusion.tokenize_prompt
    encode_kwargs = StableDiffusion.encode_kwargs
    pipeline_embeddings = StableDiffusion.pipeline_embeddings

    # --- prompts ---------------------------------------------------------------------------------------------------

    def prompt_lengths(self, args):
        """CLIP's 77 tokens (its model_max_length) and --max_sequence_length T5 tokens, as FluxPipeline pads them."""
        return (None, args.max_sequence_length)

    def prompt_kwargs(self, args):
        """The T5 length trained with, for the pipeline call."""
        return {"max_sequence_length": args.max_sequence_length}

    def text_cache_config(self, args):
        return {"encoding": "flux: T5 last hidden state, CLIP pooled", "max_length_2": args.max_sequence_length}

    def trainable_text_encoders(self, text_encoders):
        """--train_text_encoder adapts CLIP; T5 stays frozen (upstream)."""
        return list(text_encoders[:1])

    def encode_prompt(self, text_encoders, input_ids, prompt_embeds=None):
        """(prompt_embeds, pooled_prompt_embeds), as FluxPipeline.encode_prompt computes them: T5's last hidden state
        and CLIP's pooled output. `prompt_embeds`: T5's states computed once (T5 is frozen while CLIP's LoRA trains);
        T5 (text_encoders[1], then None) does not run."""
        clip, t5 = text_encoders
        pooled = clip(input_ids[0].to(clip.device), output_hidden_states=False).pooler_output
        if prompt_embeds is None:
            prompt_embeds = t5(input_ids[1].to(t5.device), output_hidden_states=False)[0]
        return prompt_embeds, pooled

    # --- the transformer's forward ---------------------------------------------------------------------------------

    def denoise(self, transformer, noisy_latents, timesteps, prompt_embeds, pooled, batch, args, dtype):
        """The velocity predicted for `noisy_latents` ((batch, channels, height, width)) at `timesteps` (the
        scheduler's 0-1000 units), as upstream's train_dreambooth_lora_flux.py runs the transformer: the latents
        packed 2x2 into tokens with their image ids as FluxPipeline packs them, --guidance_scale in the guidance
        embedding (FLUX.1 [dev]; none for a transformer without one), timesteps / 1000; unpacked again."""
        from diffusers import FluxPipeline

        batch_size, channels, height, width = noisy_latents.shape
        device = noisy_latents.device
        packed = FluxPipeline._pack_latents(noisy_latents, batch_size, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        config = getattr(transformer, "module", transformer).config  # through a DDP wrapper
        guidance = torch.full((batch_size,), args.guidance_scale, device=device) if config.guidance_embeds else None
        prediction = transformer(
            hidden_states=packed.to(dtype), timestep=timesteps / 1000, guidance=guidance,
            pooled_projections=pooled.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype), txt_ids=text_ids,
            img_ids=image_ids, return_dict=False)[0]
        # _unpack_latents takes pixel sizes and the VAE's factor; the latent sizes with factor 1 say the same.
        return FluxPipeline._unpack_latents(prediction, height, width, vae_scale_factor=1)


FAMILY = Flux()
