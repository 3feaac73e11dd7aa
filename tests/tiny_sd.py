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


# Qwen-Image

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_TEMPLATE_WORDS = ["system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape",
                       "size", "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and",
                       "background"]


def write_qwen_tokenizer(folder):
    """A byte-level BPE trained here (tokenizers' BpeTrainer) on the words of QwenImagePipeline's prompt template and
    of the tests' prompts, so that each is one token (the template's system prefix is 34 tokens, as with the real
    Qwen2.5-VL tokenizer), plus the chat special tokens; saved as a Qwen2Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = QWEN_TEMPLATE_WORDS + WORDS
    corpus = [" ".join(words), *words, *(" " + word for word in words)]
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus * 2, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in state["merges"]]
    vocab = dict(state["vocab"])
    for special in QWEN_SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_qwen_image(folder, seed=0):
    """A tiny random Qwen-Image pipeline in `folder` (returned): the layout of Qwen/Qwen-Image (tokenizer/ a Qwen2
    tokenizer, text_encoder/ Qwen2_5_VLForConditionalGeneration, vae/ AutoencoderKLQwenImage with per-channel
    latents_mean/latents_std, transformer/ QwenImageTransformer2DModel, scheduler/ FlowMatchEulerDiscreteScheduler
    with dynamic shifting), with diffusers' own pipeline tests' tiny sizes (get_dummy_components) but the real 8x VAE
    (dim_mult of 4 levels) and latent statistics that are not 0/1, so that their use shows: latents are 1/8 of the
    image with 4 channels, packed 2x2 into 16 transformer channels (resolution a multiple of 16)."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(os.path.join(folder, "tokenizer"))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>")},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), vision_token_id=ids("<|vision_pad|>"),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    z_dim = 4
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, -0.1],
                                 latents_std=[0.5, 1.5, 0.8, 1.2])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    build = build_tiny_sdxl if "--sdxl" in sys.argv else build_tiny_sd
    folders = [arg for arg in sys.argv[1:] if arg != "--sdxl"]
    print(build(folders[0] if folders else "tiny-sd"))

