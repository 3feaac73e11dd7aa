"""Stable Diffusion 3 / 3.5: two CLIP text encoders (CLIPTextModelWithProjection: their penultimate hidden states,
concatenated and padded to T5's width, then T5's last hidden state appended; both pooled embeddings concatenated) and
an MMDiT, SD3Transformer2DModel (SD3.5's with qk_norm and dual-attention blocks too), on the latents of a VAE with a
shift factor, trained by flow matching as upstream's train_dreambooth_lora_sd3.py trains it (optionally on the
EDM-style preconditioned output, --precondition_outputs)."""

import torch

from trainkit.cli import InputError
from trainkit.families import loading
from trainkit.families.sd import StableDiffusion


class StableDiffusion3(StableDiffusion):
    name = "sd3"
    title = "SD3/3.5"
    described = "a Stable Diffusion 3"
    parts = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3", "vae",
             "transformer", "scheduler")
    tokenizer_parts = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoder_parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    denoiser_part = "transformer"
    denoiser_name = "transformer"
    objective = "flow_matching"
    pipelines = {"dreambooth_lora": "StableDiffusion3Pipeline"}
    pipeline_kwargs = {}
    hub_tag = "sd3"
    card_tags = ("template:sd-lora",)  # as upstream's SD3 model card
    license = "openrail++"  # upstream's SD3 model card's (its text links the model's own license)
    # The most T5 prompt tokens StableDiffusion3Pipeline takes (its check_inputs).
    max_sequence_length = 512
    # Upstream's train_dreambooth_lora_sd3.py targets (--lora_layers' default): the joint attention's projections of
    # both streams in every block.
    lora_targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v"]
    peft_lora_names = True  # upstream writes peft's lora_A/lora_B key names
    size_multiple, size_reason = 16, "the VAE downsamples by 8, then the transformer takes 2x2 latent patches"
    size_conditioned = False
    # Both CLIPs' pooled embeddings (from their last layer) condition the transformer: every LoRA layer gets gradients.
    text_encoder_last_layer_unused = False
    # The frozen text encoders (T5-XXL alone is 9 GB in bf16) encode every prompt once and leave memory, as upstream.
    encodes_prompts_once = True
    negative_prompt = True  # SD3 samples with classifier-free guidance
    saves_in_training_dtype = True  # upstream saves in the training dtype unless --upcast_before_saving
    caches_centre_crops = True  # upstream crops each image once, before training; its tests cache without --center_crop
    refused_flags = {
        "dreambooth_lora": {
            "--snr_gamma": "Min-SNR weights DDPM noise levels; SD3 trains by flow matching (see --weighting_scheme)",
            "--use_dora": "DoRA is not built for SD3 here (upstream's SD3 script has none)",
            "--output_kohya_format": "diffusers reads kohya SD3 LoRA files but has no converter that writes them",
            "--tokenizer_name": "it has three tokenizers, tokenizer/ and tokenizer_2/ (CLIP), tokenizer_3/ (T5)",
            "--tokenizer_max_length": "its CLIP prompts take 77 tokens and T5's length is --max_sequence_length",
            "--text_encoder_use_attention_mask": "StableDiffusion3Pipeline passes its text encoders no attention mask",
            "--pretrained_vae_model_name_or_path": "upstream's SD3 script uses the model's own VAE (vae/)",
            "--guidance_scale": "the SD3 transformer has no guidance embedding",
            "--class_labels_conditioning": "it is for DeepFloyd IF",
            "--validation_images": "it is for DeepFloyd IF's upscaler",
            "--do_edm_style_training": "EDM-style training is for SDXL (upstream); SD3's is --precondition_outputs",
            "--crops_coords_top_left_h": "they go into SDXL's time ids",
            "--crops_coords_top_left_w": "they go into SDXL's time ids",
            "--enable_xformers_memory_efficient_attention": "the SD3 transformer has no xformers attention",
            "--enable_npu_flash_attention": "it is upstream's Flux script's flag",
            **{flag: "upstream's train_dreambooth_lora_qwen_image.py takes it and never reads it (Qwen-Image models "
                     "only)" for flag in ("--pretrained_tokenizer_4_name_or_path",
                                          "--pretrained_text_encoder_4_name_or_path")},
        },
    }
    # Flags only upstream's SD3 script has: the other families refuse them (StableDiffusion.refuse_flags).
    own_flags = {
        "dreambooth_lora": {
            "--precondition_outputs": "it is upstream's train_dreambooth_lora_sd3.py's flag (SD3/3.5 models only)",
            "--lora_blocks": "it is upstream's train_dreambooth_lora_sd3.py's flag (SD3/3.5 models only)",
        },
    }

    def recognises(self, path, index):
        """StableDiffusion3Pipeline in model_index.json or, in a local folder without one, a transformer/ whose config
        names SD3Transformer2DModel. (The img2img, inpaint and ControlNet pipelines take images as input: they are
        not this family.)"""
        if index.get("_class_name"):
            return index["_class_name"] == "StableDiffusion3Pipeline"
        return loading.read_part_config(path, "transformer").get("_class_name") == "SD3Transformer2DModel"

    def required_parts(self, args):
        return self.parts

    def refuse_flags(self, args, task):
        """`refused_flags`, and --max_sequence_length up to the pipeline's 512 T5 tokens."""
        StableDiffusion.refuse_flags(self, args, task)
        length = getattr(args, "max_sequence_length", None)
        if length is not None and length > self.max_sequence_length:
            raise InputError(f"--max_sequence_length {length} is over {self.max_sequence_length}, the most T5 prompt "
                             "tokens SD3 takes (StableDiffusion3Pipeline's limit)")

    def check_crop_flags(self, args):
        """The crop flags are refused (refuse_flags): SD3 has no time ids."""

    def denoiser_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def text_encoder_classes(self):
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        return (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)

    def load_tokenizers(self, args, **kwargs):
        from transformers import AutoTokenizer

        return [loading.load_part(args, part, AutoTokenizer.from_pretrained, **kwargs) for part in self.tokenizer_parts]

    def load_dreambooth_models(self, args):
        """(FlowMatchEulerDiscreteScheduler, [CLIP tokenizer x2, T5 tokenizer], [CLIPTextModelWithProjection x2,
        T5EncoderModel, in the training dtype], vae, SD3Transformer2DModel (quantized with
        --bnb_quantization_config_path)). Load errors are InputErrors naming the part."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from trainkit import big_models

        noise_scheduler = loading.load_part(args, "scheduler", FlowMatchEulerDiscreteScheduler.from_pretrained)
        # The text encoders load straight in the training dtype (T5-XXL is 19 GB in fp32), as the script runs them.
        text_encoders = self.load_text_encoders(args, torch_dtype=big_models.training_dtype(args))
        return (noise_scheduler, self.load_tokenizers(args), text_encoders, loading.load_vae(args),
                loading.load_denoiser(args))

    def vae_dtype(self, args, weight_dtype):
        """Upstream's SD3 script keeps the VAE in fp32."""
        return torch.float32

    # --- prompts ---------------------------------------------------------------------------------------------------

    def prompt_lengths(self, args):
        """CLIP's 77 tokens (their model_max_length) and --max_sequence_length T5 tokens, as the pipeline pads them."""
        return (None, None, args.max_sequence_length)

    def prompt_kwargs(self, args):
        """The T5 length trained with, for the pipeline call."""
        return {"max_sequence_length": args.max_sequence_length}

    def text_cache_config(self, args):
        return {"encoding": "sd3: CLIP penultimate states padded to T5's width, T5 states; CLIP pooled",
                "max_length_3": args.max_sequence_length}

    def trainable_text_encoders(self, text_encoders):
        """--train_text_encoder adapts both CLIP encoders; T5 stays frozen (upstream)."""
        return list(text_encoders[:2])

    def encode_prompt(self, text_encoders, input_ids, prompt_embeds=None):
        """(prompt_embeds, pooled_prompt_embeds), as StableDiffusion3Pipeline.encode_prompt computes them (clip_skip
        None): both CLIPs' penultimate hidden states concatenated on the last axis and zero-padded to T5's width,
        followed (on the token axis) by T5's last hidden state; both CLIPs' pooled, projected embeddings
        concatenated. `prompt_embeds`: the whole prompt embeddings computed once (T5 is frozen while the CLIP LoRA
        trains): their T5 positions are used and T5 (text_encoders[2], then None) does not run."""
        states, pooled = [], []
        dtype = getattr(text_encoders[0], "module", text_encoders[0]).dtype  # through a DDP wrapper
        for text_encoder, ids in zip(text_encoders[:2], input_ids[:2]):
            output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
            pooled.append(output[0])
            states.append(output.hidden_states[-2].to(dtype=dtype))
        clip_states = torch.cat(states, dim=-1)
        if prompt_embeds is None:
            t5 = text_encoders[2]
            t5_states = t5(input_ids[2].to(t5.device))[0].to(dtype=t5.dtype)
        else:
            t5_states = prompt_embeds[:, input_ids[0].shape[1]:].to(clip_states.device)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return torch.cat([clip_states, t5_states], dim=-2), torch.cat(pooled, dim=-1)

    # --- LoRA targets ------------------------------------------------------------------------------------------------

    def lora_block_targets(self, args, targets):
        """Upstream's --lora_blocks ("12,30"): the target modules (--lora_layers or the default ones) inside those
        transformer blocks only, as `transformer_blocks.N.<module>`. Each index must name one of the transformer's
        blocks (its config's num_layers, where the config can be read)."""
        try:
            blocks = [int(block) for block in args.lora_blocks.split(",") if block.strip()]
        except ValueError:
            raise InputError(f"--lora_blocks {args.lora_blocks!r}: expected comma-separated transformer block "
                             "numbers, e.g. '12,30'") from None
        if not blocks:
            raise InputError("--lora_blocks names no block (expected comma-separated block numbers, e.g. '12,30')")
        try:
            count = self.denoiser_class().load_config(args.pretrained_model_name_or_path, subfolder="transformer",
                                                      revision=args.revision)["num_layers"]
        except Exception:  # a hub id offline: peft reports a block that does not exist when the adapters are added
            count = None
        for block in blocks:
            if block < 0 or (count is not None and block >= count):
                raise InputError(f"--lora_blocks: block {block} is not one of the transformer's blocks 0-"
                                 f"{count - 1 if count else '?'} ({args.pretrained_model_name_or_path!r})")
        return [f"transformer_blocks.{block}.{module}" for block in blocks for module in targets]

    # --- the transformer's forward ---------------------------------------------------------------------------------

    def denoise(self, transformer, noisy_latents, timesteps, prompt_embeds, pooled, batch, args, dtype):
        """The velocity predicted for `noisy_latents` ((batch, channels, height, width); the transformer patches them
        itself) at `timesteps` in the scheduler's 0-1000 units, as StableDiffusion3Pipeline and upstream's script
        call it."""
        return transformer(hidden_states=noisy_latents.to(dtype), timestep=timesteps,
                           encoder_hidden_states=prompt_embeds.to(dtype), pooled_projections=pooled.to(dtype),
                           return_dict=False)[0]


FAMILY = StableDiffusion3()
