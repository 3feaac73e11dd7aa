"""A tiny random Z-Image pipeline folder, built locally (no hub): the base model of the Z-Image tests and bench row.

The layout of Tongyi-MAI/Z-Image (model_index.json naming ZImagePipeline; tokenizer/ a Qwen2 tokenizer with a
Qwen3-style chat template, text_encoder/ Qwen3Model, vae/ AutoencoderKL with Z-Image's scaling and shift factors,
transformer/ ZImageTransformer2DModel, scheduler/ FlowMatchEulerDiscreteScheduler with shift 3), at the sizes of
diffusers' own Z-Image pipeline tests (get_dummy_components) but with the real 8x VAE (4 levels): latents are 1/8 of
the image with 16 channels, patched 2x2 into transformer tokens (resolution a multiple of 16)."""

import os

from tiny_sd import write_qwen_tokenizer

# Qwen3's chat template for what ZImagePipeline asks of it (one user message, the generation prompt, thinking on or
# off): with enable_thinking false the assistant turn opens with an empty think block, with it true (the pipeline's
# choice) it does not. Written here; the real tokenizer's template says the same for these messages.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


def build_tiny_z_image(folder, seed=0, dim=32, heads=2, layers=2, text_dim=16, text_layers=3,
                       vae_channels=(8, 16, 16, 16)):
    """A tiny random Z-Image pipeline in `folder` (returned). `dim` / `heads` / `layers`: the transformer's width,
    heads and depth, `text_dim` / `text_layers` the Qwen3 encoder's, `vae_channels` the VAE's 4 levels (bench/bench.py
    builds a larger one). The encoder has 3 layers so that its second-to-last hidden state (the one Z-Image
    conditions on) is neither the embeddings nor the last."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(hidden_size=text_dim, intermediate_size=text_dim, num_hidden_layers=text_layers,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=max(8, text_dim // 2),
                         vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"))
    text_encoder = Qwen3Model(config).eval()
    head_dim = dim // heads
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=layers, n_refiner_layers=1,
        n_heads=heads, n_kv_heads=heads, norm_eps=1e-5, qk_norm=True, cap_feat_dim=text_dim, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[head_dim // 2, head_dim // 4, head_dim // 4], axes_lens=[1024, 64, 64])
    with torch.no_grad():  # made with torch.empty: NaN now and then (diffusers' tests set them too)
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=list(vae_channels),
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(folder)
    return folder
