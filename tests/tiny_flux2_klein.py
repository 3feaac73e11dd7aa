"""A tiny random FLUX.2 [klein] pipeline folder, built locally (no hub): the base model of the FLUX.2 [klein] tests.

The layout of black-forest-labs/FLUX.2-klein-base-4B (model_index.json naming Flux2KleinPipeline, tokenizer/ a Qwen2
tokenizer with a Qwen3-style chat template that takes enable_thinking, text_encoder/ Qwen3ForCausalLM, vae/
AutoencoderKLFlux2 with its latent batch-norm statistics, transformer/ Flux2Transformer2DModel without a guidance
embedding, scheduler/ FlowMatchEulerDiscreteScheduler with dynamic shifting), with diffusers' own pipeline tests'
tiny sizes (test_pipeline_flux2_klein.py's get_dummy_components) but:
- the real 8x VAE (4 levels) with 4 latent channels, patchified 2x2 into 16 transformer channels (resolution a
  multiple of 16), and batch-norm running statistics that are not 0/1, so that their use shows;
- a text encoder of 30 layers, so upstream's default --text_encoder_out_layers 10 20 30 applies unchanged: the
  transformer's joint_attention_dim is 3 x the encoder's hidden size, as in the real model (3 x 2560 = 7680).
"""

import os

from tiny_sd import write_qwen_tokenizer

# A Qwen3-style chat template: the user turn, then the assistant's header; enable_thinking=False (as the pipeline
# asks) adds the empty thinking block Qwen3's own template adds.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
TEXT_LAYERS = 30
TEXT_HIDDEN = 16
LATENT_CHANNELS = 4


def write_qwen3_tokenizer(folder):
    """write_qwen_tokenizer's byte-level BPE plus Qwen3's <think> / </think> tokens and the chat template above,
    saved as the fast Qwen2 tokenizer Flux2KleinPipeline takes."""
    from transformers import Qwen2TokenizerFast

    write_qwen_tokenizer(folder)
    tokenizer = Qwen2TokenizerFast.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_flux2_klein(folder, seed=0, is_distilled=False):
    """Build the tiny FLUX.2 [klein] pipeline in `folder` (returned); loadable by Flux2KleinPipeline.from_pretrained.
    `is_distilled`: the pipeline's config flag (a step-distilled klein renders without true CFG); the base model
    people train on is not distilled."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = write_qwen3_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=TEXT_HIDDEN, intermediate_size=16, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=1024,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=2, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():  # the latents' batch-norm statistics, per patchified channel
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, LATENT_CHANNELS * 4))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, LATENT_CHANNELS * 4))
    vae.eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    # FLUX.2 [klein]'s scheduler_config.json (the pipeline computes its own mu from the image size).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer, is_distilled=is_distilled).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_flux2_klein(sys.argv[1] if len(sys.argv) > 1 else "tiny-flux2-klein"))
