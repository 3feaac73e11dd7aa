"""Speed and memory benchmark of the Stable Diffusion training scripts, each against its own floor.

For each script and variant (extra flags: caching, gradient checkpointing, 8-bit Adam, --set_grads_to_none) this
trains a small but not tiny model (UNet channels 64/128/128, 128 px images = 16x16 latents, batch 2) for --steps
optimizer steps and reports (each script's `_sdxl` row, e.g. controlnet_sdxl: the same script and flags on an
SDXL-shaped pipeline, the same UNet with SDXL's text_time conditioning and two small text encoders):

- s/step: the steady-state time of one optimizer step. The run logs its loss every L steps to TensorBoard; an event's
  wall time is when it was logged, so the median over the logging intervals of (time between two logged steps) /
  (steps between them) is the time per step without start-up, warm-up of the first L steps, the final save, or a
  stall of the machine in one interval.
- whole-run peak memory: on CPU the training process's own peak resident set size, `ru_maxrss` from `os.wait4` on
  its pid (the script runs as `python script.py`, without `accelerate launch`, so the measured process is the one
  that trains). On CUDA `torch.cuda.max_memory_allocated()`, written at exit by bench/cuda_peak_hook/sitecustomize.py.
- training peak memory (CPU): the same high-water mark (VmHWM, polled from /proc while the run goes) as it stood at
  the last logged step, before the final save, which can reach a higher peak of its own and would hide what a
  memory flag saves during training.
- startup: the wall time from starting the process to the first logged step, less that many steps at the steady
  rate: the fixed cost of a run (imports, model loading, dataset scan, cache filling, first-step warm-up). A cached
  variant runs twice on an emptied cache: the first run fills it (its startup is reported separately), the second,
  which reads it, is the one measured.
- the floor: in a separate process (so its memory is its own) and with the same threads, the trained network's own
  forward + MSE loss + backward + gradient clipping (every script clips at --max_grad_norm 1.0 by default) +
  AdamW step + zero_grad(set_to_none=True), timed on one fixed random batch of the shapes the script trains on:
  the median iteration after 3 warm-up iterations. Anything a script spends above it (VAE and text encoding, data
  loading, logging, host-device syncs) is overhead (SPEC §8).

The `_mixed` rows (text_to_image_mixed, text_to_image_sdxl_mixed, dreambooth_lora_mixed) train on a mixed-aspect
data set (landscape, portrait and square images), squared as usual (base, cached) or in three aspect-ratio buckets
of the same pixel count (buckets, buckets_cached), so the table shows what bucketing costs per step and in memory.

The `dreambooth_lora_flux` row trains train_dreambooth_lora.py (base, cached) on a FLUX.1-shaped pipeline: a small
Flux transformer (2 double-stream and 4 single-stream blocks, 4 heads of 32, guidance-embedded), a 64-wide CLIP text
encoder for the pooled embedding and a 64-wide T5 encoder for the text tokens, the bench VAE's shape with 4 latent
channels (16x16 latents packed 2x2 into 64 tokens of 16 channels), with the dreambooth row's flags plus
--max_sequence_length 64: T5 prompts of 64 tokens rather than upstream's 512, so that the text encoding is a real
cost without dominating a model this small. Its floor is the transformer with the script's default LoRA (every
attention and feed-forward projection of the double-stream blocks, q/k/v of the single-stream ones; rank 4, alpha 4)
on a fixed packed batch with T5 embeddings of 64 tokens, the pooled embedding, position ids and the guidance. This
transformer's own step is about a fifth of the SD UNet's, so a fixed per-step cost of the script weighs about five
times as much in its overhead percentage.

The `dreambooth_lora_qwen_image` row trains train_dreambooth_lora.py (base, cached) on a Qwen-Image-shaped pipeline:
a small QwenImageTransformer2DModel (4 blocks, 4 heads of 32), a 64-wide, 4-layer Qwen2.5-VL text encoder behind the
pipeline's prompt template, and an AutoencoderKLQwenImage (a video VAE run on one frame, 4 latent channels, 16x16
latents packed 2x2 into 64 tokens of 16 channels), with the dreambooth row's flags. Its prompt states keep the
prompt's own length (5 tokens here, the template's 34 dropped), as upstream. Its floor is the transformer with the
script's default LoRA (to_k, to_q, to_v, to_out.0 of every block; rank 4, alpha 4) on a fixed packed batch with those
5 text tokens and the per-sample img_shapes.

The `dreambooth_lora_z_image` row trains train_dreambooth_lora.py (base, cached) on a Z-Image-shaped pipeline
(build_bench_z_image_model: tests/tiny_z_image.py at bench sizes): a ZImageTransformer2DModel of 4 layers plus one
noise and one context refiner layer, 4 heads of 32, a 64-wide, 4-layer Qwen3 text encoder behind the Qwen3 chat
template (padded to 512 tokens, each prompt's real ones kept), and an AutoencoderKL of the SD bench model's widths with
16 latent channels (16x16 latents, 64 image tokens), with the dreambooth row's flags. Its floor is the transformer
with the script's default LoRA (to_k, to_q, to_v, to_out.0 of every layer and refiner; rank 4, alpha 4) on a fixed
list of latents and of the instance prompt's states.

The `dreambooth_lora_sd3` row trains train_dreambooth_lora.py (base, cached) on an SD3-shaped pipeline: a small
SD3Transformer2DModel (4 blocks, 4 heads of 32, 2x2 patches), two CLIPTextModelWithProjection encoders (32 and 64
wide) and a 64-wide T5, the bench VAE's shape with SD3's shift and scaling factors (16x16 latents, 64 image tokens),
with the dreambooth row's flags and upstream's defaults (77 CLIP + 77 T5 text tokens, logit_normal, preconditioned
outputs). Its floor is the transformer with the script's default LoRA (both streams' attention projections of every
block; rank 4, alpha 4) on a fixed batch of those shapes with the pooled embedding.

The `dreambooth_lora_flux_big` row (SPEC §13, big models) trains train_dreambooth_lora.py on a FLUX.1-shaped
pipeline whose transformer is large enough that its weights dominate memory (FLUX_BIG_TRANSFORMER: 3 double-stream and
6 single-stream blocks, 12 heads of 64, about 118M parameters; the small text encoders and VAE of the Flux row), with
--cache_latents --cache_text_embeddings (so that the VAE and text encoders are out of the way, as a big-model run keeps
them), in bf16 on CUDA (--mixed_precision bf16) and fp32 on a CPU (where bf16 matmuls are emulated, ~10x slower), in
one variant per memory mode: `full` (the frozen base unquantized, in the training dtype), `int8` and `nf4`
(--bnb_quantization_config_path with load_in_8bit / nf4 load_in_4bit; 4-bit layers compute in the training dtype) and
`nf4_offload` (nf4 and --offload).
Two more columns for them:

- bytes per frozen denoiser parameter: what the script logs after loading ("Frozen transformer: N parameters in B
  bytes"), quantization statistics included (trainkit.big_models.frozen_footprint).
- steady training peak (CPU): the largest resident set size (VmRSS, sampled every 0.2 s) between the first and the
  last logged step, so loading (which reads the weights in full precision before quantizing them) does not hide
  what each mode saves while training. These runs set MALLOC_MMAP_THRESHOLD_=65536, so that freed memory leaves
  the resident set (glibc otherwise keeps the heap at its loading high-water mark). On CUDA the peak allocated
  memory of the whole run is the figure (the transformer is quantized layer by layer as it moves to the GPU, so
  loading does not raise it).

On a CPU --offload cannot save anything (the device is the host); the row shows that it costs nothing either. Run
these rows with few steps: `--scripts dreambooth_lora_flux_big --steps 4`.

    python bench/bench.py                                   # every script, its default variants, 40 steps
    python bench/bench.py --scripts controlnet --variants base,set_grads_to_none --steps 10
    git worktree add /tmp/before a736386 && python bench/bench.py --rounds 3 --baseline_repo /tmp/before

On a shared machine the speed of the same computation drifts by 20% or more from one minute to the next; --rounds N
runs everything N times, round after round, and reports the fastest round of each (times) and medians (memory,
startup). --baseline_repo also runs another checkout's scripts (base variant) in the same rounds.

The markdown table goes to stdout, progress to stderr; --json writes the rows. The bench model and datasets are
built once under --work_dir and reused.
"""

import argparse
import glob
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
THIS_REPO = os.path.dirname(BENCH_DIR)
CUDA_PEAK_HOOK_DIR = os.path.join(BENCH_DIR, "cuda_peak_hook")

RESOLUTION = 128
BATCH_SIZE = 2
NUM_IMAGES = 24
IMAGE_SIZE = (160, 128)  # width, height: not square, so the resize and centre crop do real work
TEXT_LENGTH = 77
INSTANCE_PROMPT = "a photo of sks toy"
PLACEHOLDER_TOKEN = "<cat-toy>"
# Exactly what train_dreambooth_lora.py adds to the UNet (LoraConfig target_modules; r = lora_alpha = --rank 4).
DREAMBOOTH_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
DREAMBOOTH_LORA_RANK = 4
# The Flux row (dreambooth_lora_flux): T5 prompt length given to the script (--max_sequence_length; upstream's default
# is 512), and exactly what train_dreambooth_lora.py adds to the Flux transformer by default (--lora_layers left out:
# these targets, r = --rank 4, lora_alpha = its Flux default 4), and the guidance it feeds a guidance-distilled
# transformer (--guidance_scale default).
FLUX_MAX_SEQUENCE_LENGTH = 64
FLUX_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"]
FLUX_LORA_ALPHA = 4
FLUX_GUIDANCE_SCALE = 3.5
# The Qwen-Image row (dreambooth_lora_qwen_image): what train_dreambooth_lora.py adds to its transformer by default
# (upstream's targets, r = --rank 4, lora_alpha = its Qwen-Image default 4).
QWEN_IMAGE_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
QWEN_IMAGE_LORA_ALPHA = 4
# The big-model rows' transformer (about 118M parameters; FLUX.1-dev's own: 19 double, 38 single blocks, 24 heads of
# 128, 12B) and their bitsandbytes configs (--bnb_quantization_config_path files, written under --work_dir).
FLUX_BIG_TRANSFORMER = {"num_layers": 3, "num_single_layers": 6, "attention_head_dim": 64, "num_attention_heads": 12,
                        "axes_dims_rope": (16, 24, 24)}
BNB_CONFIGS = {"int8": {"load_in_8bit": True},
               "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}}
FLOOR_WARMUP_STEPS = 3
MAX_GRAD_NORM = 1.0

# The mixed-aspect data set (SPEC §9): landscape, portrait and square images, a third each, and three buckets of
# about RESOLUTION^2 pixels (16x16 latents squared; 14x18, 18x14 and 16x16 bucketed), so that bucketed and squared
# runs do the same work per step and any difference is the bucketing's own cost.
MIXED_IMAGE_SIZES = ((160, 128), (128, 160), (144, 144))  # width, height
MIXED_BUCKETS = "112,144;144,112;128,128"

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
SHAPES = ("circle", "square")


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# The bench model and datasets, built once under --work_dir
# ----------------------------------------------------------------------------------------------------------------------


def build_bench_model(folder):
    """A random SD 1.x-layout pipeline (as tests/tiny_sd.py builds, with its tokenizer) but big enough that the UNet's
    own step is a real cost: UNet 64/128/128 with cross-attention, a 4-block VAE (128 px -> 16x16 latents) and a
    256-wide, 4-layer CLIP text encoder."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, os.path.join(THIS_REPO, "tests"))
    from tiny_sd import write_tokenizer

    torch.manual_seed(0)
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_attention_heads=4,
        num_hidden_layers=4, max_position_embeddings=TEXT_LENGTH, projection_dim=256,
    ))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)


def build_bench_sdxl_model(folder):
    """The SDXL counterpart of build_bench_model: the same UNet with SDXL's `text_time` conditioning (pooled text
    embedding + 6 time ids), a CLIPTextModel and a CLIPTextModelWithProjection (128 and 256 wide, 4 layers) whose
    penultimate hidden states side by side are the UNet's cross-attention input, and the same VAE."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, os.path.join(THIS_REPO, "tests"))
    from tiny_sd import write_tokenizer

    torch.manual_seed(0)
    tokenizers = [write_tokenizer(os.path.join(folder, name)) for name in ("tokenizer", "tokenizer_2")]

    def text_config(hidden_size):
        return CLIPTextConfig(
            bos_token_id=tokenizers[0].bos_token_id, eos_token_id=tokenizers[0].eos_token_id,
            pad_token_id=tokenizers[0].pad_token_id, vocab_size=len(tokenizers[0]), hidden_size=hidden_size,
            intermediate_size=4 * hidden_size, num_attention_heads=4, num_hidden_layers=4,
            max_position_embeddings=TEXT_LENGTH, projection_dim=hidden_size,
        )

    text_encoder, text_encoder_2 = CLIPTextModel(text_config(128)), CLIPTextModelWithProjection(text_config(256))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128 + 256, attention_head_dim=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=6 * 32 + 256,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
    ).save_pretrained(folder)


def write_t5_tokenizer(folder, model_max_length=512):
    """A T5 tokenizer made locally (no hub): a `tokenizers` Unigram model over T5's special tokens (<pad> 0, </s> 1,
    <unk> 2), a whole-word piece for each word of the bench's prompts and single letters for anything else, with T5's
    Metaspace pre-tokenizer and `</s>` appended, wrapped in transformers' T5TokenizerFast and saved (tokenizer.json);
    model_max_length 512 as FLUX.1's, so the script's --max_sequence_length check sees a real limit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = dict.fromkeys(INSTANCE_PROMPT.split() + "a photo of make it".split() + sorted(COLOURS) + list(SHAPES))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + word, -2.0) for word in words]
    vocab += [(chr(code), -5.0) for code in range(ord("a"), ord("z") + 1)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=model_max_length,
                                eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_bench_flux_model(folder, **transformer_shape):
    """A random FLUX.1-layout pipeline (FluxPipeline: tokenizer/ + text_encoder/ a CLIPTextModel whose pooled output
    conditions the transformer, tokenizer_2/ + text_encoder_2/ a T5EncoderModel whose hidden states are its text
    tokens, vae/, transformer/, scheduler/ FlowMatchEulerDiscreteScheduler) with a small Flux-shaped transformer:
    2 double-stream and 4 single-stream blocks, 4 heads of 32 (rope axes 4+14+14), guidance-embedded as FLUX.1-dev,
    16 input channels = the VAE's 4 latent channels packed 2x2 (128 px -> 16x16 latents -> 64 tokens). The text
    encoders are 64 wide, 4 layers; the VAE is the SD bench model's shape with Flux's shift and scaling factors.
    `transformer_shape` replaces the transformer's sizes (the big-model rows: FLUX_BIG_TRANSFORMER)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sys.path.insert(0, os.path.join(THIS_REPO, "tests"))
    from tiny_sd import write_tokenizer

    torch.manual_seed(0)
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer_2 = write_t5_tokenizer(os.path.join(folder, "tokenizer_2"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_attention_heads=4,
        num_hidden_layers=4, max_position_embeddings=TEXT_LENGTH, projection_dim=64,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=64, d_kv=16, d_ff=256, num_layers=4, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id, is_encoder_decoder=False, use_cache=False,
    ))
    shape = {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
             "axes_dims_rope": (4, 14, 14), **transformer_shape}
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True, **shape,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    ).save_pretrained(folder)


def build_bench_qwen_image_model(folder):
    """A random Qwen-Image-layout pipeline (QwenImagePipeline: tokenizer/ the tests' Qwen2 tokenizer, text_encoder/ a
    Qwen2_5_VLForConditionalGeneration 64 wide with 4 layers, vae/ an AutoencoderKLQwenImage with 4 latent channels
    and per-channel latent statistics, transformer/ a QwenImageTransformer2DModel of 4 blocks, 4 heads of 32,
    scheduler/ FlowMatchEulerDiscreteScheduler with dynamic shifting): 128 px -> 16x16 latents -> 64 tokens."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, os.path.join(THIS_REPO, "tests"))
    from tiny_sd import write_qwen_tokenizer

    torch.manual_seed(0)
    tokenizer = write_qwen_tokenizer(os.path.join(folder, "tokenizer"))
    ids = tokenizer.convert_tokens_to_ids
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                     "num_key_value_heads": 4, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>")},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 64},
        hidden_size=64, vocab_size=len(tokenizer), bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|vision_pad|>"), image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
    )).eval()
    vae = AutoencoderKLQwenImage(base_dim=32, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, -0.1],
                                 latents_std=[0.5, 1.5, 0.8, 1.2])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=4,
                                              attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                              guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer).save_pretrained(folder)


def draw_example(index):
    """One synthetic example: a coloured shape on a light background (the training image), the same shape in
    another colour (the edited image for pix2pix), the shape's outline on black (ControlNet's conditioning image),
    and their captions."""
    from PIL import Image, ImageDraw

    rng = random.Random(index)
    colour, edited_colour = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    width, height = IMAGE_SIZE
    radius = rng.randint(height // 6, height // 3)
    x, y = rng.randint(radius, width - radius), rng.randint(radius, height - radius)
    box = (x - radius, y - radius, x + radius, y + radius)
    draw = ImageDraw.ImageDraw.ellipse if shape == "circle" else ImageDraw.ImageDraw.rectangle

    def picture(fill):
        image = Image.new("RGB", IMAGE_SIZE, (240, 240, 235))
        draw(ImageDraw.Draw(image), box, fill=COLOURS[fill])
        return image

    outline = Image.new("RGB", IMAGE_SIZE, (0, 0, 0))
    draw(ImageDraw.Draw(outline), box, outline=(255, 255, 255), width=2)
    return {"image": picture(colour), "edited": picture(edited_colour), "outline": outline,
            "caption": f"a photo of a {colour} {shape}", "edit_prompt": f"make it {edited_colour}"}


def write_jsonl(path, rows):
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)


def build_datasets(data_dir):
    """One folder per layout the scripts read (see each script's tests for the same layouts at tiny size):
    captioned/ images with name.txt captions (text_to_image); objects/ bare images (dreambooth_lora's instance
    images, textual_inversion's); controlnet/ an imagefolder whose metadata.jsonl names the image, the conditioning
    image and the caption; pix2pix/ an imagefolder whose metadata.jsonl names the original and edited images and the
    edit prompt."""
    folders = {name: os.path.join(data_dir, name) for name in ("captioned", "objects", "controlnet", "pix2pix")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    os.makedirs(os.path.join(folders["controlnet"], "conditioning"), exist_ok=True)
    controlnet_rows, pix2pix_rows = [], []
    for index in range(NUM_IMAGES):
        example = draw_example(index)
        name = f"{index:03d}.png"
        example["image"].save(os.path.join(folders["captioned"], name))
        with open(os.path.join(folders["captioned"], f"{index:03d}.txt"), "w") as file:
            file.write(example["caption"] + "\n")
        example["image"].save(os.path.join(folders["objects"], name))
        example["image"].save(os.path.join(folders["controlnet"], name))
        example["outline"].save(os.path.join(folders["controlnet"], "conditioning", name))
        controlnet_rows.append({"file_name": name, "conditioning_image": f"conditioning/{name}",
                                "text": example["caption"]})
        example["image"].save(os.path.join(folders["pix2pix"], f"original_{name}"))
        example["edited"].save(os.path.join(folders["pix2pix"], f"edited_{name}"))
        pix2pix_rows.append({"input_image_file_name": f"original_{name}", "edited_image_file_name": f"edited_{name}",
                             "edit_prompt": example["edit_prompt"]})
    write_jsonl(os.path.join(folders["controlnet"], "metadata.jsonl"), controlnet_rows)
    write_jsonl(os.path.join(folders["pix2pix"], "metadata.jsonl"), pix2pix_rows)


def build_mixed_dataset(folder):
    """mixed/: NUM_IMAGES captioned images (name.txt) cycling through MIXED_IMAGE_SIZES, each the first layout's
    picture resized to that shape."""
    for index in range(NUM_IMAGES):
        example = draw_example(index)
        name = f"{index:03d}"
        example["image"].resize(MIXED_IMAGE_SIZES[index % len(MIXED_IMAGE_SIZES)]).save(
            os.path.join(folder, f"{name}.png"))
        with open(os.path.join(folder, f"{name}.txt"), "w") as file:
            file.write(example["caption"] + "\n")


def ensure_built(folder, build, what):
    """Build `folder` unless a previous bench finished building it (a marker file is written last, so a build that
    was interrupted is redone)."""
    marker = os.path.join(folder, ".bench-complete")
    if os.path.exists(marker):
        return folder
    log(f"building the {what} in {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    build(folder)
    open(marker, "w").close()
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# The scripts and variants
# ----------------------------------------------------------------------------------------------------------------------

# file, the scalar the script logs its loss as, its data flags, which text models a cached run can cache
# (textual_inversion trains through its text encoder, so only the latents can be cached).
SD_SCRIPTS = {
    "text_to_image": {
        "file": "train_text_to_image.py", "loss_tag": "train_loss", "cache_text": True,
        "data_flags": lambda data: ["--train_data_dir", f"{data}/captioned", "--center_crop"],
    },
    "dreambooth_lora": {
        "file": "train_dreambooth_lora.py", "loss_tag": "loss", "cache_text": True,
        "data_flags": lambda data: ["--instance_data_dir", f"{data}/objects", "--instance_prompt", INSTANCE_PROMPT,
                                    "--center_crop"],
    },
    "controlnet": {
        # No --center_crop flag: train_controlnet.py crops at the centre unless given --random_crop.
        "file": "train_controlnet.py", "loss_tag": "loss", "cache_text": True,
        "data_flags": lambda data: ["--train_data_dir", f"{data}/controlnet"],
    },
    "instruct_pix2pix": {
        "file": "train_instruct_pix2pix.py", "loss_tag": "train_loss", "cache_text": True,
        "data_flags": lambda data: ["--train_data_dir", f"{data}/pix2pix", "--center_crop"],
    },
    "textual_inversion": {
        "file": "textual_inversion.py", "loss_tag": "loss", "cache_text": False,
        "data_flags": lambda data: ["--train_data_dir", f"{data}/objects", "--placeholder_token", PLACEHOLDER_TOKEN,
                                    "--initializer_token", "toy", "--center_crop", "--save_steps", "1000000"],
    },
}
SDXL_SUFFIX = "_sdxl"
MIXED_SUFFIX = "_mixed"
# Every script trains SDXL when its model folder is one (the folder decides): each SD row is followed by a `_sdxl`
# row, the same script and flags on the bench SDXL pipeline ("model": which bench model a row trains; default SD).
SCRIPTS = {}
for _name, _entry in SD_SCRIPTS.items():
    SCRIPTS[_name] = _entry
    SCRIPTS[_name + SDXL_SUFFIX] = {**_entry, "model": "sdxl"}
del _name, _entry
# `_mixed` rows train on the mixed-aspect data set (data-mixed/), squared as usual or bucketed (variants `buckets`,
# `buckets_cached`): the same images both ways, so the table shows what bucketing costs per step and in memory.
MIXED_ROWS = {
    "text_to_image_mixed": {**SD_SCRIPTS["text_to_image"],
                            "data_flags": lambda data: ["--train_data_dir", f"{data}-mixed", "--center_crop"]},
    "dreambooth_lora_mixed": {**SD_SCRIPTS["dreambooth_lora"],
                              "data_flags": lambda data: ["--instance_data_dir", f"{data}-mixed", "--instance_prompt",
                                                          INSTANCE_PROMPT, "--center_crop"]},
}
MIXED_ROWS["text_to_image_sdxl_mixed"] = {**MIXED_ROWS["text_to_image_mixed"], "model": "sdxl"}
SCRIPTS.update(MIXED_ROWS)
# The Flux row: train_dreambooth_lora.py (it trains Flux when the model folder is a FluxPipeline) with the dreambooth
# row's flags on the bench Flux pipeline, T5 prompts of FLUX_MAX_SEQUENCE_LENGTH tokens ("extra_flags": flags of this
# row only). Its floor is its own (FLOORS), not the SD row's.
FLUX_ROWS = {
    "dreambooth_lora_flux": {**SD_SCRIPTS["dreambooth_lora"], "model": "flux",
                             "extra_flags": ["--max_sequence_length", str(FLUX_MAX_SEQUENCE_LENGTH)]},
}
SCRIPTS.update(FLUX_ROWS)
# The Qwen-Image row: train_dreambooth_lora.py (it trains Qwen-Image when the model folder is a QwenImagePipeline)
# with the dreambooth row's flags on the bench Qwen-Image pipeline. Its floor is its own (FLOORS).
QWEN_IMAGE_ROWS = {"dreambooth_lora_qwen_image": {**SD_SCRIPTS["dreambooth_lora"], "model": "qwen_image"}}
SCRIPTS.update(QWEN_IMAGE_ROWS)
# The FLUX.2 [dev] row: train_dreambooth_lora.py (it trains FLUX.2 [dev] when the model folder is a Flux2Pipeline) with
# the dreambooth row's flags on the bench FLUX.2 [dev] pipeline, Mistral-3 prompts of FLUX2_MAX_SEQUENCE_LENGTH tokens
# (upstream's 512 would make the text tokens 8x the image's 64 on a model this small) and upstream's guidance 3.5 in
# the guidance embedding. Its floor is its own (FLOORS): the transformer with the script's default LoRA on a fixed
# batch of those shapes.
FLUX2_MAX_SEQUENCE_LENGTH = 64
FLUX2_TEXT_HIDDEN, FLUX2_TEXT_LAYERS = 64, 30  # 30 layers: upstream's default --text_encoder_out_layers 10 20 30
FLUX2_GUIDANCE_SCALE = 3.5
FLUX2_ROWS = {
    "dreambooth_lora_flux2": {**SD_SCRIPTS["dreambooth_lora"], "model": "flux2",
                              "extra_flags": ["--max_sequence_length", str(FLUX2_MAX_SEQUENCE_LENGTH)]},
}
SCRIPTS.update(FLUX2_ROWS)


def bench_flux2_image_parts(joint_attention_dim, guidance_embeds):
    """(vae, transformer, scheduler) of both FLUX.2 bench pipelines: an AutoencoderKLFlux2 with 4 latent channels and
    batch-norm statistics that are not 0/1, a Flux2Transformer2DModel of 2 double- and 4 single-stream blocks, 4 heads
    of 32, taking `joint_attention_dim` text features, and the FLUX.2 scheduler's settings."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=RESOLUTION, use_quant_conv=False,
        use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=joint_attention_dim, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    return vae, transformer, scheduler


def build_bench_flux2_model(folder):
    """A random FLUX.2 [dev]-layout pipeline (Flux2Pipeline: tokenizer/ the tests' chat-template tokenizer,
    text_encoder/ a Mistral3ForConditionalGeneration whose text model is 64 wide with 30 layers, vae/ an
    AutoencoderKLFlux2 with 4 latent channels and batch-norm statistics, transformer/ a Flux2Transformer2DModel of 2
    double- and 4 single-stream blocks, 4 heads of 32, with the guidance embedding, scheduler/
    FlowMatchEulerDiscreteScheduler with dynamic shifting): 128 px -> 16x16 latents -> patchified 2x2 into 64 tokens
    of 16 channels."""
    import torch
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    sys.path.insert(0, os.path.join(THIS_REPO, "tests"))
    from tiny_flux2 import write_flux2_tokenizer

    torch.manual_seed(0)
    tokenizer = write_flux2_tokenizer(os.path.join(folder, "tokenizer"))
    ids = tokenizer.convert_tokens_to_ids
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": FLUX2_TEXT_HIDDEN,
                     "intermediate_size": 256, "max_position_embeddings": 1024, "num_attention_heads": 4,
                     "num_hidden_layers": FLUX2_TEXT_LAYERS, "num_key_value_heads": 4, "head_dim": 16,
                     "sliding_window": None, "bos_token_id": ids("<s>"), "eos_token_id": ids("</s>"),
                     "pad_token_id": ids("<pad>")},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3},
        bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"), image_seq_length=4,
        vision_feature_layer=-1, image_token_index=ids("[IMG]"))).eval()
    vae, transformer, scheduler = bench_flux2_image_parts(3 * FLUX2_TEXT_HIDDEN, guidance_embeds=True)
    Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                  transformer=transformer).save_pretrained(folder)


def flux2_floor(model, device, family, sequence_length, guidance):
    """The floor of both FLUX.2 rows: only LoRA adapters on the transformer train (the script's default targets, the
    family's lora_targets, rank 4, alpha 4), on the batch the script feeds it: the 16x16 latents patchified 2x2 into
    64 tokens of 16 channels with their 4-axis ids, `sequence_length` text tokens (3 layers' hidden states side by
    side) with theirs, a flow-matching timestep in [0, 1), `guidance` (None: the transformer has no guidance
    embedding)."""
    import torch
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from peft import LoraConfig

    transformer = Flux2Transformer2DModel.from_pretrained(model, subfolder="transformer").to(device)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=DREAMBOOTH_LORA_RANK, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=family.lora_targets))
    transformer.train()
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    side = RESOLUTION // 8 // 2
    latents = torch.randn(BATCH_SIZE, config.in_channels, side, side, generator=generator)
    text = torch.randn(BATCH_SIZE, sequence_length, config.joint_attention_dim, generator=generator)
    batch = {
        "hidden_states": Flux2Pipeline._pack_latents(latents),
        "target": torch.randn(BATCH_SIZE, side * side, config.in_channels, generator=generator),
        "encoder_hidden_states": text,
        "timestep": torch.rand(BATCH_SIZE, generator=generator),
        "img_ids": Flux2Pipeline._prepare_latent_ids(latents),
        "txt_ids": Flux2Pipeline._prepare_text_ids(text),
    }
    if guidance is not None:
        batch["guidance"] = torch.full([BATCH_SIZE], guidance)
    batch = {key: value.to(device) for key, value in batch.items()}
    inputs = {key: value for key, value in batch.items() if key != "target"}
    trained = [parameter for parameter in transformer.parameters() if parameter.requires_grad]

    def loss():
        return mse(transformer(**inputs, return_dict=False)[0], batch)
    return trained, loss


def floor_dreambooth_lora_flux2(model, device):
    """flux2_floor with FLUX2_MAX_SEQUENCE_LENGTH text tokens and the guidance FLUX2_GUIDANCE_SCALE."""
    sys.path.insert(0, THIS_REPO)
    from trainkit.families.flux2 import FAMILY

    return flux2_floor(model, device, FAMILY, FLUX2_MAX_SEQUENCE_LENGTH, FLUX2_GUIDANCE_SCALE)


# The FLUX.2 [klein] row: train_dreambooth_lora.py (it trains FLUX.2 [klein] when the model folder is a
# Flux2KleinPipeline) with the dreambooth row's flags on the bench klein pipeline, Qwen3 prompts of
# KLEIN_MAX_SEQUENCE_LENGTH tokens (upstream's 512 would make the text tokens 8x the image's 64 on a model this small).
# Its floor is its own (FLOORS): the transformer with the script's default LoRA on a fixed batch of those shapes.
KLEIN_MAX_SEQUENCE_LENGTH = 64
KLEIN_TEXT_HIDDEN, KLEIN_TEXT_LAYERS = 64, 30  # 30 layers: upstream's default --text_encoder_out_layers 10 20 30
KLEIN_ROWS = {
    "dreambooth_lora_flux2_klein": {**SD_SCRIPTS["dreambooth_lora"], "model": "flux2_klein",
                                    "extra_flags": ["--max_sequence_length", str(KLEIN_MAX_SEQUENCE_LENGTH)]},
}
SCRIPTS.update(KLEIN_ROWS)


def build_bench_flux2_klein_model(folder):
    """A random FLUX.2 [klein]-layout pipeline (Flux2KleinPipeline: tokenizer/ the tests' Qwen2 tokenizer with its
    Qwen3 chat template, text_encoder/ a Qwen3ForCausalLM 64 wide with 30 layers, vae/ an AutoencoderKLFlux2 with 4
    latent channels and batch-norm statistics, transformer/ a Flux2Transformer2DModel of 2 double- and 4
    single-stream blocks, 4 heads of 32, no guidance embedding, scheduler/ FlowMatchEulerDiscreteScheduler with
    dynamic shifting): 128 px -> 16x16 latents -> patchified 2x2 into 64 tokens of 16 channels."""
    import torch
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, os.path.join(THIS_REPO, "tests"))
    from tiny_flux2_klein import write_qwen3_tokenizer

    torch.manual_seed(0)
    tokenizer = write_qwen3_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=KLEIN_TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=KLEIN_TEXT_LAYERS,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=len(tokenizer),
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)).eval()
    vae, transformer, scheduler = bench_flux2_image_parts(3 * KLEIN_TEXT_HIDDEN, guidance_embeds=False)
    Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer).save_pretrained(folder)


def floor_dreambooth_lora_flux2_klein(model, device):
    """flux2_floor with KLEIN_MAX_SEQUENCE_LENGTH text tokens and no guidance (the klein transformer has none)."""
    sys.path.insert(0, THIS_REPO)
    from trainkit.families.flux2_klein import FAMILY

    return flux2_floor(model, device, FAMILY, KLEIN_MAX_SEQUENCE_LENGTH, None)


# The SD3 row: train_dreambooth_lora.py (it trains SD3 when the model folder is a StableDiffusion3Pipeline) with the
# dreambooth row's flags on the bench SD3 pipeline, upstream's 77 T5 tokens (after the CLIPs' 77: 154 text tokens).
# Its floor is its own (FLOORS): the transformer with the script's default LoRA on a fixed batch of those shapes.
SD3_MAX_SEQUENCE_LENGTH = 77
SD3_ROWS = {"dreambooth_lora_sd3": {**SD_SCRIPTS["dreambooth_lora"], "model": "sd3"}}
SCRIPTS.update(SD3_ROWS)


def build_bench_sd3_model(folder):
    """A random SD3-layout pipeline (StableDiffusion3Pipeline: tokenizer/ + text_encoder/ and tokenizer_2/ +
    text_encoder_2/ CLIPTextModelWithProjection 32 and 64 wide (4 layers, projections of 32), tokenizer_3/ +
    text_encoder_3/ a T5EncoderModel 64 wide, vae/ the SD bench model's shape with SD3's shift and scaling factors,
    transformer/ an SD3Transformer2DModel of 4 blocks, 4 heads of 32, 2x2 patches, scheduler/
    FlowMatchEulerDiscreteScheduler with SD3's shift 3.0): 128 px -> 16x16 latents -> 64 image tokens."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    sys.path.insert(0, os.path.join(THIS_REPO, "tests"))
    from tiny_sd import write_t5_tokenizer, write_tokenizer

    torch.manual_seed(0)
    tokenizers = [write_tokenizer(os.path.join(folder, name)) for name in ("tokenizer", "tokenizer_2")]
    tokenizer_3 = write_t5_tokenizer(os.path.join(folder, "tokenizer_3"))

    def clip(width):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=tokenizers[0].bos_token_id, eos_token_id=tokenizers[0].eos_token_id,
            pad_token_id=tokenizers[0].pad_token_id, vocab_size=len(tokenizers[0]), hidden_size=width,
            intermediate_size=4 * width, num_attention_heads=4, num_hidden_layers=4, max_position_embeddings=77,
            projection_dim=32,
        ))

    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=64, d_kv=16, d_ff=256, num_layers=4, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer_3.pad_token_id, eos_token_id=tokenizer_3.eos_token_id,
        decoder_start_token_id=tokenizer_3.pad_token_id, is_encoder_decoder=False, use_cache=False,
    ))
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
        out_channels=4, pos_embed_max_size=RESOLUTION // 8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
        text_encoder=clip(32), tokenizer=tokenizers[0], text_encoder_2=clip(64), tokenizer_2=tokenizers[1],
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, transformer=transformer,
    ).save_pretrained(folder)


def floor_dreambooth_lora_sd3(model, device):
    """Only LoRA adapters on the SD3 transformer train (the script's default targets: both streams' attention
    projections in every block, rank 4, alpha 4). The batch is what the script feeds it: 16x16 latents (the
    transformer patches them 2x2), 77 CLIP + SD3_MAX_SEQUENCE_LENGTH T5 text tokens, the two CLIPs' pooled
    embeddings, a timestep in the scheduler's 0-1000 units."""
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    sys.path.insert(0, THIS_REPO)
    from trainkit.families.sd3 import FAMILY

    transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer").to(device)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=DREAMBOOTH_LORA_RANK, lora_alpha=DREAMBOOTH_LORA_RANK,
                                       init_lora_weights="gaussian", target_modules=FAMILY.lora_targets))
    transformer.train()
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    side = RESOLUTION // 8
    batch = {
        "hidden_states": torch.randn(BATCH_SIZE, config.in_channels, side, side, generator=generator),
        "target": torch.randn(BATCH_SIZE, config.out_channels, side, side, generator=generator),
        "encoder_hidden_states": torch.randn(BATCH_SIZE, 77 + SD3_MAX_SEQUENCE_LENGTH, config.joint_attention_dim,
                                             generator=generator),
        "pooled_projections": torch.randn(BATCH_SIZE, config.pooled_projection_dim, generator=generator),
        "timestep": torch.rand(BATCH_SIZE, generator=generator) * 1000,
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    inputs = {key: value for key, value in batch.items() if key != "target"}
    trained = [parameter for parameter in transformer.parameters() if parameter.requires_grad]

    def loss():
        return mse(transformer(**inputs, return_dict=False)[0], batch)
    return trained, loss
# The Z-Image row: train_dreambooth_lora.py (it trains Z-Image when the model folder is a ZImagePipeline) with the
# dreambooth row's flags on the bench Z-Image pipeline; its prompt states keep each prompt's own length (the chat
# template's), as upstream. Its floor is its own (FLOORS): the transformer with the script's default LoRA (upstream's
# targets, rank 4, its Z-Image default alpha 4) on a fixed batch of those shapes.
Z_IMAGE_ROWS = {"dreambooth_lora_z_image": {**SD_SCRIPTS["dreambooth_lora"], "model": "z_image"}}
SCRIPTS.update(Z_IMAGE_ROWS)
Z_IMAGE_LORA_ALPHA = 4


def build_bench_z_image_model(folder):
    """A random Z-Image-layout pipeline (tests/tiny_z_image.build_tiny_z_image at bench sizes: ZImagePipeline with a
    ZImageTransformer2DModel of 4 main layers and one noise and one context refiner layer, 4 heads of 32, a Qwen3Model
    64 wide with 4 layers behind the Qwen3 chat template, an AutoencoderKL of the SD bench model's widths with 16
    latent channels and Z-Image's scaling and shift factors, FlowMatchEulerDiscreteScheduler with shift 3): 128 px ->
    16x16 latents -> 64 image tokens."""
    sys.path.insert(0, os.path.join(THIS_REPO, "tests"))
    from tiny_z_image import build_tiny_z_image

    build_tiny_z_image(folder, dim=128, heads=4, layers=4, text_dim=64, text_layers=4,
                       vae_channels=(32, 64, 128, 128))


def floor_dreambooth_lora_z_image(model, device):
    """Only LoRA adapters on the Z-Image transformer train (the script's default targets in every layer and refiner,
    rank 4, alpha 4). The batch is what the script feeds it: a list of (16, 1, 16, 16) latents, a list of the
    prompt's states (INSTANCE_PROMPT's own length in the chat template, 64 features), the time in [0, 1]; the
    output is stacked (and negated, as the script does)."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig
    from transformers import Qwen2Tokenizer

    sys.path.insert(0, THIS_REPO)
    from trainkit.families.z_image import FAMILY

    transformer = ZImageTransformer2DModel.from_pretrained(model, subfolder="transformer").to(device)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=DREAMBOOTH_LORA_RANK, lora_alpha=Z_IMAGE_LORA_ALPHA,
                                       init_lora_weights="gaussian", target_modules=FAMILY.lora_targets))
    transformer.train()
    config = transformer.config
    tokenizer = Qwen2Tokenizer.from_pretrained(model, subfolder="tokenizer")
    text_length = int(FAMILY.tokenize_prompt(tokenizer, [INSTANCE_PROMPT], 512).attention_mask.sum())
    generator = torch.Generator().manual_seed(0)
    side = RESOLUTION // 8
    latents = torch.randn(BATCH_SIZE, config.in_channels, 1, side, side, generator=generator).to(device)
    captions = torch.randn(BATCH_SIZE, text_length, config.cap_feat_dim, generator=generator).to(device)
    batch = {"target": torch.randn(BATCH_SIZE, config.in_channels, side, side, generator=generator).to(device)}
    time = torch.rand(BATCH_SIZE, generator=generator).to(device)
    trained = [parameter for parameter in transformer.parameters() if parameter.requires_grad]

    def loss():
        prediction = transformer(list(latents.unbind(0)), time, list(captions.unbind(0)), return_dict=False)[0]
        return mse(-torch.stack(prediction).squeeze(2), batch)
    return trained, loss
# The big-model row (its variants are the memory modes, BIG_MODEL_VARIANTS): training on cached latents and prompt
# embeddings, on the big Flux pipeline, in bf16 on CUDA (fp32 on a CPU: see BIG_MODEL_MIXED_PRECISION).
BIG_MODEL_ROWS = {
    "dreambooth_lora_flux_big": {**FLUX_ROWS["dreambooth_lora_flux"], "model": "flux_big"},
}


def base_script(script):
    """The SD row a row is a variant of: `controlnet_sdxl` -> `controlnet`, `text_to_image_sdxl_mixed` ->
    `text_to_image` (the floor functions serve every model and data set)."""
    return script.removesuffix(MIXED_SUFFIX).removesuffix(SDXL_SUFFIX)


# Variant name -> (extra flags, the scripts it runs for by default). "cached" flags are filled in per script.
VARIANTS = {
    "base": ([], list(SCRIPTS)),
    "cached": (None, list(SCRIPTS)),
    "gradient_checkpointing": (["--gradient_checkpointing"], ["text_to_image"]),
    "8bit_adam": (["--use_8bit_adam"], ["text_to_image"]),
    "set_grads_to_none": (["--set_grads_to_none"], ["controlnet"]),
    "buckets": (["--aspect_ratio_buckets", MIXED_BUCKETS], list(MIXED_ROWS)),
    "buckets_cached": (None, list(MIXED_ROWS)),
}
# "before": the base flags, run with --baseline_repo's copy of the script, in the same rounds as this checkout's base.
BEFORE = "before"
# The memory modes of the big-model row ("{bnb}" is its config file for that mode); added to SCRIPTS and VARIANTS after
# them, so that base and cached do not run for it by default.
BIG_MODEL_VARIANTS = {
    "full": ([], list(BIG_MODEL_ROWS)),
    "int8": (["--bnb_quantization_config_path", "{int8}"], list(BIG_MODEL_ROWS)),
    "nf4": (["--bnb_quantization_config_path", "{nf4}"], list(BIG_MODEL_ROWS)),
    "nf4_offload": (["--bnb_quantization_config_path", "{nf4}", "--offload"], list(BIG_MODEL_ROWS)),
}
SCRIPTS.update(BIG_MODEL_ROWS)
VARIANTS.update(BIG_MODEL_VARIANTS)
# --mixed_precision of the big-model row per device: bf16 on CUDA, as such models train; none on a CPU, whose bf16
# matmuls without AVX-512 BF16 are emulated (about 10x slower than fp32: 104 s a step measured on this bench).
BIG_MODEL_MIXED_PRECISION = {"cuda": "bf16", "cpu": "no"}
# The other scripts always free their gradients: only train_controlnet.py has --set_grads_to_none (upstream's name).
ONLY_FOR = {"set_grads_to_none": ["controlnet", "controlnet" + SDXL_SUFFIX],
            "buckets": list(MIXED_ROWS), "buckets_cached": list(MIXED_ROWS),
            **{variant: list(BIG_MODEL_ROWS) for variant in BIG_MODEL_VARIANTS}}


def plan(scripts, variants, with_baseline=False):
    """The (script, variant) pairs to run, in table order. Without --variants each variant runs for its default
    scripts; a variant named in --variants runs for every chosen script that has its flag. With a baseline
    checkout, its base run follows this checkout's."""
    def wanted(script, variant):
        if variants is None:
            return script in VARIANTS[variant][1]
        return variant in variants and script in ONLY_FOR.get(variant, SCRIPTS)
    pairs = []
    for script in scripts:
        for variant in VARIANTS:
            if wanted(script, variant):
                pairs.append((script, variant))
                if variant == "base" and with_baseline:
                    pairs.append((script, BEFORE))
    return pairs


def variant_flags(script, variant, cache_dir, bnb_configs=None, device="cpu"):
    flags = VARIANTS["base" if variant == BEFORE else variant][0]
    if variant in BIG_MODEL_VARIANTS:
        # Cached latents and prompt embeddings (filled by the first run; the entries do not depend on the mode).
        return [flag.format(**bnb_configs) for flag in flags] + [
            "--cache_latents", "--cache_text_embeddings", "--feature_cache_dir", cache_dir,
            "--mixed_precision", BIG_MODEL_MIXED_PRECISION[device]]
    if variant in ("cached", "buckets_cached"):
        flags = ["--cache_latents", "--feature_cache_dir", cache_dir]
        if SCRIPTS[script]["cache_text"]:
            flags.append("--cache_text_embeddings")
        if variant == "buckets_cached":
            flags += VARIANTS["buckets"][0]
    return flags


def logging_interval(steps):
    """Log every L steps: often enough for several measured intervals, and the first L steps (warm-up) excluded."""
    return max(1, steps // 8)


def script_command(repo, script, model, data_dir, output_dir, steps, extra_flags):
    return [
        sys.executable, os.path.join(repo, SCRIPTS[script]["file"]),
        "--pretrained_model_name_or_path", model, *SCRIPTS[script]["data_flags"](data_dir),
        "--output_dir", output_dir, "--resolution", str(RESOLUTION), "--train_batch_size", str(BATCH_SIZE),
        "--seed", "0", "--mixed_precision", "no", "--max_train_steps", str(steps),
        "--logging_steps", str(logging_interval(steps)), "--checkpointing_steps", "1000000",
        "--report_to", "tensorboard", "--lr_warmup_steps", "0", *SCRIPTS[script].get("extra_flags", []),
        *extra_flags,
    ]


def child_env(threads, device, cuda_peak_file=None):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "offline",
                "PYTHONUNBUFFERED": "1"})
    if device == "cpu":
        env.update({"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""})
    if cuda_peak_file:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [CUDA_PEAK_HOOK_DIR, env.get("PYTHONPATH")]))
        env["BENCH_CUDA_PEAK_FILE"] = cuda_peak_file
    return env


def resident_high_water_mib(pid, field="VmHWM"):
    """The process's peak resident set size so far (VmHWM; field="VmRSS": its resident set size now), in MiB; None
    once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def run_measured(command, env, log_path):
    """Run `command` to completion with its output in `log_path`. Returns its exit status, start wall time, wall
    seconds, peak RSS in MiB of that process itself (ru_maxrss from wait4's rusage: the whole run, final save
    included), and (wall time, VmHWM MiB) samples taken while it ran, from which the peak up to the end of training
    is read (VmHWM only grows, so the last sample before the last logged step covers every step before it)."""
    high_water, resident = [], []
    with open(log_path, "w") as output:
        started = time.time()
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            now, peak = time.time(), resident_high_water_mib(process.pid)
            if peak is not None:
                high_water.append((now, peak))
                resident.append((now, resident_high_water_mib(process.pid, "VmRSS")))
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return {"status": process.returncode, "started": started, "wall_s": time.time() - started,
            "peak_rss_mib": usage.ru_maxrss / 1024, "high_water": high_water,  # ru_maxrss is KiB on Linux
            "resident": [(when, mib) for when, mib in resident if mib is not None]}


def failure_reason(status, log_path):
    """The script's one-line error (exit status 2: an unknown flag, or settings it refuses), or the last error line
    of its output."""
    with open(log_path, errors="replace") as file:
        lines = [line.strip() for line in file if line.strip()]
    error_lines = [line for line in lines if "error:" in line.lower()]
    if status == 2 and error_lines:
        unknown_flag = "unrecognized arguments" in error_lines[0]
        return f"n/a ({'flag not supported' if unknown_flag else 'refused'}: {error_lines[0]})"
    return f"failed (exit {status}: {(error_lines or lines or [''])[-1][:200]}; see {log_path})"


def logged_step_times(logs_dir, tag):
    """(step, wall time) of every `tag` scalar in the TensorBoard event files under `logs_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    for event_file in sorted(glob.glob(os.path.join(logs_dir, "**", "events.out.tfevents.*"), recursive=True)):
        events = EventAccumulator(event_file, size_guidance={SCALARS: 0}).Reload()
        if tag in events.Tags()["scalars"]:
            return [(event.step, event.wall_time) for event in events.Scalars(tag)]
    return []


def run_script(args, script, variant, suffix=""):
    """Train once; return a dict of measurements, or {"error": ...}."""
    name = f"{script}-{variant}{suffix}"
    output_dir = os.path.join(args.work_dir, "runs", name)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.makedirs(output_dir)
    log_path = os.path.join(args.work_dir, "runs", f"{name}.log")
    cuda_peak_file = os.path.join(output_dir, "cuda-peak.json") if args.device == "cuda" else None
    flags = variant_flags(script, variant, cache_folder(args, script, variant), args.bnb_configs, args.device)
    repo = args.baseline_repo if variant == BEFORE else args.repo
    command = script_command(repo, script, model_for(args, script), args.data, output_dir, args.steps, flags)
    log(f"{name}: {' '.join(command)}")
    env = child_env(args.threads, args.device, cuda_peak_file)
    if script in BIG_MODEL_ROWS:
        # Every allocation of 64 KiB or more gets its own mapping, returned to the system when freed: the resident set
        # then follows the live tensors (glibc's default raises that threshold to the largest block freed, e.g. a
        # weight freed after quantizing, and keeps later blocks' memory after they are freed).
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    run = run_measured(command, env, log_path)
    if run["status"] != 0:
        return {"error": failure_reason(run["status"], log_path)}
    times = logged_step_times(os.path.join(output_dir, "logs"), SCRIPTS[script]["loss_tag"])
    if len(times) < 2:
        return {"error": f"fewer than 2 logged `{SCRIPTS[script]['loss_tag']}` steps in {output_dir}/logs"}
    # The median over the logging intervals: a 2-core machine's occasional stall moves one interval, not the figure.
    seconds_per_step = statistics.median(
        (later_time - time_) / (later_step - step) for (step, time_), (later_step, later_time) in zip(times, times[1:])
    )
    (first_step, first_time), last_time = times[0], times[-1][1]
    during_training = [peak for sampled, peak in run["high_water"] if sampled <= last_time]
    result = {"s_per_step": seconds_per_step, "startup_s": first_time - run["started"] - first_step * seconds_per_step,
              "wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"], "peak_mib": run["peak_rss_mib"],
              "training_peak_mib": during_training[-1] if during_training else None}
    if script in BIG_MODEL_ROWS:
        steady = [mib for sampled, mib in run["resident"] if first_time <= sampled <= last_time]
        result["steady_training_peak_mib"] = max(steady) if steady else None
        with open(log_path, errors="replace") as file:
            footprint = FROZEN_FOOTPRINT.search(file.read())
        result["bytes_per_frozen_parameter"] = float(footprint.group(1)) if footprint else None
    if cuda_peak_file:
        if not os.path.exists(cuda_peak_file):
            return {"error": f"no CUDA peak written (did the run use CUDA?); see {log_path}"}
        with open(cuda_peak_file) as file:
            result.update(json.load(file))
        # On CUDA the device's peak is what matters; the host's stay in the JSON only.
        result["host_training_peak_mib"] = result.pop("training_peak_mib")
        result["peak_mib"], result["training_peak_mib"] = result["cuda_peak_allocated_mib"], None
    log(f"{name}: {seconds_per_step:.3f} s/step, training peak {cell(result['training_peak_mib'], '.0f')} MiB, "
        f"whole-run peak {result['peak_mib']:.0f} MiB, startup {result['startup_s']:.1f} s")
    return result


# The script's log line about its frozen denoiser (train_dreambooth_lora.py, trainkit.big_models.describe_footprint).
FROZEN_FOOTPRINT = re.compile(r"Frozen \w+(?: \(quantized\))?: [\d.]+M parameters in [\d.]+ MiB \(([\d.]+) bytes per "
                              r"parameter\)")


def cache_folder(args, script, variant):
    if variant in BIG_MODEL_VARIANTS:  # one cache for every memory mode: the same VAE and text encoders
        return os.path.join(args.work_dir, "feature-cache", script)
    return os.path.join(args.work_dir, "feature-cache", f"{script}-{variant}")


def measure_variant(args, script, variant, first_round):
    """One round of a variant. A cached variant's first round first fills an emptied cache (that run's startup is the
    cost of filling), then trains again on the filled cache: that second run is the one measured; later rounds only
    train on the filled cache."""
    if variant not in ("cached", "buckets_cached") or not first_round:
        return run_script(args, script, variant)
    shutil.rmtree(cache_folder(args, script, variant), ignore_errors=True)
    filling = run_script(args, script, variant, suffix="-fill")
    if "error" in filling:
        return filling
    measured = run_script(args, script, variant)
    measured["fill_startup_s"] = filling["startup_s"]
    return measured


def model_for(args, script):
    return args.models[SCRIPTS[script].get("model", "sd")]


def run_floor(args, script):
    command = [sys.executable, os.path.abspath(__file__), "--floor", script, "--model", model_for(args, script),
               "--steps", str(args.steps), "--device", args.device]
    log_path = os.path.join(args.work_dir, "runs", f"{script}-floor.log")
    log(f"{script} floor")
    run = run_measured(command, child_env(args.threads, args.device), log_path)
    if run["status"] != 0:
        return {"error": failure_reason(run["status"], log_path)}
    with open(log_path) as file:
        result = json.loads([line for line in file if line.startswith("{")][-1])
    # The floor process only trains: its whole-run peak is its training peak.
    result["peak_mib"] = result.get("cuda_peak_allocated_mib", run["peak_rss_mib"])
    log(f"{script} floor: {result['s_per_step']:.3f} s/step, peak {result['peak_mib']:.0f} MiB")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# The floor: the trained network's own step, one function per script building (trained parameters, loss function)
# ----------------------------------------------------------------------------------------------------------------------


def fixed_batch(device, cross_attention_dim, latent_channels=4):
    """One batch of the shapes the scripts train on, random (the values do not change the time)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    latent_size = RESOLUTION // 8
    batch = {
        "latents": torch.randn(BATCH_SIZE, latent_channels, latent_size, latent_size, generator=generator),
        "target": torch.randn(BATCH_SIZE, 4, latent_size, latent_size, generator=generator),
        "text_embeddings": torch.randn(BATCH_SIZE, TEXT_LENGTH, cross_attention_dim, generator=generator),
        "timesteps": torch.randint(0, 1000, (BATCH_SIZE,), generator=generator),
        "conditioning_image": torch.rand(BATCH_SIZE, 3, RESOLUTION, RESOLUTION, generator=generator),
    }
    return {key: value.to(device) for key, value in batch.items()}


def load_unet(model, device):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)


def mse(prediction, batch):
    import torch.nn.functional as F

    return F.mse_loss(prediction.float(), batch["target"], reduction="mean")


def added_conditions(unet, device):
    """The UNet's `added_cond_kwargs`: for an SDXL UNet (addition_embed_type "text_time") a random pooled text
    embedding and the time ids of the bench images (original 128x160, centre crop 16 px from the left, target
    128x128), as the scripts compute them; None for an SD UNet, which takes none."""
    import torch

    if unet.config.addition_embed_type != "text_time":
        return None
    pooled_size = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    width, height = IMAGE_SIZE
    added = {"text_embeds": torch.randn(BATCH_SIZE, pooled_size, generator=torch.Generator().manual_seed(0)),
             "time_ids": torch.tensor([[height, width, 0.0, (width - height) / 2, RESOLUTION, RESOLUTION]]
                                      * BATCH_SIZE, dtype=torch.float32)}
    return {key: value.to(device) for key, value in added.items()}


def unet_loss(unet, batch, added):
    """The loss function of a UNet on the fixed batch, SD or SDXL (`added`: added_conditions)."""
    def loss():
        return mse(unet(batch["latents"], batch["timesteps"], batch["text_embeddings"], added_cond_kwargs=added,
                        return_dict=False)[0], batch)
    return loss


def floor_text_to_image(model, device):
    """The whole UNet trains (SDXL: conditioned on both encoders' hidden states, the pooled embedding, time ids)."""
    unet = load_unet(model, device).train()
    batch = fixed_batch(device, unet.config.cross_attention_dim)
    return list(unet.parameters()), unet_loss(unet, batch, added_conditions(unet, device))


def floor_dreambooth_lora(model, device):
    """Only LoRA adapters on the UNet's attention projections train; the base weights are frozen."""
    from peft import LoraConfig

    unet = load_unet(model, device).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=DREAMBOOTH_LORA_RANK, lora_alpha=DREAMBOOTH_LORA_RANK, init_lora_weights="gaussian",
                                target_modules=DREAMBOOTH_LORA_TARGETS))
    unet.train()
    batch = fixed_batch(device, unet.config.cross_attention_dim)
    trained = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    return trained, unet_loss(unet, batch, added_conditions(unet, device))


def floor_controlnet(model, device):
    """A ControlNet made from the UNet trains; the frozen UNet adds its residuals, and the gradient flows back
    through the UNet into them. SDXL: both take the added conditions."""
    from diffusers import ControlNetModel

    unet = load_unet(model, device).requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet).to(device).train()
    batch = fixed_batch(device, unet.config.cross_attention_dim)
    added = added_conditions(unet, device)

    def loss():
        down_residuals, mid_residual = controlnet(
            batch["latents"], batch["timesteps"], encoder_hidden_states=batch["text_embeddings"],
            controlnet_cond=batch["conditioning_image"], added_cond_kwargs=added, return_dict=False,
        )
        prediction = unet(batch["latents"], batch["timesteps"], encoder_hidden_states=batch["text_embeddings"],
                          down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
                          added_cond_kwargs=added, return_dict=False)[0]
        return mse(prediction, batch)
    return list(controlnet.parameters()), loss


def floor_instruct_pix2pix(model, device):
    """The whole UNet trains, its conv_in widened to 8 channels (noisy latents + the original image's latents)."""
    import torch

    unet = load_unet(model, device)
    old = unet.conv_in
    unet.conv_in = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, old.stride, old.padding).to(device)
    unet.train()
    batch = fixed_batch(device, unet.config.cross_attention_dim, latent_channels=8)
    return list(unet.parameters()), unet_loss(unet, batch, added_conditions(unet, device))


def floor_textual_inversion(model, device):
    """Only the text encoder's token embeddings train: the text encoder runs forward from token ids, and the
    gradient flows back through the frozen UNet and the frozen text encoder layers into the embedding matrix.
    (The script trains only the new token's rows; with this vocabulary the whole matrix costs no more.)
    SDXL: both text encoders' embedding matrices train, conditioned as SDXL's encode_prompt does: the penultimate
    hidden states of both side by side, and text_encoder_2's pooled (projected) embedding with the time ids."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = load_unet(model, device).requires_grad_(False)
    added = added_conditions(unet, device)
    parts = [("text_encoder", CLIPTextModel)] + ([("text_encoder_2", CLIPTextModelWithProjection)] if added else [])
    text_encoders = [model_class.from_pretrained(model, subfolder=subfolder).to(device).requires_grad_(False)
                     for subfolder, model_class in parts]
    embeddings = [text_encoder.get_input_embeddings().weight.requires_grad_(True) for text_encoder in text_encoders]
    for text_encoder in text_encoders:
        text_encoder.train()
    batch = fixed_batch(device, unet.config.cross_attention_dim)
    # The bench SDXL model's two tokenizers are the same: one prompt's ids serve both encoders.
    token_ids = torch.randint(0, min(matrix.shape[0] for matrix in embeddings), (BATCH_SIZE, TEXT_LENGTH),
                              generator=torch.Generator().manual_seed(0)).to(device)

    def loss():
        if added is None:
            text_embeddings, conditions = text_encoders[0](token_ids, return_dict=False)[0], None
        else:
            outputs = [text_encoder(token_ids, output_hidden_states=True) for text_encoder in text_encoders]
            text_embeddings = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
            conditions = {**added, "text_embeds": outputs[-1].text_embeds}
        return mse(unet(batch["latents"], batch["timesteps"], text_embeddings, added_cond_kwargs=conditions,
                        return_dict=False)[0], batch)
    return embeddings, loss


def floor_dreambooth_lora_flux(model, device):
    """Only LoRA adapters on the Flux transformer train (the script's default targets in every double- and
    single-stream block, rank 4, alpha 4); the base weights are frozen. The batch is what the script feeds it: the
    16x16 latents packed 2x2 into 64 tokens of 16 channels, T5 hidden states (FLUX_MAX_SEQUENCE_LENGTH tokens), the
    CLIP pooled embedding, the image and text position ids, a flow-matching timestep in [0, 1) and the guidance."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer").to(device)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=DREAMBOOTH_LORA_RANK, lora_alpha=FLUX_LORA_ALPHA,
                                       init_lora_weights="gaussian", target_modules=FLUX_LORA_TARGETS))
    transformer.train()
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    packed_side = RESOLUTION // 8 // 2
    tokens, channels = packed_side * packed_side, config.in_channels
    image_ids = torch.zeros(packed_side, packed_side, 3)
    image_ids[..., 1] = torch.arange(packed_side)[:, None]
    image_ids[..., 2] = torch.arange(packed_side)[None, :]
    batch = {
        "hidden_states": torch.randn(BATCH_SIZE, tokens, channels, generator=generator),
        "target": torch.randn(BATCH_SIZE, tokens, channels, generator=generator),
        "encoder_hidden_states": torch.randn(BATCH_SIZE, FLUX_MAX_SEQUENCE_LENGTH, config.joint_attention_dim,
                                             generator=generator),
        "pooled_projections": torch.randn(BATCH_SIZE, config.pooled_projection_dim, generator=generator),
        "timestep": torch.rand(BATCH_SIZE, generator=generator),
        "img_ids": image_ids.reshape(tokens, 3),
        "txt_ids": torch.zeros(FLUX_MAX_SEQUENCE_LENGTH, 3),
        "guidance": torch.full((BATCH_SIZE,), FLUX_GUIDANCE_SCALE) if config.guidance_embeds else None,
    }
    batch = {key: None if value is None else value.to(device) for key, value in batch.items()}
    inputs = {key: value for key, value in batch.items() if key != "target"}
    trained = [parameter for parameter in transformer.parameters() if parameter.requires_grad]

    def loss():
        return mse(transformer(**inputs, return_dict=False)[0], batch)
    return trained, loss


def floor_dreambooth_lora_qwen_image(model, device):
    """Only LoRA adapters on the Qwen-Image transformer train (the script's default targets in every block, rank 4,
    alpha 4). The batch is what the script feeds it: the 16x16 latents packed 2x2 into 64 tokens of 16 channels, the
    prompt's text states (INSTANCE_PROMPT's own length after the template, no mask: one prompt), img_shapes per
    sample and a flow-matching timestep in [0, 1)."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig
    from transformers import Qwen2Tokenizer

    sys.path.insert(0, THIS_REPO)
    from trainkit.families.qwen_image import FAMILY

    transformer = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer").to(device)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=DREAMBOOTH_LORA_RANK, lora_alpha=QWEN_IMAGE_LORA_ALPHA,
                                       init_lora_weights="gaussian", target_modules=QWEN_IMAGE_LORA_TARGETS))
    transformer.train()
    config = transformer.config
    tokenizer = Qwen2Tokenizer.from_pretrained(model, subfolder="tokenizer")
    text_length = FAMILY.tokenize_prompt(tokenizer, [INSTANCE_PROMPT]).input_ids.shape[1] - 34  # template dropped
    generator = torch.Generator().manual_seed(0)
    side = RESOLUTION // 8 // 2
    tokens, channels = side * side, config.in_channels
    batch = {
        "hidden_states": torch.randn(BATCH_SIZE, tokens, channels, generator=generator),
        "target": torch.randn(BATCH_SIZE, tokens, config.patch_size ** 2 * config.out_channels, generator=generator),
        "encoder_hidden_states": torch.randn(BATCH_SIZE, text_length, config.joint_attention_dim, generator=generator),
        "timestep": torch.rand(BATCH_SIZE, generator=generator),
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    inputs = {key: value for key, value in batch.items() if key != "target"}
    img_shapes = [[(1, side, side)]] * BATCH_SIZE
    trained = [parameter for parameter in transformer.parameters() if parameter.requires_grad]

    def loss():
        return mse(transformer(**inputs, img_shapes=img_shapes, return_dict=False)[0], batch)
    return trained, loss


# One floor function per SD row; a `_sdxl` row uses its SD row's (each works on both models). The Flux row has its
# own.
FLOORS = {
    "text_to_image": floor_text_to_image,
    "dreambooth_lora": floor_dreambooth_lora,
    "controlnet": floor_controlnet,
    "instruct_pix2pix": floor_instruct_pix2pix,
    "textual_inversion": floor_textual_inversion,
    "dreambooth_lora_flux": floor_dreambooth_lora_flux,
    "dreambooth_lora_qwen_image": floor_dreambooth_lora_qwen_image,
    "dreambooth_lora_flux2_klein": floor_dreambooth_lora_flux2_klein,
    "dreambooth_lora_flux2": floor_dreambooth_lora_flux2,
    "dreambooth_lora_sd3": floor_dreambooth_lora_sd3,
    "dreambooth_lora_z_image": floor_dreambooth_lora_z_image,
    # The big-model row: the same transformer step (fp32, unquantized) on its own bigger transformer.
    "dreambooth_lora_flux_big": floor_dreambooth_lora_flux,
}


def measure_floor(script, model, steps, device):
    """Time `steps` optimizer steps of the script's trained network after warm-up; print the result as JSON."""
    import torch

    parameters, loss = FLOORS[base_script(script)](model, device)
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    iteration_times = []
    for iteration in range(FLOOR_WARMUP_STEPS + steps):
        synchronize()
        started = time.perf_counter()
        loss().backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if iteration >= FLOOR_WARMUP_STEPS:
            iteration_times.append(time.perf_counter() - started)
    # The median, as for the scripts' logging intervals.
    result = {"s_per_step": statistics.median(iteration_times),
              "trained_parameters": sum(parameter.numel() for parameter in parameters)}
    if device == "cuda":
        result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------------


def combine_rounds(rounds, floors):
    """One row from a variant's rounds. Times: the fastest round (a shared machine's interference only ever adds
    time, so the minimum is the best estimate of the work's own cost, as `timeit` reports it), and every round's
    s/step; the overhead is the fastest round over the fastest floor. Memory and startup: the median. A failed round
    fails the row."""
    failed = [result for result in rounds if "error" in result]
    if failed:
        return {"error": failed[0]["error"], "floor": floors[0]}
    row = {"s_per_step_rounds": [result["s_per_step"] for result in rounds],
           "s_per_step": min(result["s_per_step"] for result in rounds)}
    for key in ("startup_s", "wall_s", "peak_rss_mib", "peak_mib", "training_peak_mib", "cuda_peak_allocated_mib",
                "host_training_peak_mib", "fill_startup_s", "steady_training_peak_mib",
                "bytes_per_frozen_parameter"):
        values = [result[key] for result in rounds if result.get(key) is not None]
        if values:
            row[key] = statistics.median(values)
    good_floors = [floor for floor in floors if "error" not in floor]
    if not good_floors:
        row["floor"], row["overhead"] = floors[0], None
        return row
    row["floor"] = {"s_per_step": min(floor["s_per_step"] for floor in good_floors),
                    "peak_mib": statistics.median(floor["peak_mib"] for floor in good_floors),
                    "s_per_step_rounds": [floor["s_per_step"] for floor in good_floors]}
    row["overhead"] = 100 * (row["s_per_step"] / row["floor"]["s_per_step"] - 1)
    return row


def cell(value, format_spec):
    return "" if value is None else format(value, format_spec)


def table(rows):
    header = ["script", "variant", "s/step", "s/step per round", "floor s/step", "overhead vs floor",
              "training peak MiB", "floor peak MiB", "whole-run peak MiB", "startup s", "cache-filling startup s",
              "steady training peak MiB", "bytes per frozen denoiser parameter"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        floor = row["floor"]
        floor_time, floor_peak = (None, None) if "error" in floor else (floor["s_per_step"], floor["peak_mib"])
        if "error" in row:
            cells = [row["error"], "", cell(floor_time, ".3f"), "", "", cell(floor_peak, ".0f"), "", "", "", "", ""]
        else:
            overhead = row["overhead"]
            cells = [cell(row["s_per_step"], ".3f"), " ".join(f"{value:.3f}" for value in row["s_per_step_rounds"]),
                     cell(floor_time, ".3f"), "" if overhead is None else f"{overhead:+.0f}%",
                     cell(row["training_peak_mib"], ".0f"),
                     cell(floor_peak, ".0f"), cell(row["peak_mib"], ".0f"), cell(row["startup_s"], ".1f"),
                     cell(row.get("fill_startup_s"), ".1f"), cell(row.get("steady_training_peak_mib"), ".0f"),
                     cell(row.get("bytes_per_frozen_parameter"), ".3f")]
        lines.append("| " + " | ".join([row["script"], row["variant"]] + cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/bench-work", help="Model, datasets, runs and caches (reused).")
    parser.add_argument("--repo", default=THIS_REPO, help="The checkout whose scripts run (default: this one).")
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="Comma-separated, from: " + ",".join(SCRIPTS))
    parser.add_argument("--variants", default=None,
                        help="Comma-separated, from: " + ",".join(VARIANTS) + " (default: base and cached for every "
                             "script, gradient_checkpointing and 8bit_adam for text_to_image, set_grads_to_none for "
                             "controlnet)")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run, and floor iterations.")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Run every floor and variant this many times, round after round, and report the fastest "
                             "round: a shared machine's speed drifts by 20%% or more from one minute to the next.")
    parser.add_argument("--baseline_repo", default=None,
                        help="Another checkout (e.g. `git worktree add /tmp/before COMMIT`) whose scripts also run the "
                             "base variant, in the same rounds, as variant `before`.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP_NUM_THREADS.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    # Internal: the floor measurement, run by the bench itself in a child process.
    parser.add_argument("--floor", choices=list(SCRIPTS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scripts = args.scripts.split(",")
    args.variants = args.variants.split(",") if args.variants else None
    for name in args.scripts:
        if name not in SCRIPTS:
            parser.error(f"--scripts: unknown script {name!r}; choose from {', '.join(SCRIPTS)}")
    for name in args.variants or []:
        if name not in VARIANTS:
            parser.error(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.baseline_repo and not os.path.isdir(args.baseline_repo):
        parser.error(f"--baseline_repo: {args.baseline_repo} is not a folder")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (two logged steps make one measured interval)")
    return args


def main():
    args = parse_args()
    if args.floor:
        return measure_floor(args.floor, args.model, args.steps, args.device)

    args.work_dir, args.repo = os.path.abspath(args.work_dir), os.path.abspath(args.repo)
    os.makedirs(os.path.join(args.work_dir, "runs"), exist_ok=True)
    args.models = {"sd": ensure_built(os.path.join(args.work_dir, "model"), build_bench_model, "bench SD pipeline")}
    if any(SCRIPTS[script].get("model") == "sdxl" for script in args.scripts):
        args.models["sdxl"] = ensure_built(os.path.join(args.work_dir, "model-sdxl"), build_bench_sdxl_model,
                                           "bench SDXL pipeline")
    if any(SCRIPTS[script].get("model") == "flux" for script in args.scripts):
        args.models["flux"] = ensure_built(os.path.join(args.work_dir, "model-flux"), build_bench_flux_model,
                                           "bench Flux pipeline")
    if any(SCRIPTS[script].get("model") == "qwen_image" for script in args.scripts):
        args.models["qwen_image"] = ensure_built(os.path.join(args.work_dir, "model-qwen-image"),
                                                 build_bench_qwen_image_model, "bench Qwen-Image pipeline")
    if any(SCRIPTS[script].get("model") == "flux2" for script in args.scripts):
        args.models["flux2"] = ensure_built(os.path.join(args.work_dir, "model-flux2"), build_bench_flux2_model,
                                            "bench FLUX.2 [dev] pipeline")
    if any(SCRIPTS[script].get("model") == "flux2_klein" for script in args.scripts):
        args.models["flux2_klein"] = ensure_built(os.path.join(args.work_dir, "model-flux2-klein"),
                                                  build_bench_flux2_klein_model, "bench FLUX.2 [klein] pipeline")
    if any(SCRIPTS[script].get("model") == "sd3" for script in args.scripts):
        args.models["sd3"] = ensure_built(os.path.join(args.work_dir, "model-sd3"), build_bench_sd3_model,
                                          "bench SD3 pipeline")
    if any(SCRIPTS[script].get("model") == "z_image" for script in args.scripts):
        args.models["z_image"] = ensure_built(os.path.join(args.work_dir, "model-z-image"), build_bench_z_image_model,
                                              "bench Z-Image pipeline")
    args.bnb_configs = {}
    if any(SCRIPTS[script].get("model") == "flux_big" for script in args.scripts):
        args.models["flux_big"] = ensure_built(
            os.path.join(args.work_dir, "model-flux-big"),
            lambda folder: build_bench_flux_model(folder, **FLUX_BIG_TRANSFORMER), "bench big Flux pipeline")
        for mode, config in BNB_CONFIGS.items():
            args.bnb_configs[mode] = os.path.join(args.work_dir, f"bnb-{mode}.json")
            with open(args.bnb_configs[mode], "w") as file:
                json.dump(config, file)
    args.data = ensure_built(os.path.join(args.work_dir, "data"), build_datasets, "datasets")
    if any(script in MIXED_ROWS for script in args.scripts):
        ensure_built(args.data + "-mixed", build_mixed_dataset, "mixed-aspect data set")

    if args.baseline_repo:
        args.baseline_repo = os.path.abspath(args.baseline_repo)

    pairs = plan(args.scripts, args.variants, with_baseline=args.baseline_repo is not None)
    floors = {script: [] for script, _ in pairs}
    rounds = {pair: [] for pair in pairs}
    for round_index in range(args.rounds):
        log(f"round {round_index + 1} of {args.rounds}")
        for script, variant in pairs:
            if len(floors[script]) == round_index:
                floors[script].append(run_floor(args, script))
            rounds[script, variant].append(measure_variant(args, script, variant, first_round=round_index == 0))
    rows = [{"script": script, "variant": variant, **combine_rounds(rounds[script, variant], floors[script])}
            for script, variant in pairs]
    before = f", before = {args.baseline_repo}" if args.baseline_repo else ""
    print(f"{args.repo}{before} ({args.device}, {args.threads} threads, {args.steps} steps, batch {BATCH_SIZE}, "
          f"{RESOLUTION} px, fastest of {args.rounds} rounds)\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"repo": args.repo, "baseline_repo": args.baseline_repo, "device": args.device,
                       "threads": args.threads, "steps": args.steps, "rounds": args.rounds, "rows": rows}, file,
                      indent=1)


if __name__ == "__main__":
    main()
