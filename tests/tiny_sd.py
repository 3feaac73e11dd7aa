"""A tiny random Stable Diffusion pipeline folder, built locally (no hub): the base model for the SD script tests.

Same layout as a real SD 1.x folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), so every
script loads it exactly like `stable-diffusion-v1-5`. The VAE has 4 down blocks (latents are 1/8 of the image, as
ControlNet's conditioning embedding expects); the CLIP tokenizer is written from a hand-made byte-level vocabulary
with whole-word tokens for the words tests use (`toy` is one token, as textual inversion's initializer must be).
"""

import json
import os

WORDS = ["a", "photo", "of", "toy", "cat", "dog", "sks", "red", "blue", "circle", "square", "shape", "picture",
         "the", "in", "style", "make", "it", "green", "with", "background", "painting"]


def _byte_characters():
    """CLIP's byte-to-unicode table: 256 printable characters standing for the 256 bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            characters.append(256 + extra)
            extra += 1
    return [chr(code) for code in characters]


def write_tokenizer(folder):
    os.makedirs(folder, exist_ok=True)
    characters = _byte_characters()
    vocab = {}
    for token in characters + [c + "</w>" for c in characters]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as file:
        json.dump(vocab, file)
    with open(os.path.join(folder, "merges.txt"), "w") as file:
        file.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_sd(folder, seed=0):
    """Write the pipeline to `folder` and return the folder."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder, seed=0):
    """A tiny random SDXL base pipeline in `folder` (returned): the layout of stable-diffusion-xl-base-1.0
    (tokenizer/, tokenizer_2/, text_encoder/ a CLIPTextModel, text_encoder_2/ a CLIPTextModelWithProjection, vae/,
    unet/ conditioned on `text_time`, scheduler/ EulerDiscreteScheduler), as small as the SD one."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer_2 = write_tokenizer(os.path.join(folder, "tokenizer_2"))

    def text_config(hidden_size):
        return CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=hidden_size,
            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
            projection_dim=16,
        )

    # Different sizes for the two encoders, so that a mix-up of hidden states and pooled embeddings cannot fit.
    text_encoder = CLIPTextModel(text_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(24))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32 + 24, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        # The pooled embedding of text_encoder_2 next to the 6 time ids, each embedded in time_embed_dim numbers.
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )
    pipeline.save_pretrained(folder)
    return folder


def write_t5_tokenizer(folder):
    """A T5 tokenizer (Unigram over sentencepiece-style pieces, as T5's spiece.model holds) made locally: <pad>=0,
    </s>=1, <unk>=2, "▁word" for every word in WORDS, and every letter and digit both word-initial and inside a word,
    so that any plain prompt tokenizes without <unk>. Appends </s>; model_max_length 512 as T5-XXL's."""
    from transformers import T5TokenizerFast

    characters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + word, -1.0) for word in WORDS]
    vocab += [("▁" + character, -5.0) for character in characters] + [(character, -6.0) for character in characters]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_flux(folder, seed=0):
    """A tiny random FLUX.1-dev pipeline in `folder` (returned): the layout of black-forest-labs/FLUX.1-dev
    (tokenizer/ CLIP, tokenizer_2/ T5, text_encoder/ CLIPTextModel, text_encoder_2/ T5EncoderModel, vae/ with a shift
    factor, transformer/ FluxTransformer2DModel with guidance embeddings, scheduler/ FlowMatchEulerDiscreteScheduler
    with FLUX.1-dev's dynamic shifting), as small as the SD one: latents are 1/8 of the image with 4 channels, packed
    2x2 into 16 transformer channels, so the resolution must be a multiple of 16."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer_2 = write_t5_tokenizer(os.path.join(folder, "tokenizer_2"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        decoder_start_token_id=tokenizer_2.pad_token_id, pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.0609, scaling_factor=1.5035,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 2 * 2, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=True, axes_dims_rope=[4, 4, 8],
    )
    # FLUX.1-dev's scheduler_config.json.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    build = build_tiny_sdxl if "--sdxl" in sys.argv else build_tiny_sd
    folders = [arg for arg in sys.argv[1:] if arg != "--sdxl"]
    print(build(folders[0] if folders else "tiny-sd"))

