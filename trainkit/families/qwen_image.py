"""Qwen-Image: a Qwen2.5-VL text encoder whose last hidden state (after QwenImagePipeline's prompt template, the
template's tokens dropped) conditions an MMDiT, QwenImageTransformer2DModel, on packed 2x2 latent patches of
AutoencoderKLQwenImage (a video VAE: one frame; latents normalised by its per-channel latents_mean / latents_std),
trained by flow matching as upstream's train_dreambooth_lora_qwen_image.py trains it."""

import warnings

import torch

from trainkit.cli import InputError
from trainkit.families import loading
from trainkit.families.sd import StableDiffusion


def text_pipeline(tokenizer=None, text_encoder=None):
    """A QwenImagePipeline holding only the tokenizer and text encoder (upstream's "text encoding pipeline"): its
    prompt template, the number of template tokens it drops and its encode_prompt are the ones used here."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=None)


class QwenImage(StableDiffusion):
    name = "qwen_image"
    title = "Qwen-Image"
    described = "a Qwen-Image"
    parts = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
    tokenizer_parts = ("tokenizer",)
    text_encoder_parts = ("text_encoder",)
    denoiser_part = "transformer"
    denoiser_name = "transformer"
    objective = "flow_matching"
    pipelines = {"dreambooth_lora": "QwenImagePipeline"}
    pipeline_kwargs = {}
    hub_tag = "qwen-image"
    license = "apache-2.0"
    card_tags = ("template:sd-lora",)
    # The most prompt tokens QwenImagePipeline takes (its check_inputs).
    max_sequence_length = 1024
    # Upstream's train_dreambooth_lora_qwen_image.py targets: the attention projections of every block.
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0"]
    peft_lora_names = True  # upstream writes peft's lora_A/lora_B key names
    size_multiple, size_reason = 16, "the VAE downsamples by 8, then 2x2 latent pixels make one transformer token"
    size_conditioned = False
    text_encoder_last_layer_unused = False
    # The frozen Qwen2.5-VL (7B) encodes every prompt once and leaves memory, as upstream.
    encodes_prompts_once = True
    # Upstream validates with the prompt embeddings alone: no negative prompt, so no true CFG.
    negative_prompt = False
    saves_in_training_dtype = True  # upstream saves in the training dtype unless --upcast_before_saving
    caches_centre_crops = True  # upstream crops each image once, before training; its command lines omit --center_crop
    refused_flags = {
        "dreambooth_lora": {
            "--train_text_encoder": "upstream's Qwen-Image script trains the transformer only (its Qwen2.5-VL text "
                                    "encoder stays frozen and encodes each prompt once)",
            "--snr_gamma": "Min-SNR weights DDPM noise levels; Qwen-Image trains by flow matching (see "
                           "--weighting_scheme)",
            "--use_dora": "DoRA is not built for Qwen-Image here (upstream's Qwen-Image script has none)",
            "--output_kohya_format": "diffusers reads kohya Qwen-Image LoRA files but has no converter that writes "
                                     "them",
            "--tokenizer_name": "its Qwen2 tokenizer must be the one its text encoder and prompt template were made "
                                "with (tokenizer/)",
            "--tokenizer_max_length": "its prompt length is --max_sequence_length",
            "--text_encoder_use_attention_mask": "QwenImagePipeline always gives its text encoder the attention mask",
            "--pretrained_vae_model_name_or_path": "its VAE is the AutoencoderKLQwenImage in vae/",
            "--guidance_scale": "the Qwen-Image transformer has no guidance embedding",
            "--class_labels_conditioning": "it is for DeepFloyd IF",
            "--validation_images": "it is for DeepFloyd IF's upscaler",
            "--do_edm_style_training": "EDM-style training is for SDXL (upstream)",
            "--crops_coords_top_left_h": "they go into SDXL's time ids",
            "--crops_coords_top_left_w": "they go into SDXL's time ids",
            "--enable_xformers_memory_efficient_attention": "the Qwen-Image transformer has no xformers attention",
            "--enable_npu_flash_attention": "it is upstream's Flux script's flag",
        },
    }
    # Upstream's Qwen-Image script takes these (left over from its HiDream origin) and never reads them.
    unused_upstream_flags = ("--pretrained_tokenizer_4_name_or_path", "--pretrained_text_encoder_4_name_or_path")

    def recognises(self, path, index):
        """QwenImagePipeline in model_index.json or, in a local folder without one, a transformer/ whose config names
        QwenImageTransformer2DModel. (The edit and layered pipelines share the transformer class but take images as
        input: they are not this family.)"""
        if index.get("_class_name"):
            return index["_class_name"] == "QwenImagePipeline"
        return loading.read_part_config(path, "transformer").get("_class_name") == "QwenImageTransformer2DModel"

    def required_parts(self, args):
        return self.parts

    def refuse_flags(self, args, task):
        """`refused_flags`, --max_sequence_length up to QwenImagePipeline's 1024, and a warning for the two flags
        upstream takes but never reads."""
        StableDiffusion.refuse_flags(self, args, task)
        length = getattr(args, "max_sequence_length", None)
        if length is not None and length > self.max_sequence_length:
            raise InputError(f"--max_sequence_length {length} is over {self.max_sequence_length}, the most prompt "
                             "tokens Qwen-Image takes (QwenImagePipeline's limit)")
        for flag in self.unused_upstream_flags:
            if getattr(args, flag.lstrip("-"), None) is not None:
                warnings.warn(f"{flag} is ignored: upstream's Qwen-Image script takes it but never reads it; the text "
                              "encoder and tokenizer are the model's own", stacklevel=1)

    def check_crop_flags(self, args):
        """The crop flags are refused (refuse_flags): Qwen-Image has no time ids."""

    def denoiser_class(self):
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel

    def load_dreambooth_models(self, args):
        """(FlowMatchEulerDiscreteScheduler with upstream's shift=3.0, [Qwen2Tokenizer],
        [Qwen2_5_VLForConditionalGeneration, loaded in the training dtype], AutoencoderKLQwenImage,
        QwenImageTransformer2DModel (quantized with --bnb_quantization_config_path)). Load errors are InputErrors
        naming the part."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        from trainkit import big_models

        noise_scheduler = loading.load_part(args, "scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained,
                                            shift=3.0)
        tokenizer = loading.load_part(args, "tokenizer", Qwen2Tokenizer.from_pretrained)
        text_encoder = loading.load_part(args, "text_encoder", Qwen2_5_VLForConditionalGeneration.from_pretrained,
                                         torch_dtype=big_models.training_dtype(args))
        vae = loading.load_part(args, "vae", AutoencoderKLQwenImage.from_pretrained, variant=args.variant)
        transformer = loading.load_denoiser(args)  # quantized with --bnb_quantization_config_path
        return noise_scheduler, [tokenizer], [text_encoder], vae, transformer

    def load_vae(self, args, **kwargs):
        from diffusers import AutoencoderKLQwenImage

        return loading.load_part(args, "vae", AutoencoderKLQwenImage.from_pretrained, variant=args.variant, **kwargs)

    # --- images to latents ------------------------------------------------------------------------------------------

    def latent_dist(self, vae, pixels):
        """The latent distribution of `pixels` (batch, 3, height, width): the video VAE encodes them as one frame;
        the distribution is the frame's (batch, channels, height / 8, width / 8)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(vae.encode(pixels.unsqueeze(2)).latent_dist.parameters.squeeze(2))

    def latent_scaling(self, vae, device):
        """(scale, shift) per channel, so that (latents - shift) * scale are the transformer's latents: upstream's
        (latents - latents_mean) * (1 / latents_std), the inverse of QwenImagePipeline's decoding."""
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1).to(device)
        scale = 1.0 / torch.tensor(vae.config.latents_std).view(1, channels, 1, 1).to(device)
        return scale, mean

    # --- prompts ---------------------------------------------------------------------------------------------------

    def tokenize_prompt(self, tokenizer, prompts, max_length=None):
        """The ids of `prompts` in QwenImagePipeline's template, as its encode_prompt tokenizes them (up to its
        tokenizer_max_length prompt tokens after the template's, padded to the longest only): --max_sequence_length
        applies to the encoded states (encode_prompt), as in the pipeline."""
        pipeline = text_pipeline(tokenizer)
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return tokenizer([pipeline.prompt_template_encode.format(prompt) for prompt in prompts],
                         max_length=pipeline.tokenizer_max_length + pipeline.prompt_template_encode_start_idx,
                         padding=True, truncation=True, return_tensors="pt")

    def prompt_lengths(self, args):
        return (None,)

    def encode_kwargs(self, args):
        return {"max_sequence_length": args.max_sequence_length}

    def prompt_kwargs(self, args):
        """The prompt length trained with, for the pipeline call."""
        return {"max_sequence_length": args.max_sequence_length}

    def text_cache_config(self, args):
        return {"encoding": "qwen_image: template, last hidden state, template tokens dropped",
                "max_sequence_length": args.max_sequence_length}

    def encode_prompt(self, text_encoders, input_ids, attention_mask=None, max_sequence_length=512):
        """(prompt_embeds, None) of template token ids (tokenize_prompt; rows of one length: a single prompt, or
        prompts as long as one another), as QwenImagePipeline.encode_prompt computes them: the text encoder's last
        hidden state under the attention mask, each row's real tokens (the pipeline's _extract_masked_hidden) past
        the template's, then the pipeline's own encode_prompt cuts them to `max_sequence_length`. Its mask is None
        when no position is padding, as here: prompts of different lengths are padded by the batch collation
        (prompt_embeds_mask, used by denoise)."""
        text_encoder = text_encoders[0]
        ids = input_ids[0].to(text_encoder.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
        pipeline = text_pipeline(text_encoder=text_encoder)
        hidden_states = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        rows = [row[pipeline.prompt_template_encode_start_idx:]
                for row in pipeline._extract_masked_hidden(hidden_states, mask)]
        if len({row.shape[0] for row in rows}) > 1:
            raise ValueError("encode_prompt takes prompts of one length at a time")
        prompt_embeds = torch.stack(rows).to(dtype=text_encoder.dtype)
        prompt_embeds, prompt_mask = pipeline.encode_prompt(
            None, device=ids.device, prompt_embeds=prompt_embeds,
            prompt_embeds_mask=torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=ids.device),
            max_sequence_length=max_sequence_length)
        return prompt_embeds, prompt_mask

    def trainable_text_encoders(self, text_encoders):
        return []  # --train_text_encoder is refused

    # --- the transformer's forward ---------------------------------------------------------------------------------

    def denoise(self, transformer, noisy_latents, timesteps, prompt_embeds, pooled, batch, args, dtype):
        """The velocity predicted for `noisy_latents` ((batch, channels, height, width), one frame) at `timesteps`
        (the scheduler's 0-1000 units), as upstream's train_dreambooth_lora_qwen_image.py runs the transformer:
        latents packed 2x2 into tokens as QwenImagePipeline packs them, `img_shapes` per sample from the batch's own
        latent size (aspect-ratio buckets), the prompt states with the batch's prompt_embeds_mask (set when prompts
        of different lengths were padded to one: the text lengths per sample; None when none was, as the
        pipeline passes it), timesteps / 1000; unpacked again."""
        from diffusers import QwenImagePipeline

        batch_size, channels, height, width = noisy_latents.shape
        packed = QwenImagePipeline._pack_latents(noisy_latents, batch_size, channels, height, width)
        img_shapes = [[(1, height // 2, width // 2)]] * batch_size
        prediction = transformer(
            hidden_states=packed.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
            encoder_hidden_states_mask=batch.get("prompt_embeds_mask"), timestep=timesteps / 1000,
            img_shapes=img_shapes, return_dict=False)[0]
        # _unpack_latents takes pixel sizes and the VAE's factor; the latent sizes with factor 1 say the same.
        return QwenImagePipeline._unpack_latents(prediction, height, width, vae_scale_factor=1).squeeze(2)


FAMILY = QwenImage()
