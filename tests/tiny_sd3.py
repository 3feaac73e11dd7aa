"""A tiny random Stable Diffusion 3 / 3.5 pipeline folder, built locally (no hub): the base model of the SD3 tests.

The layout of stabilityai/stable-diffusion-3-medium-diffusers (model_index.json naming StableDiffusion3Pipeline,
tokenizer/ and tokenizer_2/ CLIP, tokenizer_3/ T5, text_encoder/ and text_encoder_2/ CLIPTextModelWithProjection,
text_encoder_3/ T5EncoderModel, vae/ AutoencoderKL with a shift factor, transformer/ SD3Transformer2DModel,
scheduler/ FlowMatchEulerDiscreteScheduler with SD3's shift 3.0), with diffusers' pipeline tests' tiny sizes
(test_pipeline_stable_diffusion_3.py's get_dummy_components) but:
- two CLIP encoders of DIFFERENT widths (16 and 24), neither SD3's 768 / 1280, so that a checkpoint that told them
  apart by width (upstream's save hook) would hold no text-encoder LoRA; their states (16 + 24) are padded to T5's
  width (48), as in the real model (768 + 1280 padded to 4096);
- the real 8x VAE (4 levels) and the real 2x2 patches, so the resolution is a multiple of 16 as SD3's;
- two transformer blocks, so --lora_blocks picks one; `sd35=True` gives SD3.5's transformer (qk_norm "rms_norm" and
  the dual-attention block 0).
"""

import os

from tiny_sd import write_t5_tokenizer, write_tokenizer

CLIP_WIDTHS = (16, 24)
T5_WIDTH = 48
PROJECTION = 16


def build_tiny_sd3(folder, seed=0, sd35=False):
    """Write the tiny pipeline into `folder` and return `folder`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer_2 = write_tokenizer(os.path.join(folder, "tokenizer_2"))
    tokenizer_3 = write_t5_tokenizer(os.path.join(folder, "tokenizer_3"))

    def clip(width):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77, projection_dim=PROJECTION,
            hidden_act="gelu",
        ))

    text_encoder, text_encoder_2 = clip(CLIP_WIDTHS[0]), clip(CLIP_WIDTHS[1])
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        decoder_start_token_id=tokenizer_3.pad_token_id, pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.0609, scaling_factor=1.5305,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=2 * PROJECTION,
        out_channels=4, pos_embed_max_size=16, **extra,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3 medium's config
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(folder)
    return folder
