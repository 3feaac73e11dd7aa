#!/usr/bin/env python
"""Fine-tune the UNet of a Stable Diffusion or SDXL pipeline on images with captions: full fine-tuning (optional EMA),
or with `--rank N` LoRA adapters on the UNet (and with --train_text_encoder on the text encoder(s)).

A drop-in replacement for diffusers' `examples/text_to_image/train_text_to_image.py` and, given an SDXL base model,
for `train_text_to_image_sdxl.py`: the same flags and defaults, the same output layout (a `StableDiffusionPipeline`
or `StableDiffusionXLPipeline` folder in `--output_dir`, `checkpoint-N/` folders), plus `--config`,
`--logging_steps`, exact resume, atomic checkpoints, preemption handling, a plain folder of images with `name.txt`
captions as data, and the raw (non-EMA) weights kept in `unet_raw/` when `--use_ema` is on.

`--rank N` switches to LoRA mode, a drop-in replacement for `train_text_to_image_lora.py` and (SDXL)
`train_text_to_image_lora_sdxl.py` with `--rank` added: the frozen UNet and text encoders run in the training dtype,
the adapters train in fp32, and `--output_dir` receives `pytorch_lora_weights.safetensors` (rank and alpha in its
metadata) for `pipe.load_lora_weights(output_dir)`; every checkpoint holds the same file.

    accelerate launch train_text_to_image.py --pretrained_model_name_or_path ./sd-folder \\
        --train_data_dir ./captioned-images --resolution 512 --use_ema --output_dir sd-finetuned
"""

import collections
import math
import os
from datetime import timedelta

import numpy as np
import torch
from PIL import Image

from trainkit import bucketing, checkpointing, cli, distributed, families, feature_cache, lora, objectives, randomness
from trainkit.cli import InputError
from trainkit.families import loading

# Independent random streams, derived from the run seed (see randomness.derive_seed).
SHUFFLE_STREAM, AUGMENT_STREAM, NOISE_STREAM, SUBSET_STREAM, VALIDATION_STREAM, EMPTY_PROMPT_STREAM = 1, 2, 3, 4, 5, 6
LORA_INIT_STREAM, LORA_DROPOUT_STREAM = 7, 8
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# The batch keys of each tokenizer's token ids, in the family's tokenizer order (a second tokenizer's ids go under
# the second name).
INPUT_IDS = ("input_ids", "input_ids_2")
# The families this script trains, each with the flags whose upstream default differs between
# train_text_to_image.py and train_text_to_image_sdxl.py; under "lora", the values of LoRA mode (--rank) where
# train_text_to_image_lora.py / train_text_to_image_lora_sdxl.py differ from those (see mode_defaults).
FAMILY_DEFAULTS = {
    "sd": {"resolution": 512, "output_dir": "sd-model-finetuned", "validation_epochs": 5,
           "tracker_project_name": "text2image-fine-tune",
           "lora": {"output_dir": "sd-model-finetuned-lora", "validation_epochs": 1}},
    "sdxl": {"resolution": 1024, "output_dir": "sdxl-model-finetuned", "validation_epochs": 1,
             "tracker_project_name": "text2image-fine-tune-sdxl",
             "lora": {"output_dir": "sd-model-finetuned-lora", "validation_epochs": 1,
                      "tracker_project_name": "text2image-fine-tune"}},
}
# Upstream's LoRA targets in the UNet (train_text_to_image_lora*.py): the attention projections.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# Flags of full fine-tuning only (refused with --rank), and of LoRA mode only (refused without it).
FULL_FINE_TUNE_FLAGS = ("use_ema", "offload_ema", "foreach_ema", "non_ema_revision")
LORA_FLAGS = ("lora_alpha", "lora_layers", "lora_dropout", "use_dora", "train_text_encoder", "output_kohya_format")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
# The names upstream takes from torchvision's InterpolationMode, mapped to PIL (torchvision is not required here).
INTERPOLATION_MODES = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
    "nearest": Image.NEAREST,
    "nearest_exact": Image.NEAREST,
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Where an image's loss mask is (--masked_loss), besides a `name.mask.png` path: its alpha channel, or the
# --mask_column cell of its row.
MASK_FROM_ALPHA, MASK_FROM_COLUMN = "alpha channel", "mask column"


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Fine-tune a Stable Diffusion UNet on captioned images.")
    add = parser.add_argument
    # Model (upstream)
    add("--pretrained_model_name_or_path", type=str, required=True,
        help="A Stable Diffusion pipeline folder or hub id (tokenizer/, text_encoder/, vae/, unet/, scheduler/). An "
             "SDXL pipeline (with tokenizer_2/ and text_encoder_2/) trains SDXL.")
    add("--pretrained_vae_model_name_or_path", type=str, default=None,
        help="A VAE folder or hub id to use instead of the pipeline's, e.g. an fp16-safe SDXL VAE (without one the "
             "SDXL VAE runs in fp32, as upstream). The saved pipeline holds this VAE.")
    add("--revision", type=str, default=None, help="Hub revision of the pretrained model.")
    add("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    add("--non_ema_revision", type=str, default=None,
        help="Revision of the UNet to train (the EMA copy starts from --revision). Defaults to --revision. Full "
             "fine-tuning only.")
    add("--prediction_type", type=str, default=None,
        help="epsilon or v_prediction; default: the pretrained scheduler's prediction type.")
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention.")
    add("--enable_npu_flash_attention", action="store_true", help="Flash attention on Ascend NPUs (needs torch_npu).")
    # Data (upstream)
    add("--dataset_name", type=str, default=None,
        help="A dataset on the hub, or a local dataset folder (parquet/arrow/imagefolder/save_to_disk).")
    add("--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several.")
    add("--train_data_dir", type=str, default=None,
        help="An imagefolder with metadata.jsonl/metadata.csv captions, or a folder of images where an optional "
             "name.txt beside name.png holds the caption. Ignored if --dataset_name is given.")
    add("--image_column", type=str, default="image", help="The dataset column that holds the images.")
    add("--caption_column", type=str, default="text",
        help="The dataset column that holds a caption or a list of captions (one is picked at random).")
    add("--max_train_samples", type=int, default=None, help="Train on a random subset of this many examples.")
    add("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    add("--resolution", type=int, default=None,
        help="Images are resized and cropped to this square size (default 512; SDXL 1024), or with "
             "--use_aspect_ratio_buckets to buckets of about this many pixels squared.")
    add("--center_crop", action="store_true", help="Crop the centre instead of a random square.")
    add("--random_flip", action="store_true", help="Flip images horizontally at random.")
    add("--image_interpolation_mode", type=str, default="lanczos", choices=sorted(INTERPOLATION_MODES),
        help="The filter used to resize images.")
    add("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses; 0 loads in the main one.")
    # Training (upstream)
    add("--output_dir", type=str, default=None,
        help="Where the pipeline (LoRA mode: the LoRA weights) and checkpoints go (default sd-model-finetuned; SDXL "
             "sdxl-model-finetuned; LoRA mode sd-model-finetuned-lora, as upstream's LoRA scripts).")
    add("--seed", type=int, default=None, help="Seed for data order, augmentation, noise and validation images.")
    add("--train_batch_size", type=int, default=16, help="Batch size per device.")
    add("--num_train_epochs", type=int, default=100)
    add("--max_train_steps", type=int, default=None, help="Stop after this many optimizer steps (overrides epochs).")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet backward.")
    add("--learning_rate", type=float, default=1e-4,
        help="Initial learning rate (1e-4, as upstream's full fine-tuning and LoRA scripts alike).")
    add("--scale_lr", action="store_true",
        help="Multiply the learning rate by processes x accumulation steps x batch size.")
    add("--lr_scheduler", type=str, default="constant", help=f"One of {', '.join(LR_SCHEDULERS)}.")
    add("--lr_warmup_steps", type=int, default=500)
    add("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (recommended 5.0).")
    add("--proportion_empty_prompts", type=float, default=0,
        help="Train this fraction of the examples with an empty caption (drawn per example and epoch).")
    add("--timestep_bias_strategy", type=str, default="none", choices=objectives.TIMESTEP_BIAS_STRATEGIES,
        help="Sample timesteps more (or less) often: the earlier or later --timestep_bias_portion of them, or "
             "[--timestep_bias_begin, --timestep_bias_end) for range.")
    add("--timestep_bias_multiplier", type=float, default=1.0,
        help="The weight of the biased timesteps (2.0 doubles how often they are drawn, 0.5 halves it).")
    add("--timestep_bias_begin", type=int, default=0, help="First biased timestep with --timestep_bias_strategy range.")
    add("--timestep_bias_end", type=int, default=1000,
        help="End (exclusive) of the biased timesteps with --timestep_bias_strategy range.")
    add("--timestep_bias_portion", type=float, default=0.25,
        help="The fraction of the timesteps biased by --timestep_bias_strategy earlier or later, in (0, 1].")
    add("--dream_training", action="store_true",
        help="DREAM training (https://arxiv.org/abs/2312.00210): one extra forward pass per step, epsilon only.")
    add("--dream_detail_preservation", type=float, default=1.0, help="DREAM's detail preservation factor p (> 0).")
    add("--noise_offset", type=float, default=0, help="Scale of offset noise.")
    add("--input_perturbation", type=float, default=0, help="Scale of input perturbation (recommended 0.1).")
    add("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    add("--use_ema", action="store_true",
        help="Keep an EMA of the UNet weights; the final pipeline holds the EMA. Full fine-tuning only.")
    add("--offload_ema", action="store_true",
        help="Keep the EMA weights in CPU memory between updates. Full fine-tuning only.")
    add("--foreach_ema", action="store_true",
        help="Update the EMA with torch's faster foreach kernels. Full fine-tuning only.")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-08)
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Default: accelerate's config. The frozen VAE and text encoder run in this precision; the UNet "
             "weights stay fp32.")
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help="A checkpoint-N folder (name in --output_dir, or path) or 'latest' to continue training from.")
    # Validation, logging and hub (upstream)
    add("--validation_prompts", type=str, default=None, nargs="+",
        help="Prompts rendered every --validation_epochs epochs and after training, logged to --report_to.")
    add("--validation_prompt", type=str, default=None,
        help="A prompt rendered --num_validation_images times at each validation (upstream SDXL's flag; with "
             "--validation_prompts, both are rendered).")
    add("--num_validation_images", type=int, default=4, help="How many images of --validation_prompt to render.")
    add("--validation_epochs", type=int, default=None,
        help="Render the validation prompts every N epochs (default 5; SDXL and LoRA mode 1).")
    add("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, comet_ml or all.")
    add("--tracker_project_name", type=str, default=None,
        help="Default text2image-fine-tune; SDXL text2image-fine-tune-sdxl (LoRA mode: text2image-fine-tune).")
    add("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    add("--push_to_hub", action="store_true")
    add("--hub_token", type=str, default=None)
    add("--hub_model_id", type=str, default=None)
    add("--local_rank", type=int, default=-1, help="Set by the launcher; not needed with accelerate launch.")
    add("--debug_loss", action="store_true",
        help="Also log each step's loss under loss_for_<file name> for every image of the batch whose file name is "
             "known (upstream SDXL LoRA's flag).")
    # LoRA mode (upstream train_text_to_image_lora.py / train_text_to_image_lora_sdxl.py: --rank, --train_text_encoder)
    add("--rank", type=int, default=None,
        help="Train LoRA adapters of this rank (upstream's LoRA scripts: 4) on the UNet's attention projections "
             "instead of the whole UNet; without it, full fine-tuning.")
    add("--train_text_encoder", action="store_true",
        help="LoRA mode: also train LoRA adapters on the text encoder (SDXL: both text encoders).")
    add("--lora_alpha", type=int, default=None,
        help="LoRA mode: LoRA alpha (the update is scaled by alpha / rank); default --rank, as upstream.")
    add("--lora_layers", type=str, default=None,
        help="LoRA mode: comma-separated UNet module names to adapt (peft target_modules, matched as name "
             "suffixes), e.g. 'attn2.to_k,attn2.to_v'; default upstream's to_k,to_q,to_v,to_out.0.")
    add("--lora_dropout", type=float, default=None, help="LoRA mode: dropout probability of the LoRA layers (0).")
    add("--use_dora", action="store_true",
        help="LoRA mode: weight-decomposed LoRA (DoRA, https://arxiv.org/abs/2402.09353); the saved file holds the "
             "trained magnitude vectors and load_lora_weights reads them.")
    add("--output_kohya_format", action="store_true",
        help="LoRA mode: also write pytorch_lora_weights_kohya.safetensors, the key layout of kohya, A1111 and "
             "ComfyUI.")
    # Additions
    add("--logging_steps", type=int, default=10,
        help="Log the mean loss every N optimizer steps (the loss is not read back from the device in between).")
    add("--validation_inference_steps", type=int, default=20, help="Denoising steps for validation images.")
    add("--cache_latents", action="store_true",
        help="Encode every image with the VAE once (both orientations with --random_flip), keep the latent "
             "distributions on disk under --feature_cache_dir, reuse them in later runs, and train without the VAE "
             "in memory. Needs --center_crop: a random crop cannot be cached.")
    add("--cache_text_embeddings", action="store_true",
        help="Encode every caption with the text encoder once, keep the embeddings on disk under "
             "--feature_cache_dir, reuse them in later runs, and train without the text encoder in memory.")
    add("--feature_cache_dir", type=str, default=None,
        help="Where --cache_latents and --cache_text_embeddings keep their files (default: $DIFFUSION_TRAINING_CACHE "
             "or ~/.cache/diffusion-training). Entries are keyed by the images, captions, model weights, resolution "
             "and transforms, so one folder serves any number of runs; deleting it is always safe.")
    # Real datasets (SPEC §9): aspect-ratio buckets, validation size, masked loss
    bucketing.add_bucket_arguments(parser)
    bucketing.add_mask_arguments(parser, column=True)
    args = cli.parse_args_with_config(parser, argv)
    check_mode_flags(args)
    if args.non_ema_revision is None:
        args.non_ema_revision = args.revision
    if args.feature_cache_dir is None:
        args.feature_cache_dir = feature_cache.default_feature_cache_dir()
    # The base model's family decides the model-specific steps and fills the flags its upstream script defaults
    # differently.
    args.family = families.select(args, mode_defaults(lora_mode(args)), "train_text_to_image.py")
    if lora_mode(args):
        args.lora_alpha = args.rank if args.lora_alpha is None else args.lora_alpha
        args.lora_dropout = 0.0 if args.lora_dropout is None else args.lora_dropout
    return args


def lora_mode(args):
    """LoRA mode: --rank given."""
    return getattr(args, "rank", None) is not None


def mode_defaults(with_lora):
    """FAMILY_DEFAULTS' rows for the mode: in LoRA mode a row's "lora" values replace its full fine-tune ones."""
    return {name: {**{flag: value for flag, value in row.items() if flag != "lora"},
                   **(row["lora"] if with_lora else {})}
            for name, row in FAMILY_DEFAULTS.items()}


def check_mode_flags(args):
    """Full fine-tuning's flags are refused with --rank, LoRA mode's without it, in one line. Raises InputError."""
    def given(name):
        value = getattr(args, name)
        return value is not None and value is not False

    if lora_mode(args):
        for name in FULL_FINE_TUNE_FLAGS:
            if given(name):
                raise InputError(f"--{name} applies to full fine-tuning only; LoRA mode (--rank {args.rank}) trains "
                                 "adapters on the frozen UNet (drop --rank to fine-tune the whole UNet)")
    else:
        for name in LORA_FLAGS:
            if given(name):
                raise InputError(f"--{name} applies to LoRA mode only: add --rank N (upstream's LoRA scripts use 4) "
                                 "to train LoRA adapters")


def validate_args(args):
    """Every check that needs no model or dataset loaded. Raises InputError."""
    cli.require_positive(
        args, "resolution", "train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps",
        "learning_rate", "checkpointing_steps", "checkpoints_total_limit", "max_train_samples", "validation_epochs",
        "logging_steps", "validation_inference_steps", "dream_detail_preservation", "rank", "lora_alpha",
    )
    args.lora_targets = None
    if lora_mode(args):
        if not 0 <= args.lora_dropout < 1:
            raise InputError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
        if args.train_text_encoder and args.cache_text_embeddings:
            raise InputError("--cache_text_embeddings cannot be used with --train_text_encoder: the text encoder "
                             "trains, so its embeddings change every step")
        if args.train_text_encoder:
            cli.check_compatible_versions("text-encoder LoRA")
    for name in ("lr_warmup_steps", "dataloader_num_workers", "noise_offset", "input_perturbation", "max_grad_norm",
                 "num_validation_images"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(args, name)}")
    cli.require_multiple_of_8("--resolution", args.resolution)
    bucketing.check_bucket_flags(args)
    if args.mask_column is not None and not args.masked_loss:
        raise InputError("--mask_column applies only with --masked_loss")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise InputError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    objectives.check_timestep_bias(args.timestep_bias_strategy, args.timestep_bias_multiplier, args.timestep_bias_begin,
                                   args.timestep_bias_end, args.timestep_bias_portion)
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise InputError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise InputError(f"--lr_scheduler {args.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if args.prediction_type is not None and args.prediction_type not in PREDICTION_TYPES:
        raise InputError(f"--prediction_type {args.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if args.dream_training and args.prediction_type == "v_prediction":
        raise InputError("--dream_training supports only --prediction_type epsilon")
    if args.validation_prompts is not None and not all(prompt.strip() for prompt in args.validation_prompts):
        raise InputError("--validation_prompts: a prompt is empty")
    if args.validation_prompt is not None and not args.validation_prompt.strip():
        raise InputError("--validation_prompt is empty")
    if args.cache_latents and not args.center_crop:
        raise InputError("--cache_latents needs --center_crop: a random crop changes every epoch and cannot be cached")
    if (args.cache_latents or args.cache_text_embeddings) and os.path.isfile(args.feature_cache_dir):
        raise InputError(f"--feature_cache_dir {args.feature_cache_dir!r} is a file, not a folder")

    args.family.check_folder(args.pretrained_model_name_or_path)
    if lora_mode(args):
        lora.check_lora_layers(args)  # needs the folder's UNet config
    vae_path = args.pretrained_vae_model_name_or_path
    if vae_path is not None:
        cli.check_local_or_hub_id("--pretrained_vae_model_name_or_path", vae_path)
        if os.path.isdir(vae_path) and not os.path.isfile(os.path.join(vae_path, "config.json")):
            raise InputError(f"--pretrained_vae_model_name_or_path {vae_path!r} is not a VAE folder (no config.json)")
    if args.dataset_name is None and args.train_data_dir is None:
        raise InputError(
            "give --dataset_name (a hub id or a local dataset folder) or --train_data_dir (a folder of images)"
        )
    if args.dataset_name is not None:
        cli.check_local_or_hub_id("--dataset_name", args.dataset_name)
    elif not os.path.isdir(args.train_data_dir):
        raise InputError(f"--train_data_dir {args.train_data_dir!r} is not a folder")
    elif not any(cli.image_files(args.train_data_dir)):
        extensions = ", ".join(cli.IMAGE_EXTENSIONS)
        raise InputError(f"--train_data_dir {args.train_data_dir!r} holds no images ({extensions})")
    elif args.masked_loss:
        # A folder's masks are files: a missing or mis-sized one is reported before anything loads.
        find_masks([{"path": path, "bytes": None} for path in cli.image_files(args.train_data_dir)], None,
                   f"--train_data_dir {args.train_data_dir!r}")

    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir {args.output_dir!r} exists and is not a folder")
    args.resume_path = checkpointing.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_path is not None:
        if lora_mode(args):
            lora.check_checkpoint_matches(args)
        elif not os.path.isdir(os.path.join(args.resume_path, "unet")):
            raise InputError(f"--resume_from_checkpoint {args.resume_path!r} holds no unet/ (a LoRA checkpoint? add "
                             "the --rank it was trained with)")

    reporters = {name.strip() for name in args.report_to.split(",")}
    if reporters & {"wandb", "all"}:
        if args.hub_token is not None:
            raise InputError(
                "--report_to wandb with --hub_token would expose the token in the wandb run; "
                "use `hf auth login` instead"
            )
        if "wandb" in reporters:
            cli.require_package("wandb", "--report_to wandb", "pip install wandb")
    if args.use_8bit_adam:
        cli.require_package("bitsandbytes", "--use_8bit_adam", "pip install bitsandbytes")
    if args.enable_npu_flash_attention:
        import importlib.util

        if importlib.util.find_spec("torch_npu") is None:
            raise InputError("--enable_npu_flash_attention needs an Ascend NPU and the torch_npu package")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise InputError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed "
                "(pip install -r requirements-xformers.txt)"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_captioned_dataset(args):
    """The training examples as a datasets.Dataset with columns `--image_column` and `--caption_column`.

    Sources: a hub dataset or local dataset folder (`--dataset_name`), an imagefolder with a metadata file, or a plain
    folder of images where `name.txt` holds the caption of `name.png` (no .txt: an empty caption). Unreadable images
    are removed with a warning naming them.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    if args.dataset_name:
        flag, source = "--dataset_name", args.dataset_name
    else:
        flag, source = "--train_data_dir", args.train_data_dir
    try:
        if args.dataset_name is None:
            if _has_metadata(source):
                dataset = load_dataset("imagefolder", data_dir=source, cache_dir=args.cache_dir)
            else:
                dataset = _folder_with_text_captions(source, args.image_column, args.caption_column)
        elif any(os.path.isfile(os.path.join(source, name)) for name in ("state.json", "dataset_dict.json")):
            dataset = load_from_disk(source)
        else:
            dataset = load_dataset(source, args.dataset_config_name, cache_dir=args.cache_dir,
                                   data_dir=args.train_data_dir)
    except InputError:
        raise
    except Exception as error:  # datasets raises many types; the user needs the source and the reason
        raise InputError(f"{flag} {source!r}: cannot load the dataset ({cli.first_line(error)})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise InputError(f"{flag} {source!r} has no 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]

    columns = dataset.column_names
    wanted = [("--image_column", args.image_column), ("--caption_column", args.caption_column)]
    if args.mask_column is not None:
        wanted.append(("--mask_column", args.mask_column))
    for column_flag, column in wanted:
        if column not in columns:
            raise InputError(f"{column_flag} {column!r} is not a column of {source!r}; columns: {', '.join(columns)}")
    _check_caption_feature(dataset.features[args.caption_column], args.caption_column, source)
    if args.mask_column is not None and type(dataset.features[args.mask_column]).__name__ != "Image":
        raise InputError(f"--mask_column {args.mask_column!r} of {source!r} holds "
                         f"{dataset.features[args.mask_column]}; expected images")
    dataset = dataset.select_columns([column for _, column in wanted])
    if len(dataset) == 0:
        raise InputError(f"{flag} {source!r} holds no examples")
    return cli.drop_unreadable_images(dataset, args.image_column, flag, source)


def _has_metadata(folder):
    return any(name in METADATA_FILES for _, _, files in os.walk(folder) for name in files)


def _folder_with_text_captions(folder, image_column, caption_column):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    paths = list(cli.image_files(folder))
    captions = []
    for path in paths:
        caption_file = os.path.splitext(path)[0] + ".txt"
        if os.path.isfile(caption_file):
            with open(caption_file, encoding="utf-8") as file:
                captions.append(file.read().strip())
        else:
            captions.append("")
    uncaptioned = captions.count("")
    if uncaptioned:
        cli.logger.warning(f"{uncaptioned} of {len(paths)} images in {folder} have no caption (.txt): empty prompt")
    features = Features({image_column: ImageFeature(), caption_column: Value("string")})
    return Dataset.from_dict({image_column: paths, caption_column: captions}, features=features)


def _check_caption_feature(feature, column, source):
    """Captions must be text or lists of text; anything else is reported before training starts."""
    from datasets import Value

    inner = feature
    if isinstance(feature, list) and feature:
        inner = feature[0]
    elif type(feature).__name__ in ("List", "LargeList", "Sequence"):
        inner = feature.feature
    if not (isinstance(inner, Value) and inner.dtype in ("string", "large_string")):
        raise InputError(
            f"--caption_column {column!r} of {source!r} holds {feature}; expected text or lists of text"
        )


def resized_size(width, height, resolution):
    """(width, height) of an image resized so that its short side is `resolution`."""
    return bucketing.cover_size(width, height, resolution, resolution)


# One preprocessed image: the pixels, SDXL's micro-conditioning (original (height, width), crop (top, left) in the
# resized image) and the latent-grid loss weights (--masked_loss; None without).
Processed = collections.namedtuple("Processed", "pixels original_size crop_top_left mask")


def preprocess_image(image, size, interpolation, center_crop, random_flip, generator, mask=None):
    """PIL image -> Processed: pixels a (3, height, width) float tensor in [-1, 1] at `size` ((height, width), or
    one int for a square): resized to cover it, cropped, maybe flipped. The crop is seen in the flipped image when
    flipped. `mask` (an 'L' image of the image's size) follows the same resize, crop and flip, down to the latent
    grid. Random choices come from `generator` (left, top, flip, as always) so that they are reproducible per sample
    and epoch."""
    target_height, target_width = (size, size) if isinstance(size, int) else size
    image = image.convert("RGB")
    original_size = (image.height, image.width)
    resized = bucketing.cover_size(image.width, image.height, target_height, target_width)
    image = image.resize(resized, resample=interpolation)
    width, height = image.size
    top, left = bucketing.crop_origin(width, height, target_height, target_width, center_crop, generator)
    box = (left, top, left + target_width, top + target_height)
    image = image.crop(box)
    flip = random_flip and torch.rand(1, generator=generator).item() < 0.5
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = width - left - target_width
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    weights = None if mask is None else mask_weights(mask, resized, box, flip)
    return Processed((pixels * 2.0 - 1.0).contiguous(), original_size, (top, left), weights)


def mask_weights(mask, resized, box, flip):
    """An 'L' mask resized (bilinear: values stay in [0, 1]), cropped to `box` and maybe flipped like its image,
    averaged over the VAE's 8x8 blocks: a (1, height / 8, width / 8) tensor, one weight per latent pixel."""
    mask = mask.resize(resized, resample=Image.BILINEAR).crop(box)
    if flip:
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
    return bucketing.mask_to_latents(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None], 8)


def survey_images(dataset, args):
    """{"buckets": each row's (height, width) bucket or None, "masks": each row's mask source or None}, read from
    the image headers only (nothing is decoded), so that bucketed batches can be formed and a missing or mis-sized
    mask is reported before training starts. Square runs without --masked_loss read nothing."""
    from datasets import Image as ImageFeature

    if args.buckets is None and not args.masked_loss:
        return {"buckets": None, "masks": None}
    cells = dataset.cast_column(args.image_column, ImageFeature(decode=False))
    if args.mask_column is not None:
        cells = cells.cast_column(args.mask_column, ImageFeature(decode=False))
    columns = [args.image_column] + ([args.mask_column] if args.mask_column is not None else [])
    buckets, masks = [], []
    where = (f"--dataset_name {args.dataset_name!r}" if args.dataset_name
             else f"--train_data_dir {args.train_data_dir!r}")
    # In chunks: a dataset that embeds its images can be larger than memory.
    for start in range(0, len(cells), 1000):
        chunk = cells.select_columns(columns)[start:start + 1000]
        if args.buckets is not None:
            buckets += [args.buckets.assign(*bucketing.image_size(cell)) for cell in chunk[args.image_column]]
        if args.masked_loss:
            masks += find_masks(chunk[args.image_column], chunk.get(args.mask_column), where, check_found=False)
    if args.masked_loss:
        _require_some_mask(masks, where, args.mask_column)
        unmasked = masks.count(None)
        if unmasked:
            cli.logger.warning(f"--masked_loss: {unmasked} of {len(masks)} images of {where} have no mask: "
                                  "trained on the whole image")
    return {"buckets": buckets or None, "masks": masks or None}


def find_masks(image_cells, mask_cells, where, check_found=True, mask_column=None):
    """Each image's mask source (undecoded cells {"bytes", "path"}): MASK_FROM_COLUMN where the --mask_column cell
    holds one, the path of `name.mask.png` beside the image, MASK_FROM_ALPHA, or None (trained unmasked). A mask
    whose size differs from its image's is an InputError naming it; so is no mask at all (with `check_found`)."""
    sources = []
    for index, cell in enumerate(image_cells):
        size = None
        mask_cell = mask_cells[index] if mask_cells is not None else None
        mask_path = bucketing.mask_path_for(cell["path"]) if cell.get("path") else None
        if mask_cell and (mask_cell.get("bytes") or mask_cell.get("path")):
            source, mask_name = MASK_FROM_COLUMN, f"the --mask_column cell of row {index} ({mask_cell.get('path')})"
            size = bucketing.image_size(mask_cell)
        elif mask_path is not None and os.path.isfile(mask_path):
            source, mask_name = mask_path, mask_path
            size = bucketing.image_size({"path": mask_path, "bytes": None})
        else:
            source = MASK_FROM_ALPHA if _has_alpha_channel(cell) else None
        if size is not None and size != bucketing.image_size(cell):
            image_size = bucketing.image_size(cell)
            raise InputError(f"--masked_loss: {mask_name} is {size[1]}x{size[0]} but its image "
                             f"{cell.get('path') or f'row {index}'} is {image_size[1]}x{image_size[0]}; a mask must "
                             "have its image's size")
        sources.append(source)
    if check_found:
        _require_some_mask(sources, where, mask_column)
    return sources


def _has_alpha_channel(cell):
    """From the header only; an unreadable image has none (the dataset check skips it by name)."""
    from io import BytesIO

    try:
        with Image.open(BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
            return bucketing.has_alpha(image)
    except Exception:
        return False


def _require_some_mask(sources, where, mask_column):
    looked = "name.mask.png beside each image, the images' alpha channels"
    if mask_column is not None:
        looked = f"the --mask_column {mask_column!r} cells, " + looked
    if not any(source is not None for source in sources):
        raise InputError(f"--masked_loss: none of the {len(sources)} images of {where} has a mask (looked for "
                         f"{looked})")


def pick_caption(caption, generator):
    """A caption, or one caption of a list chosen with `generator` (restorable, unlike `random.choice`)."""
    if caption is None:
        return ""
    if isinstance(caption, str):
        return caption
    captions = list(caption)
    if not captions:
        return ""
    return str(captions[int(torch.randint(0, len(captions), (1,), generator=generator))])


class CaptionedImages(torch.utils.data.Dataset):
    """Indexed by (epoch, index) from randomness.EpochSampler. The caption choice, crop and flip depend only on the run
    seed, the epoch and the sample index, so they are the same on resume and with any number of workers.

    With `--max_train_samples` the subset is drawn from the run seed too, lazily: a resumed run learns its seed from
    the checkpoint only after the dataset is built.

    Once `use_latent_cache` / `use_text_cache` are called, examples hold the cached latent distribution / text
    embedding instead of pixels / token ids; the random draws stay the same, so the training run does not change.
    Every example also holds its image's original size, crop and target size (SDXL's time ids; SD ignores them).

    `buckets` (from `survey_images`): each row's (height, width) bucket, or None for --resolution squares. `masks`:
    each row's mask source with --masked_loss (examples then hold `loss_mask`), or None."""

    def __init__(self, dataset, tokenizers, args, run_state, buckets=None, masks=None):
        self.dataset, self.tokenizers, self.args, self.run_state = dataset, tokenizers, args, run_state
        self.buckets, self.masks = buckets, masks
        self.size = len(dataset) if args.max_train_samples is None else min(args.max_train_samples, len(dataset))
        self._subset = (None, None)  # (seed, indices)
        self.latent_cache = self.image_keys = None
        self.text_cache = self.caption_keys = None

    def rows(self):
        """The dataset rows this run trains on."""
        return [self._row(index) for index in range(self.size)]

    def target_size(self, row):
        """The (height, width) a row's image trains at: its bucket, or the --resolution square."""
        return tuple(self.buckets[row]) if self.buckets is not None else (self.args.resolution, self.args.resolution)

    def sample_buckets(self):
        """The bucket of each sample (index), for the batch sampler."""
        return [self.target_size(row) for row in self.rows()]

    def loss_mask(self, row, image, example):
        """The 'L' loss mask of a row's decoded `image` (`example`: its row, for --mask_column), or None without
        --masked_loss. An image without a mask trains everywhere (an all-white mask)."""
        if self.masks is None:
            return None
        source = self.masks[row]
        if source is None:
            return Image.new("L", image.size, 255)
        if source == MASK_FROM_ALPHA:
            return bucketing.load_mask(image)
        if source == MASK_FROM_COLUMN:
            return bucketing.load_mask(image, example[self.args.mask_column], name=f"row {row}")
        return bucketing.load_mask(image, source, name=source)

    def use_latent_cache(self, cache, image_keys):
        self.latent_cache, self.image_keys = cache, image_keys
        # The image column is no longer read: skip decoding it.
        self.dataset = self.dataset.select_columns([self.args.caption_column])

    def use_text_cache(self, cache, caption_keys):
        self.text_cache, self.caption_keys = cache, caption_keys

    def token_ids(self, caption):
        """One (max_length,) tensor of token ids per tokenizer."""
        return [ids[0] for ids in self.args.family.tokenize(self.tokenizers, caption)]

    def __len__(self):
        return self.size

    def _row(self, index):
        if self.size == len(self.dataset):
            return index
        seed, indices = self._subset
        if seed != self.run_state.seed:
            rng = np.random.default_rng(randomness.derive_seed(self.run_state.seed, SUBSET_STREAM))
            order = rng.permutation(len(self.dataset))
            indices = order[: self.size].tolist()
            self._subset = (self.run_state.seed, indices)
        return indices[index]

    def __getitem__(self, key):
        epoch, index = key
        generator = randomness.make_generator("cpu", self.run_state.seed, AUGMENT_STREAM, epoch, index)
        a = self.args
        row = self._row(index)
        example = self.dataset[row]
        caption = pick_caption(example[a.caption_column], generator)
        if a.proportion_empty_prompts:
            # A stream of its own: the crops and flips stay those of a run without caption dropout.
            drop = randomness.make_generator("cpu", self.run_state.seed, EMPTY_PROMPT_STREAM, epoch, index)
            if torch.rand(1, generator=drop).item() < a.proportion_empty_prompts:
                caption = ""
        item = {}
        target = self.target_size(row)
        if self.latent_cache is None:
            interpolation = INTERPOLATION_MODES[a.image_interpolation_mode]
            image = example[a.image_column]
            processed = preprocess_image(image, target, interpolation, a.center_crop, a.random_flip, generator,
                                         self.loss_mask(row, image, example))
            item["pixel_values"], original_size, crop = processed[:3]
            if processed.mask is not None:
                item["loss_mask"] = processed.mask
            if getattr(a, "debug_loss", False):  # an image decoded from a file knows its name
                item["filename"] = os.path.basename(getattr(image, "filename", "") or "")
        else:
            # The same draw preprocess_image makes for the flip (a centre crop draws nothing).
            flip = a.random_flip and torch.rand(1, generator=generator).item() < 0.5
            entry = self.latent_cache.load(self.image_keys[row])
            item["latent_dist"] = entry["flipped" if flip else "latent_dist"]
            original_size, crop = entry["original_size"], entry["flipped_crop_top_left" if flip else "crop_top_left"]
            if "loss_mask" in entry:
                item["loss_mask"] = entry["flipped_loss_mask" if flip else "loss_mask"]
        item["original_size"], item["crop_top_left"] = torch.as_tensor(original_size), torch.as_tensor(crop)
        item["target_size"] = torch.as_tensor(target)
        if self.text_cache is None:
            item.update(zip(INPUT_IDS, self.token_ids(caption)))
        else:
            entry = self.text_cache.load(self.caption_keys[caption])
            item["encoder_hidden_states"] = entry["hidden_states"]
            if "pooled_prompt_embeds" in entry:
                item["pooled_prompt_embeds"] = entry["pooled_prompt_embeds"]
        return item


def batch_order(train_dataset, args, run_state):
    """The DataLoader arguments that set the epoch's order: samples shuffled from (seed, epoch) in batches of
    --train_batch_size, or with buckets whole batches of one bucket each (`bucketing.BucketBatchSampler`). The run seed
    is final here (`randomness.run_seed`), so a --max_train_samples subset's buckets are too."""
    if args.buckets is None:
        return {"batch_size": args.train_batch_size,
                "sampler": randomness.EpochSampler(len(train_dataset), run_state, SHUFFLE_STREAM)}
    return {"batch_sampler": bucketing.BucketBatchSampler(train_dataset.sample_buckets(), args.train_batch_size,
                                                       run_state, SHUFFLE_STREAM)}


def all_captions(cells):
    """Every caption a row can be trained with: the caption, or each of a list."""
    for cell in cells:
        if cell is None or isinstance(cell, str):
            yield cell or ""
        else:
            yield from (str(caption) for caption in cell) if len(cell) else [""]


# ----------------------------------------------------------------------------------------------------------------------
# Feature cache: latents and text embeddings computed once, then the VAE / text encoder leave memory
# ----------------------------------------------------------------------------------------------------------------------


def cache_latents(accelerator, train_dataset, vae, args, weight_dtype):
    """Fill the latent cache for the rows this run trains on (split across ranks) and switch the dataset to it.
    Entries are at each image's target size (its bucket with buckets) and hold its size and crop (SDXL's time ids)
    and, with --masked_loss, its latent-grid loss mask; with --random_flip both orientations of each."""
    from datasets import Image as ImageFeature

    cache = feature_cache.FeatureCache(args.feature_cache_dir, "latents",
                                       latent_cache_settings(vae, weight_dtype, args))
    rows = train_dataset.rows()
    # Undecoded cells ({"bytes", "path"}), read in chunks: a dataset that embeds its images can be larger than memory.
    cells = train_dataset.dataset.cast_column(args.image_column, ImageFeature(decode=False))
    image_keys = {}
    for start in range(0, len(rows), 1000):
        chunk = rows[start:start + 1000]
        image_keys.update(zip(chunk, map(feature_cache.image_fingerprint, cells[chunk][args.image_column])))
    image_keys = latent_entry_keys(train_dataset, image_keys, args)
    interpolation = INTERPOLATION_MODES[args.image_interpolation_mode]
    decoder = ImageFeature()

    def encode_one_size(batch_rows, target):
        examples = cells[batch_rows]
        # Decoded exactly as the dataset decodes them, so the latents are those of the uncached run.
        images = [decoder.decode_example(cell) for cell in examples[args.image_column]]
        masks = [train_dataset.loss_mask(row, image, {key: values[i] for key, values in examples.items()})
                 for i, (row, image) in enumerate(zip(batch_rows, images))]
        processed = [preprocess_image(image, target, interpolation, True, False, None, mask)
                     for image, mask in zip(images, masks)]
        pixels = torch.stack([item.pixels for item in processed])
        views = torch.cat([pixels, pixels.flip(-1)]) if args.random_flip else pixels
        parameters = vae.encode(views.to(accelerator.device, weight_dtype)).latent_dist.parameters
        count = len(batch_rows)
        entries = []
        for i, (image, mask, item) in enumerate(zip(images, masks, processed)):
            entry = {"latent_dist": parameters[i], "original_size": torch.tensor(item.original_size),
                     "crop_top_left": torch.tensor(item.crop_top_left)}
            if item.mask is not None:
                entry["loss_mask"] = item.mask
            if args.random_flip:
                # The crop as preprocess_image reports it for a flipped image: its left edge seen in the mirror.
                resized = bucketing.cover_size(image.width, image.height, *target)
                top, left = item.crop_top_left
                entry.update(flipped=parameters[count + i],
                             flipped_crop_top_left=torch.tensor((top, resized[0] - left - target[1])))
                if mask is not None:
                    box = (left, top, left + target[1], top + target[0])
                    entry["flipped_loss_mask"] = mask_weights(mask, resized, box, flip=True)
            entries.append(entry)
        return entries

    def encode(batch_rows):
        # The VAE encodes one target size at a time; entries come back in the order asked.
        by_target = {}
        for row in batch_rows:
            by_target.setdefault(train_dataset.target_size(row), []).append(row)
        entries = {}
        for target, same_size in by_target.items():
            entries.update(zip(same_size, encode_one_size(same_size, target)))
        return [entries[row] for row in batch_rows]

    vae.to(accelerator.device, dtype=weight_dtype)
    cache.fill(accelerator, {key: row for row, key in image_keys.items()}, encode, args.train_batch_size)
    train_dataset.use_latent_cache(cache, image_keys)


def latent_cache_settings(vae, weight_dtype, args):
    """What every latent entry depends on besides its image. Square runs without masks keep the settings (and so
    the entries) they always had."""
    settings = {
        "vae": feature_cache.model_fingerprint(vae), "dtype": str(weight_dtype), "resolution": args.resolution,
        "interpolation": args.image_interpolation_mode, "crop": "center", "flip": args.random_flip,
        # Entries also hold the image's size and crop (SDXL's time ids); earlier entries did not.
        "entries": "latent_dist+size+crop",
    }
    if args.buckets is not None:
        # Each entry's key holds its bucket instead: new bucket settings recompute only the images whose bucket
        # changed.
        del settings["resolution"]
        settings["size"] = "bucket in the entry key"
    if args.masked_loss:
        settings["entries"] += "+loss_mask"
    return settings


def latent_entry_keys(train_dataset, image_keys, args):
    """{row: entry key}: the image's fingerprint, with buckets or masks also the bucket and the mask's own
    fingerprint (an edited mask is recomputed)."""
    if args.buckets is None and not args.masked_loss:
        return image_keys
    from datasets import Image as ImageFeature

    mask_cells = None
    if args.mask_column is not None:
        mask_cells = train_dataset.dataset.cast_column(args.mask_column, ImageFeature(decode=False))
    keys = {}
    for row, image_key in image_keys.items():
        mask_key = None
        if train_dataset.masks is not None:
            source = train_dataset.masks[row]
            if source == MASK_FROM_COLUMN:
                mask_key = feature_cache.image_fingerprint(mask_cells[row][args.mask_column])
            elif source not in (None, MASK_FROM_ALPHA):
                mask_key = feature_cache.image_fingerprint({"path": source, "bytes": None})
            else:
                mask_key = source  # the alpha channel is part of the image's own fingerprint
        keys[row] = feature_cache.fingerprint(image_key, train_dataset.target_size(row), mask_key)
    return keys


def cache_text_embeddings(accelerator, train_dataset, text_encoders, args, weight_dtype):
    """Fill the text-embedding cache for every caption of the rows this run trains on (and the empty caption with
    --proportion_empty_prompts) and switch the dataset to it. Entries hold what the family's `encode_prompt` returns
    (the hidden states, and the pooled embedding where the family has one) and are keyed by token ids, so a different
    tokenizer is a miss too."""
    settings = {name: feature_cache.model_fingerprint(model)
                for name, model in zip(args.family.text_encoder_parts, text_encoders)}
    cache = feature_cache.FeatureCache(args.feature_cache_dir, "text_embeddings",
                                       {**settings, "dtype": str(weight_dtype)})
    rows = train_dataset.rows()
    captions = set(all_captions(train_dataset.dataset.select(rows)[args.caption_column]))
    if args.proportion_empty_prompts:
        captions.add("")
    token_ids = {caption: train_dataset.token_ids(caption) for caption in sorted(captions)}
    caption_keys = {caption: feature_cache.fingerprint(*(ids.tolist() for ids in per_tokenizer))
                    for caption, per_tokenizer in token_ids.items()}

    def encode(batch_ids):
        hidden_states, pooled = args.family.encode_prompt(text_encoders,
                                                          [torch.stack(ids) for ids in zip(*batch_ids)])
        if pooled is None:
            return [{"hidden_states": states} for states in hidden_states]
        return [{"hidden_states": states, "pooled_prompt_embeds": vector}
                for states, vector in zip(hidden_states, pooled)]

    for text_encoder in text_encoders:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    cache.fill(accelerator, {caption_keys[c]: ids for c, ids in token_ids.items()}, encode, args.train_batch_size)
    train_dataset.use_text_cache(cache, caption_keys)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def load_models(args, weight_dtype=torch.float32):
    """(noise_scheduler, tokenizers, text_encoders, vae, unet) from the pretrained pipeline: the family's tokenizers
    and frozen text encoders (loaded directly in `weight_dtype`, the frozen models' dtype), its VAE (or
    --pretrained_vae_model_name_or_path's, in fp32 until it moves to the device) and the UNet to train (fp32; LoRA
    mode: frozen, in `weight_dtype`). Load errors are InputErrors naming the part that failed."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    family = args.family
    # Trained with DDPM noising whatever the pipeline samples with (SDXL ships EulerDiscreteScheduler), as upstream.
    noise_scheduler = loading.load_part(args, "scheduler", DDPMScheduler.from_pretrained)
    tokenizers = family.load_tokenizers(args)
    with distributed.frozen_models_outside_zero3():
        text_encoders = family.load_text_encoders(args, torch_dtype=weight_dtype)
        vae = family.load_vae(args)
    # LoRA mode: the UNet is frozen too, so it loads directly in the frozen models' dtype.
    unet = loading.load_part(args, "unet", UNet2DConditionModel.from_pretrained, variant=args.variant,
                             revision=args.non_ema_revision,
                             **({"torch_dtype": weight_dtype} if lora_mode(args) else {}))

    if args.prediction_type is not None:
        # The scheduler config is what DREAM and the validation pipeline read.
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"the scheduler predicts {prediction_type!r}; pass --prediction_type epsilon or v_prediction")
    if args.dream_training and prediction_type != "epsilon":
        raise InputError(f"--dream_training supports only epsilon prediction; the model uses {prediction_type!r}")
    return noise_scheduler, tokenizers, text_encoders, vae, unet


def pipeline_class(args):
    """The family's pipeline for text-to-image (validation and the saved model)."""
    return args.family.pipeline_class("text_to_image")


def build_ema(args, unet):
    """An EMAModel of the UNet, starting from --revision's weights (which differ from the trained UNet's only when
    --non_ema_revision names another revision)."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    start = unet
    if args.non_ema_revision != args.revision:
        start = UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant,
            cache_dir=args.cache_dir,
        ).to(torch.float32)
    return EMAModel(start.parameters(), model_cls=UNet2DConditionModel, model_config=start.config,
                    foreach=args.foreach_ema)


def build_optimizer(args, params):
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


# ----------------------------------------------------------------------------------------------------------------------
# One training step's loss
# ----------------------------------------------------------------------------------------------------------------------


def added_conditions(batch, pooled_prompt_embeds, args):
    """The UNet's `added_cond_kwargs` from the family: None for SD; for SDXL the pooled embedding and each sample's
    time ids from its own original size and crop."""
    # The target size is each sample's bucket (the --resolution square without buckets).
    target_size = batch.get("target_size", (args.resolution, args.resolution))
    return args.family.added_conditions(pooled_prompt_embeds, batch.get("original_size"), batch.get("crop_top_left"),
                                        target_size)


def training_loss(unet, vae, text_encoders, noise_scheduler, batch, generator, args, vae_dtype, scaling_factor,
                  timestep_weights=None):
    """The diffusion loss of one batch: encode images and captions with the frozen models (or take them from the
    cache), noise the latents (offset noise, input perturbation), draw timesteps (uniform, or biased by
    `timestep_weights`), optionally apply DREAM, and weight by Min-SNR.

    Every random draw (latent sampling, noise, timesteps) comes from `generator`, so a resumed run repeats it."""
    import functools

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import compute_dream_and_update_latents

    with torch.no_grad():
        if "latent_dist" in batch:
            latent_dist = DiagonalGaussianDistribution(batch["latent_dist"])
        else:
            latent_dist = vae.encode(batch["pixel_values"].to(vae_dtype)).latent_dist
        latents = latent_dist.sample(generator=generator).float() * scaling_factor
    # LoRA mode with --train_text_encoder: the text encoders' adapters train, so the gradient flows through them.
    with torch.set_grad_enabled(bool(getattr(args, "train_text_encoder", False))):
        if "encoder_hidden_states" in batch:
            encoder_hidden_states, pooled = batch["encoder_hidden_states"], batch.get("pooled_prompt_embeds")
        else:
            input_ids = [batch[key] for key in INPUT_IDS if key in batch]
            encoder_hidden_states, pooled = args.family.encode_prompt(text_encoders, input_ids)
    added_cond_kwargs = added_conditions(batch, pooled, args)

    noise = objectives.sample_noise(latents, generator, args.noise_offset)
    timesteps = objectives.sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, generator,
                                            latents.device, timestep_weights)
    noisy_latents = noise_scheduler.add_noise(
        latents, objectives.perturb_noise(noise, args.input_perturbation, generator), timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    target = objectives.loss_target(noise_scheduler, prediction_type, latents, noise, timesteps)
    if args.dream_training:
        # DREAM's extra forward pass calls the UNet with three arguments; SDXL's also needs its added conditions.
        noisy_latents, target = compute_dream_and_update_latents(
            functools.partial(unet, added_cond_kwargs=added_cond_kwargs), noise_scheduler, timesteps, noise,
            noisy_latents, target, encoder_hidden_states, args.dream_detail_preservation,
        )

    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                      return_dict=False)[0]
    weights = None
    if args.snr_gamma is not None:
        weights = objectives.min_snr_loss_weights(noise_scheduler, timesteps, args.snr_gamma, prediction_type)
    return objectives.diffusion_loss(model_pred, target, weights, mask=batch.get("loss_mask"))


# ----------------------------------------------------------------------------------------------------------------------
# Validation, saving, model card
# ----------------------------------------------------------------------------------------------------------------------


def frozen_dtype(accelerator):
    """The VAE and text encoder run in the mixed-precision dtype; the trained UNet stays fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def validation_prompts(args):
    """--validation_prompts (one image each), then --validation_prompt --num_validation_images times."""
    repeated = [args.validation_prompt] * args.num_validation_images if args.validation_prompt else []
    return (args.validation_prompts or []) + repeated


def validation_pipeline(args, **components):
    """The pretrained pipeline (SD or SDXL) with `components` (the trained UNet, the frozen models in memory) and
    the --pretrained_vae_model_name_or_path VAE if it is not among them."""
    with distributed.frozen_models_outside_zero3():
        if "vae" not in components and args.pretrained_vae_model_name_or_path:
            components["vae"] = args.family.load_vae(args)
        return pipeline_class(args).from_pretrained(
            args.pretrained_model_name_or_path, **components, **args.family.pipeline_kwargs, revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        )


def generate_validation_images(accelerator, unet, vae, text_encoders, tokenizers, args, seed):
    """Render the validation prompts, split across all ranks (no rank idles past a collective timeout). Prompt i
    always uses a generator seeded from (run seed, i), so images do not depend on the number of processes (and the
    repeats of --validation_prompt differ). The main process gets [(prompt, PIL image)] in prompt order, other ranks
    None."""
    from accelerate.utils import gather_object

    prompts = validation_prompts(args)
    mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    images = []
    if mine:
        # A frozen model the cache made unnecessary (None) is loaded again for the length of the validation.
        family = args.family
        frozen = dict(zip(family.text_encoder_parts, text_encoders or []), **({"vae": vae} if vae is not None else {}))
        pipeline = validation_pipeline(args, unet=unet, **dict(zip(family.tokenizer_parts, tokenizers)), **frozen)
        weight_dtype = frozen_dtype(accelerator)
        for name in family.text_encoder_parts:
            if name not in frozen:
                getattr(pipeline, name).to(accelerator.device, dtype=weight_dtype)
        if vae is None:
            pipeline.vae.to(accelerator.device, dtype=family.vae_dtype(args, weight_dtype))
        pipeline.set_progress_bar_config(disable=True)
        if args.enable_xformers_memory_efficient_attention:
            pipeline.enable_xformers_memory_efficient_attention()
        was_training = unet.training
        unet.eval()
        for index in mine:
            generator = randomness.make_generator(accelerator.device, seed, VALIDATION_STREAM, index)
            with torch.no_grad(), accelerator.autocast():
                image = pipeline(
                    prompts[index], num_inference_steps=args.validation_inference_steps, generator=generator,
                    height=args.validation_height or args.resolution, width=args.validation_width or args.resolution,
                    output_type="np",
                ).images[0]
            images.append((index, (image * 255).round().astype("uint8")))
        unet.train(was_training)
        del pipeline
    gathered = gather_object(images) if accelerator.num_processes > 1 else images
    if not accelerator.is_main_process:
        return None
    return [(prompts[index], Image.fromarray(image)) for index, image in sorted(gathered, key=lambda pair: pair[0])]


def validate_with_ema(accelerator, model, ema_unet, vae, text_encoders, tokenizers, args, seed):
    """Validation images from the trained UNet `model` (from `distributed.whole_model`), or from the EMA weights when
    --use_ema (swapped in, then the trained weights restored). Every rank calls it."""
    if ema_unet is not None:
        ema_unet.store(model.parameters())
        ema_unet.copy_to(model.parameters())
    try:
        return generate_validation_images(accelerator, model, vae, text_encoders, tokenizers, args, seed)
    finally:
        if ema_unet is not None:
            ema_unet.restore(model.parameters())


def log_validation_images(accelerator, images, name, epoch, global_step, args):
    """Save the images under output_dir/validation/<name>/ and send them to TensorBoard / wandb (main process)."""
    folder = os.path.join(args.output_dir, "validation", name)
    os.makedirs(folder, exist_ok=True)
    for index, (_, image) in enumerate(images):
        image.save(os.path.join(folder, f"{index:02d}.png"))
    tag = "test" if name == "final" else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(image) for _, image in images])
            tracker.writer.add_images(tag, batch, epoch, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            logged = [wandb.Image(image, caption=f"{i}: {prompt}") for i, (prompt, image) in enumerate(images)]
            tracker.log({tag: logged}, step=global_step)
    return folder


def unwrapped(accelerator, models):
    """The models as validation pipelines take them (a trained text encoder without its DDP wrapper); None stays."""
    return None if models is None else [accelerator.unwrap_model(model) for model in models]


def save_lora_outputs(unet, text_encoders, args, logger):
    """LoRA mode: pytorch_lora_weights.safetensors (the adapters of the UNet, and of the trained text encoders, in
    fp32, rank and alpha in the metadata) for the family's pipeline's load_lora_weights, and with
    --output_kohya_format the kohya/A1111/ComfyUI copy."""
    lora.save_lora_weights(args.output_dir, unet, text_encoders, args.family, task="text_to_image")
    logger.info(f"Saved {os.path.join(args.output_dir, lora.LORA_WEIGHTS_NAME)}")
    if args.output_kohya_format:
        if args.use_dora:
            logger.warning(f"{lora.KOHYA_WEIGHTS_NAME}: diffusers' load_lora_weights skips the DoRA magnitudes "
                           "(dora_scale) of kohya files; use the diffusers file there")
        lora.save_kohya_weights(args.output_dir, unet, text_encoders, args.family)
        logger.info(f"Saved {os.path.join(args.output_dir, lora.KOHYA_WEIGHTS_NAME)}")


def save_pipeline(model, ema_unet, args):
    """Write the StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) with the trained UNet `model` (from
    `distributed.whole_model`) to --output_dir: the EMA weights in unet/ when --use_ema (the raw trained weights in
    unet_raw/), the trained UNet otherwise. The VAE (--pretrained_vae_model_name_or_path's if given) and text
    encoders are saved as loaded (not downcast)."""
    if ema_unet is not None:
        model.save_pretrained(os.path.join(args.output_dir, "unet_raw"))
        ema_unet.store(model.parameters())
        ema_unet.copy_to(model.parameters())
    with distributed.frozen_models_outside_zero3():
        custom_vae = {"vae": args.family.load_vae(args)} if args.pretrained_vae_model_name_or_path else {}
        pipeline = pipeline_class(args).from_pretrained(
            args.pretrained_model_name_or_path, unet=model, **custom_vae, revision=args.revision, variant=args.variant,
            cache_dir=args.cache_dir,
        )
    pipeline.save_pretrained(args.output_dir)
    if ema_unet is not None:
        ema_unet.restore(model.parameters())


def write_model_card(args, global_step, images):
    from diffusers.utils import make_image_grid
    from huggingface_hub import ModelCard, ModelCardData

    data = args.dataset_name or args.train_data_dir
    gallery = ""
    example_prompt = "a photo of a cat"
    if images:
        grid = make_image_grid([image for _, image in images], 1, len(images))
        grid.save(os.path.join(args.output_dir, "val_imgs_grid.png"))
        prompts = "\n".join(f"{i}. {prompt}" for i, (prompt, _) in enumerate(images))
        gallery = (f"Images generated by the fine-tuned pipeline for these prompts:\n\n{prompts}\n\n"
                   "![val_imgs_grid](./val_imgs_grid.png)\n")
        example_prompt = images[0][0]
    pipeline_name = pipeline_class(args).__name__
    extra_rows = (f"| VAE | {args.pretrained_vae_model_name_or_path} |\n" if args.pretrained_vae_model_name_or_path
                  else "")
    size = f"at {args.resolution}x{args.resolution}"
    if args.buckets is not None:
        size = f"in aspect-ratio buckets (height,width: {args.buckets.describe()})"
        extra_rows += f"| aspect-ratio buckets | {args.buckets.describe()} |\n"
    if args.masked_loss:
        extra_rows += f"| masked loss | {args.mask_column or 'alpha channels / name.mask.png'} |\n"
    model, output = args.pretrained_model_name_or_path, args.hub_model_id or args.output_dir
    if lora_mode(args):
        trained = "the UNet" + (" and the text encoders" if args.train_text_encoder else "")
        title = f"LoRA text-to-image fine-tuning of {model}"
        summary = f"LoRA adapters (rank {args.rank}) for {trained} of **{model}**"
        usage = (f'pipeline = {pipeline_name}.from_pretrained("{model}")\n'
                 f'pipeline.load_lora_weights("{output}")')
        weights_row = (f"| LoRA rank, alpha, dropout, DoRA, layers | {args.rank}, {args.lora_alpha}, "
                       f"{args.lora_dropout}, {args.use_dora}, {','.join(args.lora_targets or LORA_TARGETS)} |\n"
                       f"| text encoder LoRA | {args.train_text_encoder} |")
    else:
        title, summary = f"Text-to-image fine-tuning of {model}", f"The UNet of **{model}**"
        usage = f'pipeline = {pipeline_name}.from_pretrained("{output}")'
        weights = "EMA (raw trained weights in `unet_raw/`)" if args.use_ema else "trained"
        weights_row = f"| weights in `unet/` | {weights} |"
    description = f"""
# {title}

{summary} fine-tuned on **{data}** with `train_text_to_image.py` for
{global_step} optimizer steps {size}.

{gallery}
## Usage

```python
from diffusers import {pipeline_name}

{usage}
image = pipeline({example_prompt!r}).images[0]
```

## Training

| setting | value |
|---|---|
{weights_row}
| epochs, steps | {args.num_train_epochs}, {global_step} |
| batch size per device x accumulation | {args.train_batch_size} x {args.gradient_accumulation_steps} |
| learning rate, scheduler, warmup | {args.learning_rate}, {args.lr_scheduler}, {args.lr_warmup_steps} |
| resolution | {args.resolution} |
| Min-SNR gamma | {args.snr_gamma} |
| noise offset, input perturbation | {args.noise_offset}, {args.input_perturbation} |
| DREAM | {args.dream_training} |
| timestep bias | {args.timestep_bias_strategy} |
| empty prompts | {args.proportion_empty_prompts} |
| mixed precision | {args.mixed_precision} |
| seed | {args.seed} |
{extra_rows}"""
    tag = args.family.hub_tag
    tags = [tag, f"{tag}-diffusers", "text-to-image", "diffusers", "diffusers-training"]
    tags += [("dora" if args.use_dora else "lora")] if lora_mode(args) else []
    base_model = args.pretrained_model_name_or_path if not os.path.isdir(args.pretrained_model_name_or_path) else None
    card_data = ModelCardData(library_name="diffusers", tags=tags, base_model=base_model,
                              license="creativeml-openrail-m", inference=True)
    card = ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n{{ model_description }}",
                                   model_description=description)
    card.save(os.path.join(args.output_dir, "README.md"))


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    validate_args(args)

    import logging

    import datasets
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers import UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # Validation and saving run between steps; give them far more than the default collective timeout.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=7200))]
        + (lora.ddp_settings(args) if lora_mode(args) else []),
    )
    args.mixed_precision = accelerator.mixed_precision  # what accelerate chose (flag, launch option or config)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = get_logger(__name__, log_level="INFO")
    if not accelerator.is_local_main_process:
        for library in (datasets, transformers, diffusers):
            library.utils.logging.set_verbosity_error()
    # LoRA mode trains a few weights inside the frozen UNet, which ZeRO-3 would shard with it.
    distributed.adopt_engine_settings(accelerator, args.train_batch_size, args.max_grad_norm,
                                      supports_zero3=not lora_mode(args))
    if lora_mode(args) and args.train_text_encoder and accelerator.state.deepspeed_plugin is not None:
        # accelerate hands one model to a DeepSpeed engine; the UNet and text encoder LoRA would need two.
        raise InputError("--train_text_encoder trains two models, which accelerate cannot give to one DeepSpeed "
                         "engine: drop the flag or launch without DeepSpeed")
    preemption = checkpointing.PreemptionHandler(accelerator)

    run_state = randomness.RunState(randomness.run_seed(args, accelerator))
    accelerator.register_for_checkpointing(run_state)
    set_seed(run_state.seed)

    # Data first: a bad dataset is reported before any model is built or anything is written.
    with accelerator.main_process_first():
        examples = load_captioned_dataset(args)
        layout = survey_images(examples, args)  # buckets and masks, from the image headers

    # Frozen parts run in the mixed-precision dtype (SDXL's own VAE in fp32); the trained UNet stays fp32 (its
    # optimizer states too). LoRA mode: the whole UNet is frozen in the mixed-precision dtype and the adapters (on
    # it, and with --train_text_encoder on the text encoders) train in fp32, as diffusers' cast_training_params
    # leaves them.
    weight_dtype = frozen_dtype(accelerator)
    noise_scheduler, tokenizers, text_encoders, vae, unet = load_models(args, weight_dtype)
    vae.requires_grad_(False)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
    trained_models = [unet]
    if lora_mode(args):
        unet.requires_grad_(False)
        # The initial adapter weights depend on the run seed only.
        torch.manual_seed(randomness.derive_seed(run_state.seed, LORA_INIT_STREAM))
        lora.add_lora_adapters(args, unet, text_encoders, targets=args.lora_targets or LORA_TARGETS)
        if args.train_text_encoder:
            trained_models += args.family.trainable_text_encoders(text_encoders)
        cast_training_params(trained_models, dtype=torch.float32)
        unet.train()
    else:
        unet.to(torch.float32).train()
    ema_unet = build_ema(args, unet) if args.use_ema else None
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.enable_npu_flash_attention:
        unet.enable_npu_flash_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for text_encoder in trained_models[1:]:
            text_encoder.gradient_checkpointing_enable()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    train_dataset = CaptionedImages(examples, tokenizers, args, run_state, **layout)
    order = batch_order(train_dataset, args, run_state)
    epoch_order = order.get("sampler") or order["batch_sampler"]
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        **order,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params_to_optimize = [p for model in trained_models for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args, params_to_optimize)
    steps_per_epoch = randomness.steps_per_epoch(len(train_dataloader), accelerator.num_processes,
                                                 args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    else:
        args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    def trained_text_encoders():
        return [accelerator.unwrap_model(model) for model in trained_models[1:]]

    def save_model_hook(models, weights, output_dir):
        if lora_mode(args):
            # The checkpoint holds what trains, in the final output's file (usable by itself with load_lora_weights);
            # the frozen base weights are not copied.
            if accelerator.is_main_process:
                lora.save_lora_weights(output_dir, accelerator.unwrap_model(unet), trained_text_encoders(),
                                       args.family, task="text_to_image")
            weights.clear()
            return
        # A checkpoint is usable by itself: unet/ holds the trained weights, unet_ema/ the EMA. Every rank gathers
        # (ZeRO-3), the main process writes.
        for saved in models:
            model = distributed.whole_model(accelerator, saved, device="cpu")
            if accelerator.is_main_process:
                model.save_pretrained(os.path.join(output_dir, "unet"))
        if accelerator.is_main_process and ema_unet is not None:
            ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
        weights.clear()  # the unet/ folder replaces accelerate's own copy of the weights

    def load_model_hook(models, input_dir):
        if lora_mode(args):
            models.clear()  # the frozen weights come from the base model; only the adapters are restored
            lora.load_lora_weights(input_dir, accelerator.unwrap_model(unet), trained_text_encoders(), args.family,
                                   task="text_to_image")
            cast_training_params([accelerator.unwrap_model(model) for model in trained_models], dtype=torch.float32)
            return
        # Under DeepSpeed `models` is empty: the engine restores its own (sharded) weights.
        if ema_unet is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DConditionModel,
                                              foreach=args.foreach_ema)
            ema_unet.load_state_dict(loaded.state_dict())
            ema_unet.to("cpu" if args.offload_ema else accelerator.device)
        while models:
            target = accelerator.unwrap_model(models.pop())
            target.load_state_dict(UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet").state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    *trained_models, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *trained_models, optimizer, train_dataloader, lr_scheduler
    )
    unet = trained_models[0]
    # The trained text encoders (LoRA mode) in their prepared form, the frozen ones as they are.
    prepared = {id(accelerator.unwrap_model(model)): model for model in trained_models[1:]}
    text_encoders = [prepared.get(id(model), model) for model in text_encoders]
    if ema_unet is not None:
        if args.offload_ema and accelerator.device.type == "cuda":
            ema_unet.pin_memory()  # fast non-blocking copies to and from the GPU at each EMA update
        elif not args.offload_ema:
            ema_unet.to(accelerator.device)

    global_step = checkpointing.resume_from_checkpoint(accelerator, args, run_state)

    # The frozen models go to the device, or fill the cache (the rows trained on depend on the seed, known only now
    # for a resumed run) and leave memory; validation loads them again when it needs them.
    scaling_factor = vae.config.scaling_factor
    if args.cache_latents:
        cache_latents(accelerator, train_dataset, vae, args, args.family.vae_dtype(args, weight_dtype))
        vae = None
    else:
        vae.to(accelerator.device, dtype=args.family.vae_dtype(args, weight_dtype))
    if args.cache_text_embeddings:
        cache_text_embeddings(accelerator, train_dataset, text_encoders, args, weight_dtype)
        text_encoders = None
    else:
        for text_encoder in text_encoders:
            if text_encoder not in trained_models:  # a trained one's adapters stay fp32
                text_encoder.to(accelerator.device, dtype=weight_dtype)
    feature_cache.free_memory()
    timestep_weights = objectives.timestep_bias_weights(
        args.timestep_bias_strategy, noise_scheduler.config.num_train_timesteps, args.timestep_bias_multiplier,
        args.timestep_bias_begin, args.timestep_bias_end, args.timestep_bias_portion,
    )
    if timestep_weights is not None:
        timestep_weights = timestep_weights.to(accelerator.device)

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), exist_ok=True,
                token=args.hub_token,
            ).repo_id
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracked)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataset)} examples, {args.num_train_epochs} epochs of {steps_per_epoch} steps, "
        f"{args.max_train_steps} steps in all, batch {args.train_batch_size} per device, total batch {total_batch_size}"
    )

    first_epoch, batches_to_skip = randomness.resume_position(global_step, steps_per_epoch,
                                                              args.gradient_accumulation_steps)
    if global_step >= args.max_train_steps:
        logger.info(f"Checkpoint step {global_step} >= --max_train_steps {args.max_train_steps}: nothing to train")
    progress_bar = tqdm(
        total=args.max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    running_loss = torch.zeros((), device=accelerator.device)
    running_batches = 0
    checkpointer = checkpointing.Checkpointer(
        accelerator, args.output_dir, args.checkpointing_steps, args.checkpoints_total_limit, preemption
    )

    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        for model in trained_models:
            model.train()
        loader, start = train_dataloader, 0
        if epoch == first_epoch and batches_to_skip:
            loader, start = accelerator.skip_first_batches(train_dataloader, batches_to_skip), batches_to_skip
        randomness.set_epoch(loader, epoch_order, epoch)
        for batch_index, batch in enumerate(loader, start=start):
            generator = randomness.make_generator(
                accelerator.device, run_state.seed, NOISE_STREAM, epoch, batch_index, accelerator.process_index
            )
            if lora_mode(args):
                # LoRA dropout draws from the global RNG, which data loading and resuming also touch: reseed it from
                # the batch's place in the run so that a resumed run drops exactly what the uninterrupted one did.
                torch.manual_seed(randomness.derive_seed(run_state.seed, LORA_DROPOUT_STREAM, epoch, batch_index,
                                                         accelerator.process_index))
            with accelerator.accumulate(*trained_models):
                loss = training_loss(unet, vae, text_encoders, noise_scheduler, batch, generator, args,
                                     args.family.vae_dtype(args, weight_dtype), scaling_factor, timestep_weights)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += loss.detach()
            running_batches += 1
            if args.debug_loss and batch.get("filename"):
                # Upstream SDXL LoRA's per-file loss (a read back from the device: for debugging only).
                accelerator.log({f"loss_for_{name}": loss.item() for name in batch["filename"] if name},
                                step=global_step)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema_unet is not None:
                if args.offload_ema:
                    ema_unet.to(device=accelerator.device, non_blocking=True)
                ema_unet.step(unet.parameters())
                if args.offload_ema:
                    ema_unet.to(device="cpu", non_blocking=True)
            progress_bar.update(1)

            if global_step % args.logging_steps == 0:
                mean_loss = accelerator.reduce(running_loss, reduction="mean").item() / running_batches
                logs = {"train_loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                progress_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)
                running_loss.zero_()
                running_batches = 0

            checkpointer.save_if_due(global_step)

            stop_status = checkpointer.stop_if_requested(global_step)
            if stop_status:
                progress_bar.close()
                accelerator.end_training()
                return stop_status
            if global_step >= args.max_train_steps:
                break

        # Upstream cadence: validation images at the end of every --validation_epochs-th epoch.
        if validation_prompts(args) and epoch % args.validation_epochs == 0:
            for model in trained_models:  # no LoRA dropout in validation images (training mode returns next epoch)
                model.eval()
            images = validate_with_ema(accelerator, distributed.whole_model(accelerator, unet), ema_unet, vae,
                                       unwrapped(accelerator, text_encoders), tokenizers, args, run_state.seed)
            if accelerator.is_main_process:
                folder = log_validation_images(accelerator, images, f"epoch_{epoch:04d}", epoch, global_step, args)
                logger.info(f"Saved validation images to {folder}")
        accelerator.wait_for_everyone()
    progress_bar.close()

    # A last round of validation images from the final (EMA) weights, shown in the model card.
    final_unet = distributed.whole_model(accelerator, unet)
    final_images = None
    if validation_prompts(args):
        for model in trained_models:
            model.eval()
        final_images = validate_with_ema(
            accelerator, final_unet, ema_unet, vae, unwrapped(accelerator, text_encoders), tokenizers, args,
            run_state.seed
        )
    if accelerator.is_main_process:
        if lora_mode(args):
            save_lora_outputs(final_unet, trained_text_encoders(), args, logger)
        else:
            save_pipeline(final_unet, ema_unet, args)
            logger.info(f"Saved the {pipeline_class(args).__name__} to {args.output_dir}")
        if final_images:
            log_validation_images(accelerator, final_images, "final", args.num_train_epochs, global_step, args)
        write_model_card(args, global_step, final_images)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message=f"Step {global_step}",
                ignore_patterns=["step_*", "epoch_*", "checkpoint-*", f"{checkpointing.PARTIAL_PREFIX}*", "logs/*"],
                token=args.hub_token,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    cli.run_main(main)
