#!/usr/bin/env python
"""Train a ControlNet for a Stable Diffusion or SDXL pipeline on (image, conditioning image, caption) examples.

A drop-in replacement for diffusers' `examples/controlnet/train_controlnet.py` and, given an SDXL base model, for
`train_controlnet_sdxl.py`: the same flags and defaults, the same output layout (the ControlNet's `config.json` +
`diffusion_pytorch_model.safetensors` at the top of `--output_dir`, `checkpoint-N/controlnet/` folders), plus
`--config`, `--logging_steps`, `--snr_gamma` (Min-SNR), `--noise_offset`, `--prediction_type`,
`--random_crop`/`--random_flip` (applied identically to both images),
`--validation_inference_steps`, `--cache_latents` / `--cache_text_embeddings` (the target images' VAE latents and the
captions' embeddings computed once, kept on disk under `--feature_cache_dir` and reused by later and resumed runs;
the VAE / text encoder then leave memory), exact resume, atomic checkpoints and preemption handling. Validation images
are rendered on all ranks (split between them), and a last round uses the ControlNet as saved. Real datasets (SPEC §9):
`--use_aspect_ratio_buckets` / `--aspect_ratio_buckets` train each image and its conditioning image (same resize, crop
box and flip) at the bucket of nearest aspect ratio, `--masked_loss` weights the loss by each target image's alpha
channel, `name.mask.png` or `--mask_column`, and `--validation_height/_width` preview a bucket shape.

    accelerate launch train_controlnet.py --pretrained_model_name_or_path ./sd-folder --dataset_name ./fill50k \\
        --resolution 512 --learning_rate 1e-5 --validation_image ./cond_1.png --validation_prompt "red circle" \\
        --output_dir controlnet-fill
"""

import math
import os
from datetime import timedelta

import numpy as np
import torch
from PIL import Image

from trainkit import bucketing, checkpointing, cli, distributed, families, feature_cache, objectives, randomness
from trainkit.cli import InputError

# Independent random streams, derived from the run seed (see randomness.derive_seed).
SHUFFLE_STREAM, AUGMENT_STREAM, NOISE_STREAM, SUBSET_STREAM, VALIDATION_STREAM = 1, 2, 3, 4, 5
# The batch keys of each tokenizer's token ids (as many as the family has tokenizers).
INPUT_IDS = ("input_ids", "input_ids_2")
# The families this script trains, and the flags whose upstream default differs between them
# (train_controlnet.py, train_controlnet_sdxl.py).
FAMILY_DEFAULTS = {
    "sd": {"tracker_project_name": "train_controlnet"},
    "sdxl": {"tracker_project_name": "sd_xl_train_controlnet"},
}
# The ControlNet examples resize with bilinear filtering; --image_interpolation_mode picks another filter.
INTERPOLATION_MODES = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
    "nearest": Image.NEAREST,
    "nearest_exact": Image.NEAREST,
}
# ControlNet config entries that must equal the base UNet's: the residuals it adds and the conditions it reads.
MATCHING_CONFIG = ("in_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type",
                   "addition_time_embed_dim", "projection_class_embeddings_input_dim")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Train a ControlNet for a Stable Diffusion or SDXL pipeline.")
    add = parser.add_argument
    # Models (upstream)
    add("--pretrained_model_name_or_path", type=str, required=True,
        help="A Stable Diffusion pipeline folder or hub id (tokenizer/, text_encoder/, vae/, unet/, scheduler/). An "
             "SDXL pipeline (with tokenizer_2/ and text_encoder_2/) trains an SDXL ControlNet.")
    add("--pretrained_vae_model_name_or_path", type=str, default=None,
        help="A VAE folder or hub id to use instead of the pipeline's, e.g. an fp16-safe SDXL VAE (without one the "
             "SDXL VAE runs in fp32, as upstream).")
    add("--controlnet_model_name_or_path", type=str, default=None,
        help="A ControlNet to continue training (folder or hub id). Default: a new one initialised from the UNet.")
    add("--revision", type=str, default=None, help="Hub revision of the pretrained model.")
    add("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    add("--tokenizer_name", type=str, default=None,
        help="A tokenizer to use instead of the pipeline's tokenizer/ (SDXL: its first tokenizer).")
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention.")
    add("--enable_npu_flash_attention", action="store_true",
        help="Flash attention on Ascend NPUs (needs torch_npu).")
    # Data (upstream)
    add("--dataset_name", type=str, default=None,
        help="A dataset on the hub, or a local dataset folder (parquet/arrow/imagefolder/save_to_disk).")
    add("--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several.")
    add("--train_data_dir", type=str, default=None,
        help="An imagefolder whose metadata.jsonl/metadata.csv names the image (file_name), the conditioning image "
             "(conditioning_image_file_name, or a path in the conditioning image column) and the caption.")
    add("--image_column", type=str, default="image", help="The dataset column that holds the target images.")
    add("--conditioning_image_column", type=str, default="conditioning_image",
        help="The dataset column that holds the ControlNet conditioning images.")
    add("--caption_column", type=str, default="text",
        help="The dataset column that holds a caption or a list of captions (one is picked at random).")
    add("--max_train_samples", type=int, default=None, help="Train on a random subset of this many examples.")
    add("--proportion_empty_prompts", type=float, default=0,
        help="Fraction of captions replaced by the empty prompt (0 to 1).")
    add("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    add("--resolution", type=int, default=512,
        help="Images are resized (short side) and cropped to this square size; a multiple of 8. With "
             "--use_aspect_ratio_buckets the bucket sizes are built from it.")
    add("--image_interpolation_mode", type=str, default=None, choices=sorted(INTERPOLATION_MODES),
        help="The filter that resizes the image and its conditioning image (default: bilinear, as upstream).")
    add("--crops_coords_top_left_h", type=int, default=None,
        help="SDXL: the crop top (in the resized image) put into every time id instead of each image's real crop "
             "(upstream's flag; upstream always uses it, default 0).")
    add("--crops_coords_top_left_w", type=int, default=None,
        help="SDXL: the crop left put into every time id instead of each image's real crop (upstream default 0).")
    add("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses; 0 loads in the main one.")
    # Training (upstream)
    add("--output_dir", type=str, default="controlnet-model", help="Where the ControlNet and checkpoints go.")
    add("--seed", type=int, default=None, help="Seed for data order, prompt dropout, noise and validation images.")
    add("--train_batch_size", type=int, default=4, help="Batch size per device.")
    add("--num_train_epochs", type=int, default=1)
    add("--max_train_steps", type=int, default=None, help="Stop after this many optimizer steps (overrides epochs).")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true",
        help="Recompute the ControlNet's activations in the backward pass instead of keeping them: less memory, "
             "slower (as upstream, the frozen UNet's are kept; see --gradient_checkpointing_unet).")
    add("--gradient_checkpointing_unet", action="store_true",
        help="Also recompute the frozen UNet's activations in the backward pass (the loss backpropagates through it "
             "into the ControlNet's residuals, so it holds activations too): less memory, slower. Independent of "
             "--gradient_checkpointing; give both for the least memory.")
    add("--learning_rate", type=float, default=5e-6)
    add("--scale_lr", action="store_true",
        help="Multiply the learning rate by processes x accumulation steps x batch size.")
    add("--lr_scheduler", type=str, default="constant", help=f"One of {', '.join(LR_SCHEDULERS)}.")
    add("--lr_warmup_steps", type=int, default=500)
    add("--lr_num_cycles", type=int, default=1, help="Hard restarts of the cosine_with_restarts scheduler.")
    add("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    add("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-08)
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    add("--set_grads_to_none", action="store_true",
        help="Free gradients between steps instead of zeroing them (saves memory).")
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Default: accelerate's config. The frozen UNet, VAE and text encoder run in this precision; the "
             "ControlNet weights stay fp32.")
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help="A checkpoint-N folder (name in --output_dir, or path) or 'latest' to continue training from.")
    # Validation, logging and hub (upstream)
    add("--validation_prompt", type=str, default=None, nargs="+",
        help="Prompts rendered every --validation_steps: as many as --validation_image, or one for all images.")
    add("--validation_image", type=str, default=None, nargs="+",
        help="Conditioning image paths for validation: as many as --validation_prompt, or one for all prompts.")
    add("--num_validation_images", type=int, default=4, help="Images generated for each (prompt, image) pair.")
    add("--validation_steps", type=int, default=100, help="Run validation every N optimizer steps.")
    add("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, comet_ml or all.")
    add("--tracker_project_name", type=str, default=None,
        help="Default train_controlnet; SDXL sd_xl_train_controlnet.")
    add("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    add("--push_to_hub", action="store_true")
    add("--hub_token", type=str, default=None)
    add("--hub_model_id", type=str, default=None)
    add("--local_rank", type=int, default=-1, help="Set by the launcher; not needed with accelerate launch.")
    # Additions
    add("--prediction_type", type=str, default=None,
        help="epsilon or v_prediction; default: the pretrained scheduler's prediction type.")
    add("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (recommended 5.0).")
    add("--noise_offset", type=float, default=0, help="Scale of offset noise.")
    add("--random_crop", action="store_true",
        help="Crop a random square (the same one from the image and its conditioning image) instead of the centre.")
    add("--random_flip", action="store_true", help="Flip the image and its conditioning image together at random.")
    add("--validation_inference_steps", type=int, default=20, help="Denoising steps for validation images.")
    add("--logging_steps", type=int, default=10,
        help="Log the mean loss every N optimizer steps (the loss is not read back from the device in between).")
    add("--cache_latents", action="store_true",
        help="Encode every target image with the VAE once (both orientations with --random_flip), keep the latent "
             "distributions on disk under --feature_cache_dir, reuse them in later runs, and train without the VAE "
             "in memory (conditioning images are still read per sample). Not with --random_crop: a random crop "
             "cannot be cached.")
    add("--cache_text_embeddings", action="store_true",
        help="Encode every caption (and the empty prompt of --proportion_empty_prompts) with the text encoder once, "
             "keep the embeddings on disk under --feature_cache_dir, reuse them in later runs, and train without the "
             "text encoder in memory.")
    add("--feature_cache_dir", type=str, default=None,
        help="Where --cache_latents and --cache_text_embeddings keep their files (default: $DIFFUSION_TRAINING_CACHE "
             "or ~/.cache/diffusion-training). Entries are keyed by the images, captions, model weights, resolution "
             "and transforms, so one folder serves any number of runs; deleting it is always safe.")
    # Real datasets (SPEC §9): aspect-ratio buckets, --validation_height/_width, a loss mask per target image.
    bucketing.add_bucket_arguments(parser)
    bucketing.add_mask_arguments(parser, column=True)
    args = cli.parse_args_with_config(parser, argv)
    if args.feature_cache_dir is None:
        args.feature_cache_dir = feature_cache.default_feature_cache_dir()
    # The base model's family; the flags its upstream script defaults differently follow.
    args.family = families.select(args, FAMILY_DEFAULTS, "train_controlnet.py")
    return args


def validate_args(args):
    """Every check that needs no model or dataset loaded. Raises InputError."""
    cli.require_positive(
        args, "resolution", "train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps",
        "learning_rate", "checkpointing_steps", "checkpoints_total_limit", "max_train_samples", "validation_steps",
        "num_validation_images", "validation_inference_steps", "logging_steps", "lr_num_cycles",
    )
    cli.require_multiple_of_8(
        "--resolution", args.resolution, why="the VAE and the ControlNet's conditioning encoder downsample by 8"
    )
    bucketing.check_bucket_flags(args)
    if args.mask_column is not None and not args.masked_loss:
        raise InputError("--mask_column applies only with --masked_loss")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise InputError(f"--proportion_empty_prompts must be between 0 and 1, got {args.proportion_empty_prompts}")
    for name in ("lr_warmup_steps", "dataloader_num_workers", "noise_offset", "max_grad_norm"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise InputError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise InputError(f"--lr_scheduler {args.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if args.prediction_type is not None and args.prediction_type not in PREDICTION_TYPES:
        raise InputError(f"--prediction_type {args.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    if args.cache_latents and args.random_crop:
        raise InputError("--cache_latents cannot be used with --random_crop: a random crop changes every epoch and "
                         "cannot be cached")
    if (args.cache_latents or args.cache_text_embeddings) and os.path.isfile(args.feature_cache_dir):
        raise InputError(f"--feature_cache_dir {args.feature_cache_dir!r} is a file, not a folder")
    args.family.check_crop_flags(args)
    if args.enable_npu_flash_attention:
        import importlib.util

        if importlib.util.find_spec("torch_npu") is None:
            raise InputError("--enable_npu_flash_attention needs an Ascend NPU and the torch_npu package")
    args.validation_pairs = validation_pairs(args)

    skipped = {"tokenizer": args.tokenizer_name, "vae": args.pretrained_vae_model_name_or_path}
    args.family.check_folder(args.pretrained_model_name_or_path, [p for p in args.family.parts if not skipped.get(p)])
    for flag, path in (("--controlnet_model_name_or_path", args.controlnet_model_name_or_path),
                       ("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path)):
        if path is not None:
            cli.check_local_or_hub_id(flag, path)
            if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
                raise InputError(f"{flag} {path!r} is a folder without a config.json")
    unet_config = os.path.join(args.pretrained_model_name_or_path, "unet", "config.json")
    if args.controlnet_model_name_or_path is not None and os.path.isdir(args.controlnet_model_name_or_path) \
            and os.path.isfile(unet_config):
        # Before any model loads: a ControlNet of another family (or size) fails here, by its config.
        check_controlnet_fits(args, read_json_config(os.path.join(args.controlnet_model_name_or_path, "config.json"),
                                                     "--controlnet_model_name_or_path"),
                              read_json_config(unet_config, "--pretrained_model_name_or_path"))
    if args.tokenizer_name is not None:
        cli.check_local_or_hub_id("--tokenizer_name", args.tokenizer_name)

    if args.dataset_name is None and args.train_data_dir is None:
        raise InputError(
            "give --dataset_name (a hub id or a local dataset folder) or --train_data_dir (an imagefolder)"
        )
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise InputError("give only one of --dataset_name and --train_data_dir")
    if args.dataset_name is not None:
        cli.check_local_or_hub_id("--dataset_name", args.dataset_name)
    elif not os.path.isdir(args.train_data_dir):
        raise InputError(f"--train_data_dir {args.train_data_dir!r} is not a folder")

    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir {args.output_dir!r} exists and is not a folder")
    args.resume_path = checkpointing.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)

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
        try:
            import bitsandbytes  # noqa: F401
        except Exception as error:  # ImportError, or a broken native library raising at import
            raise InputError(f"--use_8bit_adam: bitsandbytes cannot be used ({cli.first_line(error)}); "
                             "pip install bitsandbytes") from None
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise InputError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed "
                "(pip install -r requirements-xformers.txt)"
            )


def read_json_config(path, flag):
    import json

    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise InputError(f"{flag}: cannot read {path!r} ({cli.first_line(error)})") from None


def check_controlnet_fits(args, controlnet_config, unet_config):
    """A ControlNet adds residuals to the base UNet's blocks and reads its conditions (the family's added conditions):
    the configs must agree on MATCHING_CONFIG. Checked on the config files before loading, and on the loaded models
    (hub ids)."""
    differences = [
        f"{key} {controlnet_config[key]!r} vs {unet_config[key]!r}" for key in MATCHING_CONFIG
        if key in controlnet_config and key in unet_config
        and _plain(controlnet_config[key]) != _plain(unet_config[key])
    ]
    if differences:
        raise InputError(
            f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path!r} does not fit "
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} ({args.family.described} model): "
            f"{', '.join(differences)} (ControlNet vs UNet)"
        )


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def validation_pairs(args):
    """[(prompt, conditioning image path)]: prompts and images paired 1:1, one image for every prompt, or one prompt
    for every image (upstream's rule). Checked before any model is loaded."""
    prompts, images = args.validation_prompt, args.validation_image
    if prompts is None and images is None:
        return []
    if images is None:
        raise InputError("--validation_prompt needs --validation_image (the conditioning image(s) to render with)")
    if prompts is None:
        raise InputError("--validation_image needs --validation_prompt (the prompt(s) to render with)")
    if len(prompts) != len(images) and len(prompts) != 1 and len(images) != 1:
        raise InputError(
            f"--validation_prompt has {len(prompts)} prompts and --validation_image {len(images)} images: give the "
            "same number of each, or one of either"
        )
    for path in images:
        if not os.path.isfile(path):
            raise InputError(f"--validation_image {path!r} does not exist")
        if not cli.is_readable_image({"path": path}):
            raise InputError(f"--validation_image {path!r} is not a readable image")
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(images) == 1:
        images = images * len(prompts)
    return list(zip(prompts, images))


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_training_rows(args):
    """(dataset, RowPlan): the examples and what each row trains at, from the image headers, so that a missing or
    mis-sized mask is reported before any model loads."""
    examples = load_controlnet_dataset(args)
    return examples, plan_rows(examples, args, args.dataset_name or args.train_data_dir)


def load_controlnet_dataset(args):
    """The training examples as a datasets.Dataset with the image, conditioning image and caption columns.

    Sources: a hub dataset or local dataset folder (`--dataset_name`), or an imagefolder (`--train_data_dir`) whose
    metadata names both images. A column of file paths instead of images is read relative to the data folder. Rows
    with an unreadable image are removed with a warning naming the file.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    if args.dataset_name:
        flag, source = "--dataset_name", args.dataset_name
    else:
        flag, source = "--train_data_dir", args.train_data_dir
    saved_to_disk = any(os.path.isfile(os.path.join(source, name)) for name in ("state.json", "dataset_dict.json"))
    try:
        if args.dataset_name is None:
            dataset = load_dataset("imagefolder", data_dir=source, cache_dir=args.cache_dir)
        elif saved_to_disk:
            dataset = load_from_disk(source)
        else:
            dataset = load_dataset(source, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as error:  # datasets raises many types; the user needs the source and the reason
        raise InputError(f"{flag} {source!r}: cannot load the dataset ({cli.first_line(error)})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise InputError(f"{flag} {source!r} has no 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]

    columns = dataset.column_names
    image_columns = (args.image_column, args.conditioning_image_column)
    # --mask_column (with --masked_loss): a third image column, read like the other two.
    mask_column = getattr(args, "mask_column", None)
    named = [("--image_column", args.image_column), ("--conditioning_image_column", args.conditioning_image_column),
             ("--caption_column", args.caption_column)] + ([("--mask_column", mask_column)] if mask_column else [])
    for column_flag, column in named:
        if column not in columns:
            raise InputError(f"{column_flag} {column!r} is not a column of {source!r}; columns: {', '.join(columns)}")
    _check_caption_feature(dataset.features[args.caption_column], args.caption_column, source)
    dataset = dataset.select_columns([column for _, column in named])
    if len(dataset) == 0:
        raise InputError(f"{flag} {source!r} holds no examples")
    for column in image_columns + ((mask_column,) if mask_column else ()):
        dataset = _paths_to_images(dataset, column, source)
    return cli.drop_unreadable_images(dataset, image_columns, flag, source)


def _paths_to_images(dataset, column, source):
    """A column of file names (metadata naming the conditioning image by path) becomes an image column; relative
    paths are read from the data folder."""
    from datasets import Image as ImageFeature
    from datasets import Value

    feature = dataset.features[column]
    if isinstance(feature, ImageFeature):
        return dataset
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise InputError(f"column {column!r} of {source!r} holds {feature}; expected images or image file paths")
    base = source if os.path.isdir(source) else ""
    dataset = dataset.map(
        lambda batch: {column: [os.path.join(base, path) if path else "" for path in batch[column]]},
        batched=True, desc=f"Resolving {column} paths",
    )
    return dataset.cast_column(column, ImageFeature())


def _check_caption_feature(feature, column, source):
    """Captions must be text or lists of text; anything else is reported before training starts."""
    from datasets import Value

    inner = feature
    if isinstance(feature, list) and feature:
        inner = feature[0]
    elif type(feature).__name__ in ("List", "LargeList", "Sequence"):
        inner = feature.feature
    if not (isinstance(inner, Value) and inner.dtype in ("string", "large_string")):
        raise InputError(f"--caption_column {column!r} of {source!r} holds {feature}; expected text or lists of text")


class RowPlan:
    """What each dataset row trains at, known before any model loads: its target, the --resolution square (an int)
    or, with --use_aspect_ratio_buckets / --aspect_ratio_buckets, its (height, width) bucket; and with --masked_loss
    where its loss mask is: ("column", digest) for a --mask_column cell, ("file", path) for `name.mask.png` beside
    the image, ("alpha", "alpha") for the image's own alpha channel."""

    def __init__(self, resolution, targets=None, masks=None):
        self.resolution, self.targets, self.masks = resolution, targets, masks

    def target(self, row):
        return self.resolution if self.targets is None else self.targets[row]

    def mask(self, row):
        return None if self.masks is None else self.masks[row]


def plan_rows(dataset, args, source):
    """The RowPlan of `dataset` (from load_controlnet_dataset), reading image headers only (sizes, alpha), so that
    a missing or mis-sized mask is reported before any model loads. Without the bucket and mask flags nothing is
    read. Raises InputError."""
    from datasets import Image as ImageFeature

    buckets, masked = getattr(args, "buckets", None), getattr(args, "masked_loss", False)
    if buckets is None and not masked:
        return RowPlan(args.resolution)
    mask_column = getattr(args, "mask_column", None) if masked else None
    columns = [args.image_column] + ([mask_column] if mask_column else [])
    cells = dataset.select_columns(columns)
    for column in columns:
        cells = cells.cast_column(column, ImageFeature(decode=False))
    targets, masks, names = [], [], []
    for start in range(0, len(cells), 1000):  # in chunks: a dataset that embeds its images can exceed memory
        chunk = cells[start:start + 1000]
        for offset, image_cell in enumerate(chunk[args.image_column]):
            row = start + offset
            size = bucketing.image_size(image_cell)
            names.append(image_cell.get("path") or f"row {row} of {source!r}")
            if buckets is not None:
                targets.append(buckets.assign(*size))
            if masked:
                mask_cell = chunk[mask_column][offset] if mask_column else None
                masks.append(find_mask(image_cell, size, mask_cell, mask_column, names[-1]))
    if masked:
        check_some_image_has_a_mask(masks, names, mask_column, source)
    return RowPlan(args.resolution, targets if buckets is not None else None, masks if masked else None)


# The RowPlan mask entry of an image without a mask under --masked_loss: it trains on every pixel.
NO_MASK = ("none", "none")


def find_mask(image_cell, image_size, mask_cell, mask_column, image_name):
    """Where one target image's loss mask is (a RowPlan mask entry), or NO_MASK. A mask of another size than its image
    is an InputError naming the mask."""
    if mask_column:
        if not mask_cell or not (mask_cell.get("bytes") or mask_cell.get("path")):
            return NO_MASK
        found, mask_name = ("column", feature_cache.image_fingerprint(mask_cell)), \
            mask_cell.get("path") or f"the --mask_column {mask_column!r} cell of {image_name}"
    else:
        # Only an image read from a file has a folder to look in (a dataset's embedded image has just a name).
        path = None if image_cell.get("bytes") else image_cell.get("path")
        mask_path = path and bucketing.mask_path_for(path)
        if mask_path and os.path.isfile(mask_path):
            found, mask_name, mask_cell = ("file", mask_path), mask_path, {"path": mask_path}
        else:
            return ("alpha", "alpha") if _has_alpha_channel(image_cell) else NO_MASK
    mask_size = bucketing.image_size(mask_cell)
    if mask_size != tuple(image_size):
        raise InputError(f"--masked_loss: the mask {mask_name} is {mask_size[1]}x{mask_size[0]} but its image "
                         f"{image_name} is {image_size[1]}x{image_size[0]}; a mask must have its image's size")
    return found


def _has_alpha_channel(cell):
    from io import BytesIO

    with Image.open(BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
        return bucketing.has_alpha(image)


def check_some_image_has_a_mask(masks, names, mask_column, source):
    """No mask at all is an InputError; images without one train on every pixel (as in the other scripts)."""
    unmasked = masks.count(NO_MASK)
    if not unmasked:
        return
    where = (f"in --mask_column {mask_column!r}" if mask_column
             else "for name.mask.png beside each image name.png and for an alpha channel")
    if unmasked == len(masks):
        raise InputError(f"--masked_loss: no image of {source!r} has a loss mask (looked {where})")
    cli.logger.warning(f"--masked_loss: {unmasked} of {len(masks)} images of {source!r} have no loss mask (looked "
                          f"{where}) and train on every pixel, e.g. {names[masks.index(NO_MASK)]}")


def target_shape(target):
    """(height, width) of a training target: a square side (--resolution) or a (height, width) bucket."""
    return (target, target) if isinstance(target, int) else tuple(target)


def crop_geometry(width, height, target, crop_position):
    """((width, height) after resizing, aspect kept, to cover `target` (a square side or a (height, width) bucket),
    crop left, crop top) for `crop_position` = (x, y) in [0, 1] of the room left over (0.5, 0.5 = centre crop).
    For a square target the resize is the short side's to `target`, as it always was."""
    target_height, target_width = target_shape(target)
    size = bucketing.cover_size(width, height, target_height, target_width)
    return size, round(crop_position[0] * (size[0] - target_width)), round(crop_position[1] * (size[1] - target_height))


def resize_and_crop(image, target, crop_position, flip, interpolation=Image.BILINEAR, mode="RGB"):
    """PIL image -> `mode` PIL image of the target's size (a square side or a (height, width) bucket): resize to
    cover it (bilinear, as upstream, unless --image_interpolation_mode), then crop at `crop_position`
    (crop_geometry), then maybe flip.

    The position is relative, so an image and a conditioning image of the same aspect ratio get the same crop even at
    different sizes (and the same box at the same size)."""
    target_height, target_width = target_shape(target)
    image = image.convert(mode)
    size, left, top = crop_geometry(*image.size, target, crop_position)
    image = image.resize(size, resample=interpolation)
    image = image.crop((left, top, left + target_width, top + target_height))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image


def size_and_crop(image, target, crop_position, flip):
    """SDXL's time-id inputs for a target image: its original (height, width) and the crop's (top, left) in the
    resized image (seen in the mirror when flipped)."""
    size, left, top = crop_geometry(image.width, image.height, target, crop_position)
    return (image.height, image.width), (top, size[0] - target_shape(target)[1] - left if flip else left)


def to_tensor(image):
    """RGB PIL image -> (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def draw_augmentation(random_crop, random_flip, generator):
    """(crop position, flip) of one example, drawn from `generator` (a centre crop draws nothing)."""
    crop_position = (0.5, 0.5)
    if random_crop:
        crop_position = tuple(torch.rand(2, generator=generator).tolist())
    flip = bool(random_flip and torch.rand(1, generator=generator).item() < 0.5)
    return crop_position, flip


def preprocess_target(image, target, crop_position, flip, interpolation=Image.BILINEAR):
    """The target image in [-1, 1]: what the VAE encodes."""
    return to_tensor(resize_and_crop(image, target, crop_position, flip, interpolation)) * 2.0 - 1.0


def preprocess_mask(mask, target, crop_position, flip):
    """A loss mask ('L' image of its target image's size) -> (1, h, w) latent-pixel weights in [0, 1]: the target
    image's resize (bilinear, which keeps the values in range), crop and flip, then averaged over each 8x8 block."""
    pixels = np.asarray(resize_and_crop(mask, target, crop_position, flip, Image.BILINEAR, mode="L"), np.float32)
    return bucketing.mask_to_latents(torch.from_numpy(pixels / 255.0)[None], 8)


def preprocess_pair(image, conditioning_image, resolution, random_crop, random_flip, generator,
                    interpolation=Image.BILINEAR):
    """The target image in [-1, 1] (what the VAE encodes) and the conditioning image in [0, 1] (what the ControlNet
    reads), resized, cropped and flipped identically so that they stay aligned."""
    crop_position, flip = draw_augmentation(random_crop, random_flip, generator)
    target = preprocess_target(image, resolution, crop_position, flip, interpolation)
    conditioning = to_tensor(resize_and_crop(conditioning_image, resolution, crop_position, flip, interpolation))
    return target, conditioning


def pick_caption(caption, proportion_empty, generator):
    """The caption to train on: empty with probability `proportion_empty`, else the caption or one of a list of
    captions. Both choices come from `generator` (restorable, unlike `random.random`)."""
    drop = torch.rand(1, generator=generator).item() < proportion_empty
    if drop or caption is None:
        return ""
    if isinstance(caption, str):
        return caption
    captions = list(caption)
    if not captions:
        return ""
    return str(captions[int(torch.randint(0, len(captions), (1,), generator=generator))])


class ControlNetExamples(torch.utils.data.Dataset):
    """Indexed by (epoch, index) from randomness.EpochSampler. Prompt dropout, caption choice, crop and flip depend only
    on the run seed, the epoch and the sample index, so they are the same on resume and with any number of workers.

    With `--max_train_samples` the subset is drawn from the run seed too, lazily: a resumed run learns its seed from
    the checkpoint only after the dataset is built.

    Once `use_latent_cache` / `use_text_cache` are called, examples hold the cached latent distribution of the target
    image / the caption's text embedding instead of pixels / token ids (the conditioning image is still read); the
    random draws stay the same, so the training run does not change. Every example also holds its target image's
    original size, crop and target size (SDXL's time ids; SD ignores them). `tokenizers`: one (SD) or two (SDXL).

    `plan` (plan_rows; default: every row at the --resolution square, no mask) gives each row its target size, a
    bucket or the square, which the image and its conditioning image are both resized to cover and cropped to with
    the same box, and with --masked_loss its loss mask (`loss_mask`, (1, h, w) at the latent grid)."""

    def __init__(self, dataset, tokenizers, args, run_state, plan=None):
        self.tokenizers = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
        self.dataset, self.args, self.run_state = dataset, args, run_state
        self.plan = plan or RowPlan(args.resolution)
        self.interpolation = INTERPOLATION_MODES[args.image_interpolation_mode or "bilinear"]
        self.size = len(dataset) if args.max_train_samples is None else min(args.max_train_samples, len(dataset))
        self._subset = (None, None)  # (seed, indices)
        self.latent_cache = self.image_keys = None
        self.text_cache = self.caption_keys = None

    def rows(self):
        """The dataset rows this run trains on."""
        return [self._row(index) for index in range(self.size)]

    def buckets_of_samples(self):
        """The (height, width) each sample index trains at, for bucketing.BucketBatchSampler."""
        return [target_shape(self.plan.target(row)) for row in self.rows()]

    def use_latent_cache(self, cache, image_keys):
        self.latent_cache, self.image_keys = cache, image_keys
        # The target image (and mask) columns are no longer read: skip decoding them.
        a = self.args
        self.dataset = self.dataset.select_columns(list(dict.fromkeys([a.conditioning_image_column,
                                                                       a.caption_column])))

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
        caption = pick_caption(example[a.caption_column], a.proportion_empty_prompts, generator)
        item = {}
        # The draws preprocess_pair makes (a centre crop draws nothing, then the flip), cached or not.
        crop_position, flip = draw_augmentation(a.random_crop, a.random_flip, generator)
        target = self.plan.target(row)
        if self.latent_cache is None:
            image = example[a.image_column]
            item["pixel_values"] = preprocess_target(image, target, crop_position, flip, self.interpolation)
            original_size, crop = size_and_crop(image, target, crop_position, flip)
            if self.plan.mask(row) is not None:
                item["loss_mask"] = preprocess_mask(self.load_mask(example, row), target, crop_position, flip)
        else:
            entry = self.latent_cache.load(self.image_keys[row])
            item["latent_dist"] = entry["flipped" if flip else "latent_dist"]
            original_size, crop = entry["original_size"], entry["flipped_crop_top_left" if flip else "crop_top_left"]
            if self.plan.mask(row) is not None:
                item["loss_mask"] = entry["flipped_mask" if flip else "mask"]
        item["conditioning_pixel_values"] = to_tensor(resize_and_crop(
            example[a.conditioning_image_column], target, crop_position, flip, self.interpolation))
        item["original_size"], item["crop_top_left"] = torch.as_tensor(original_size), torch.as_tensor(crop)
        item["target_size"] = torch.as_tensor(target_shape(target))
        if self.text_cache is None:
            item.update(zip(INPUT_IDS, self.token_ids(caption)))
        else:
            entry = self.text_cache.load(self.caption_keys[caption])
            item["encoder_hidden_states"] = entry["hidden_states"]
            if "pooled_prompt_embeds" in entry:
                item["pooled_prompt_embeds"] = entry["pooled_prompt_embeds"]
        return item

    def load_mask(self, example, row):
        """The 'L' loss mask of a decoded row's target image (plan_rows checked that it exists and fits)."""
        kind, where = self.plan.mask(row)
        image = example[self.args.image_column]
        if kind == "none":
            return Image.new("L", image.size, 255)
        mask = example[self.args.mask_column] if kind == "column" else where if kind == "file" else None
        return bucketing.load_mask(image, mask)


def all_captions(cells):
    """Every caption a row can be trained with: the caption, or each of a list (pick_caption's choices)."""
    for cell in cells:
        if cell is None or isinstance(cell, str):
            yield cell or ""
        else:
            yield from (str(caption) for caption in cell) if len(cell) else [""]


def build_dataloader(train_dataset, args, run_state, pin_memory):
    """Batches of `train_batch_size` (epoch, index) samples in an order that depends only on the run seed and the
    epoch: a shuffle of all samples (randomness.EpochSampler) or, with buckets, batches that each hold one bucket
    (bucketing.BucketBatchSampler, whose number of batches is the epoch's; a bucket's last batch may be smaller).
    Returns (data loader, the sampler whose set_epoch the training loop calls)."""
    if args.buckets is None:
        sampler = randomness.EpochSampler(len(train_dataset), run_state, SHUFFLE_STREAM)
        return torch.utils.data.DataLoader(
            train_dataset, batch_size=args.train_batch_size, sampler=sampler,
            num_workers=args.dataloader_num_workers, pin_memory=pin_memory,
        ), sampler
    sampler = bucketing.BucketBatchSampler(train_dataset.buckets_of_samples(), args.train_batch_size, run_state,
                                        SHUFFLE_STREAM)
    return torch.utils.data.DataLoader(train_dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
                                       pin_memory=pin_memory), sampler


# ----------------------------------------------------------------------------------------------------------------------
# Feature cache: latents and text embeddings computed once, then the VAE / text encoder leave memory
# ----------------------------------------------------------------------------------------------------------------------


def latent_cache_settings(args, plan):
    """What every latent entry depends on besides its own image: the folder's settings. A bucketed run keys each
    entry by its bucket instead of one --resolution (latent_cache_key), so that new bucket settings recompute only
    the images whose bucket changed; --masked_loss entries also hold the mask."""
    settings = {"resolution": args.resolution, "interpolation": args.image_interpolation_mode or "bilinear",
                "crop": "center", "flip": args.random_flip,
                # Entries also hold the image's size and crop (SDXL's time ids); earlier entries did not.
                "entries": "latent_dist+size+crop"}
    if plan.targets is not None:
        settings["resolution"] = "the entry's bucket"
    if plan.masks is not None:
        settings.update(entries="latent_dist+size+crop+mask", mask_resize="bilinear", mask_grid=8)
    return settings


def latent_cache_key(image_key, plan, row):
    """An entry's key: the image's digest, with its bucket and its mask's digest where the run has them."""
    extra = ([list(plan.target(row))] if plan.targets is not None else []) + \
        ([plan.mask(row)[1]] if plan.masks is not None else [])
    return feature_cache.fingerprint(image_key, *extra) if extra else image_key


def cache_latents(accelerator, train_dataset, vae, args, weight_dtype):
    """Fill the latent cache for the target images of the rows this run trains on (split across ranks) and switch
    the dataset to it: each at its target size (bucket), with its mask at the latent grid under --masked_loss. Not
    with --random_crop (checked by validate_args)."""
    from datasets import Image as ImageFeature

    plan = train_dataset.plan
    interpolation = INTERPOLATION_MODES[args.image_interpolation_mode or "bilinear"]
    cache = feature_cache.FeatureCache(args.feature_cache_dir, "latents", {
        "vae": feature_cache.model_fingerprint(vae), "dtype": str(weight_dtype), **latent_cache_settings(args, plan)})
    rows = train_dataset.rows()
    # Decoded by the dataset's own image feature, as the uncached run decodes them.
    decoder = train_dataset.dataset.features[args.image_column]
    # Undecoded cells ({"bytes", "path"}), read in chunks: a dataset that embeds its images can be larger than memory.
    cells = train_dataset.dataset.select_columns([args.image_column]).cast_column(
        args.image_column, ImageFeature(decode=False))
    image_keys = {}
    for start in range(0, len(rows), 1000):
        chunk = rows[start:start + 1000]
        image_keys.update((row, latent_cache_key(feature_cache.image_fingerprint(cell), plan, row))
                          for row, cell in zip(chunk, cells[chunk][args.image_column]))

    def encode_views(pixels):
        """Latent distribution parameters of (N, 3, H, W) pixels and, with --random_flip, of their mirror images."""
        # A flip is exact on pixels: the flipped view is what resize_and_crop(..., flip=True) gives.
        views = torch.cat([pixels, pixels.flip(-1)]) if args.random_flip else pixels
        parameters = vae.encode(views.to(accelerator.device, weight_dtype)).latent_dist.parameters
        return parameters[:len(pixels)], parameters[len(pixels):]

    def encode(batch_rows):
        examples = [train_dataset.dataset[row] for row in batch_rows] if plan.masks is not None else None
        images = [decoder.decode_example(cell) for cell in cells[batch_rows][args.image_column]]
        pixels = [preprocess_target(image, plan.target(row), (0.5, 0.5), False, interpolation)
                  for row, image in zip(batch_rows, images)]
        # Rows of one shape are encoded together (buckets differ in shape).
        parameters, flipped = [None] * len(pixels), [None] * len(pixels)
        for shape in dict.fromkeys(tuple(p.shape) for p in pixels):
            indices = [i for i, p in enumerate(pixels) if tuple(p.shape) == shape]
            straight, mirrored = encode_views(torch.stack([pixels[i] for i in indices]))
            for n, i in enumerate(indices):
                parameters[i], flipped[i] = straight[n], mirrored[n] if args.random_flip else None
        entries = []
        for i, (row, image) in enumerate(zip(batch_rows, images)):
            target = plan.target(row)
            size, crop = size_and_crop(image, target, (0.5, 0.5), False)
            entry = {"latent_dist": parameters[i], "original_size": torch.tensor(size),
                     "crop_top_left": torch.tensor(crop)}
            if args.random_flip:
                flipped_crop = size_and_crop(image, target, (0.5, 0.5), True)[1]
                entry.update(flipped=flipped[i], flipped_crop_top_left=torch.tensor(flipped_crop))
            if examples is not None:
                mask = train_dataset.load_mask({**examples[i], args.image_column: image}, row)
                entry["mask"] = preprocess_mask(mask, target, (0.5, 0.5), False)
                if args.random_flip:
                    entry["flipped_mask"] = preprocess_mask(mask, target, (0.5, 0.5), True)
            entries.append(entry)
        return entries

    vae.to(accelerator.device, dtype=weight_dtype)
    cache.fill(accelerator, {key: row for row, key in image_keys.items()}, encode, args.train_batch_size)
    train_dataset.use_latent_cache(cache, image_keys)


def cache_text_embeddings(accelerator, train_dataset, text_encoders, args, weight_dtype):
    """Fill the text-embedding cache for every caption of the rows this run trains on, and the empty prompt when
    --proportion_empty_prompts can pick it, and switch the dataset to it. Entries hold what the family's
    `encode_prompt` returns (the hidden states, and the pooled embedding where there is one) and are keyed by token
    ids, so a different tokenizer is a miss too."""
    if not isinstance(text_encoders, (list, tuple)):
        text_encoders = [text_encoders]
    settings = {name: feature_cache.model_fingerprint(model)
                for name, model in zip(args.family.text_encoder_parts, text_encoders)}
    cache = feature_cache.FeatureCache(args.feature_cache_dir, "text_embeddings",
                                       {**settings, "dtype": str(weight_dtype)})
    rows = train_dataset.rows()
    captions = set(all_captions(train_dataset.dataset.select(rows)[args.caption_column]))
    if args.proportion_empty_prompts > 0:
        captions.add("")
    token_ids = {caption: train_dataset.token_ids(caption) for caption in sorted(captions)}
    caption_keys = {caption: feature_cache.fingerprint(*(ids.tolist() for ids in per_tokenizer))
                    for caption, per_tokenizer in token_ids.items()}

    def encode(batch_ids):
        hidden_states, pooled = args.family.encode_prompt(text_encoders, [torch.stack(ids) for ids in zip(*batch_ids)])
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


def load_models(args):
    """(noise_scheduler, tokenizers, text_encoders, vae, unet) from the pretrained pipeline: the family's tokenizers
    (--tokenizer_name replaces the first) and text encoders; the VAE from --pretrained_vae_model_name_or_path if
    given. Load errors are InputErrors naming the part that failed."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    # Trained with DDPM noising whatever the pipeline samples with (some ship EulerDiscreteScheduler), as upstream.
    noise_scheduler = load_part(args, "scheduler", DDPMScheduler.from_pretrained)
    first_tokenizer, *other_tokenizers = args.family.tokenizer_parts
    if args.tokenizer_name is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision,
                                                      cache_dir=args.cache_dir)
        except Exception as error:
            raise InputError(f"--tokenizer_name {args.tokenizer_name!r}: cannot load "
                             f"({cli.first_line(error)})") from None
    else:
        tokenizer = load_part(args, first_tokenizer, AutoTokenizer.from_pretrained)
    tokenizers = [tokenizer] + [load_part(args, part, AutoTokenizer.from_pretrained) for part in other_tokenizers]
    # Each frozen model loads outside ZeRO-3's partitioning (frozen_models_outside_zero3 does not nest).
    text_encoders = load_frozen_text_encoders(args)
    vae = load_frozen_vae(args)
    with distributed.frozen_models_outside_zero3():
        unet = load_part(args, "unet", UNet2DConditionModel.from_pretrained, variant=args.variant)

    if args.prediction_type is not None:
        # The scheduler config is what the loss target and the validation pipeline read.
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise InputError(f"the scheduler predicts {noise_scheduler.config.prediction_type!r}; "
                         "pass --prediction_type epsilon or v_prediction")
    return noise_scheduler, tokenizers, text_encoders, vae, unet


def load_part(args, part, loader, **kwargs):
    """One part (unet/, vae/, ...) of the pretrained pipeline; a load error is an InputError naming it."""
    source = args.pretrained_model_name_or_path
    try:
        return loader(source, subfolder=part, revision=args.revision, cache_dir=args.cache_dir, **kwargs)
    except Exception as error:
        raise InputError(f"--pretrained_model_name_or_path {source!r}: cannot load {part}/ "
                         f"({cli.first_line(error)})") from None


def load_frozen_vae(args, device=None, dtype=None):
    """The frozen VAE (--pretrained_vae_model_name_or_path's if given): for load_models, and again for validation
    after --cache_latents dropped it (then on `device` in `dtype`)."""
    with distributed.frozen_models_outside_zero3():
        vae = args.family.load_vae(args)
    vae.requires_grad_(False)
    return vae if device is None else vae.to(device, dtype=dtype)


def load_frozen_text_encoders(args, device=None, dtype=None):
    """The family's frozen text encoders: for load_models, and again for validation after --cache_text_embeddings
    dropped them (then on `device` in `dtype`)."""
    with distributed.frozen_models_outside_zero3():
        text_encoders = args.family.load_text_encoders(args)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
    return text_encoders if device is None else [model.to(device, dtype=dtype) for model in text_encoders]


def frozen_dtype(accelerator):
    """The VAE, UNet and text encoder run in the mixed-precision dtype; the trained ControlNet stays fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def build_controlnet(args, unet):
    """The ControlNet to train, in fp32: loaded from --controlnet_model_name_or_path, or a copy of the UNet's encoder
    whose output ("zero") convolutions start at zero, so that before training it leaves the UNet's output unchanged."""
    from diffusers import ControlNetModel

    if args.controlnet_model_name_or_path is None:
        cli.logger.info("Initialising the ControlNet from the UNet")
        controlnet = ControlNetModel.from_unet(unet)
    else:
        try:
            controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path, cache_dir=args.cache_dir)
        except Exception as error:
            raise InputError(
                f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path!r}: cannot load "
                f"({cli.first_line(error)})"
            ) from None
        check_controlnet_fits(args, dict(controlnet.config), dict(unet.config))
    # Upstream refuses a half-precision ControlNet; the trained weights (and their optimizer states) must be fp32.
    return controlnet if controlnet.dtype == torch.float32 else controlnet.to(torch.float32)


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
    """The `added_cond_kwargs` the ControlNet and the UNet both read, as the family makes them (None where the UNet
    takes none) from the pooled embedding and each sample's original size, real crop and target size (its bucket, or
    the --resolution square); --crops_coords_top_left_h/_w, where the family takes them, replace the crop (as
    upstream)."""
    crops = args.family.time_id_crops(args, batch["crop_top_left"])
    target_sizes = batch.get("target_size", (args.resolution, args.resolution))
    return args.family.added_conditions(pooled_prompt_embeds, batch["original_size"], crops, target_sizes)


def training_loss(controlnet, unet, vae, text_encoders, noise_scheduler, batch, generator, args, weight_dtype,
                  scaling_factor):
    """The diffusion loss of one batch: encode images and captions with the frozen models (or take them from the
    cache), noise the latents, let the ControlNet read the conditioning image (and the same added conditions as the
    UNet, where the family has them) and feed its residuals into the frozen UNet, weight by Min-SNR.

    Every random draw (latent sampling, noise, timesteps) comes from `generator`, so a resumed run repeats it."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    with torch.no_grad():
        if "latent_dist" in batch:
            latent_dist = DiagonalGaussianDistribution(batch["latent_dist"])
        else:
            latent_dist = vae.encode(batch["pixel_values"].to(args.family.vae_dtype(args, weight_dtype))).latent_dist
        latents = latent_dist.sample(generator=generator).float() * scaling_factor
        if "encoder_hidden_states" in batch:
            encoder_hidden_states, pooled = batch["encoder_hidden_states"], batch.get("pooled_prompt_embeds")
        else:
            input_ids = [batch[key] for key in INPUT_IDS if key in batch]
            encoder_hidden_states, pooled = args.family.encode_prompt(text_encoders, input_ids)
    added_cond_kwargs = added_conditions(batch, pooled, args)
    unet_added_cond_kwargs = added_cond_kwargs and {key: value.to(weight_dtype)
                                                    for key, value in added_cond_kwargs.items()}

    noise = objectives.sample_noise(latents, generator, args.noise_offset)
    timesteps = objectives.sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, generator,
                                        latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

    down_residuals, mid_residual = controlnet(
        noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=batch["conditioning_pixel_values"], added_cond_kwargs=added_cond_kwargs, return_dict=False,
    )
    model_pred = unet(
        noisy_latents.to(weight_dtype), timesteps, encoder_hidden_states=encoder_hidden_states.to(weight_dtype),
        added_cond_kwargs=unet_added_cond_kwargs,
        down_block_additional_residuals=[residual.to(weight_dtype) for residual in down_residuals],
        mid_block_additional_residual=mid_residual.to(weight_dtype), return_dict=False,
    )[0]

    prediction_type = noise_scheduler.config.prediction_type
    target = objectives.loss_target(noise_scheduler, prediction_type, latents, noise, timesteps)
    weights = None
    if args.snr_gamma is not None:
        weights = objectives.min_snr_loss_weights(noise_scheduler, timesteps, args.snr_gamma, prediction_type)
    # --masked_loss: each latent pixel's error weighted by the mask (an all-ones mask is the plain loss exactly).
    return objectives.diffusion_loss(model_pred, target, weights, mask=batch.get("loss_mask"))


# ----------------------------------------------------------------------------------------------------------------------
# Validation, saving, model card
# ----------------------------------------------------------------------------------------------------------------------


def validation_pipeline(args, scheduler, **components):
    """The family's ControlNet pipeline (e.g. StableDiffusionControlNetPipeline) from the models in memory."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(scheduler.config)
    pipeline_class = args.family.pipeline_class("controlnet")
    return pipeline_class(**components, scheduler=scheduler, **args.family.pipeline_kwargs)


def validation_size(args):
    """(height, width) of validation images: --validation_height/--validation_width, else the --resolution square."""
    return args.validation_height or args.resolution, args.validation_width or args.resolution


def generate_validation_images(accelerator, controlnet, unet, vae, text_encoders, tokenizers, noise_scheduler, args,
                               seed):
    """Render --num_validation_images images for every (prompt, conditioning image) pair, the work split across all
    ranks (no rank idles past a collective timeout). Image k of pair i always comes from a generator seeded from
    (run seed, i, k), so the images do not depend on the number of processes.

    The main process gets [{"prompt", "conditioning", "images"}] in pair order, other ranks None."""
    from accelerate.utils import gather_object

    pairs = args.validation_pairs
    jobs = [(pair, k) for pair in range(len(pairs)) for k in range(args.num_validation_images)]
    mine = jobs[accelerator.process_index::accelerator.num_processes]
    interpolation = INTERPOLATION_MODES[args.image_interpolation_mode or "bilinear"]
    height, width = validation_size(args)
    conditioning = [resize_and_crop(Image.open(path), (height, width), (0.5, 0.5), False, interpolation)
                    for _, path in pairs]
    rendered = []
    if mine:
        # A frozen model the cache made unnecessary (None) is loaded again for the length of the validation.
        weight_dtype = frozen_dtype(accelerator)
        if vae is None:
            vae = load_frozen_vae(args, accelerator.device, args.family.vae_dtype(args, weight_dtype))
        text_encoders = text_encoders or load_frozen_text_encoders(args, accelerator.device, weight_dtype)
        pipeline = validation_pipeline(args, noise_scheduler, vae=vae, unet=unet, controlnet=controlnet,
                                       **dict(zip(args.family.text_encoder_parts, text_encoders)),
                                       **dict(zip(args.family.tokenizer_parts, tokenizers)))
        pipeline.set_progress_bar_config(disable=True)
        if args.enable_xformers_memory_efficient_attention:
            pipeline.enable_xformers_memory_efficient_attention()
        was_training = controlnet.training
        controlnet.eval()
        for pair, k in mine:
            generator = randomness.make_generator(accelerator.device, seed, VALIDATION_STREAM, pair, k)
            with torch.no_grad(), accelerator.autocast():
                image = pipeline(
                    pairs[pair][0], image=conditioning[pair], num_inference_steps=args.validation_inference_steps,
                    generator=generator, height=height, width=width, output_type="np",
                ).images[0]
            rendered.append((pair, k, (image * 255).round().astype("uint8")))
        controlnet.train(was_training)
        del pipeline
    gathered = gather_object(rendered) if accelerator.num_processes > 1 else rendered
    if not accelerator.is_main_process:
        return None
    logs = [{"prompt": prompt, "conditioning": conditioning[i], "images": []} for i, (prompt, _) in enumerate(pairs)]
    for pair, _, image in sorted(gathered, key=lambda item: item[:2]):
        logs[pair]["images"].append(Image.fromarray(image))
    return logs


def log_validation_images(accelerator, logs, name, global_step, args):
    """Save one grid per pair (conditioning image, then the generated images) under output_dir/validation/<name>/ and
    send the images to TensorBoard / wandb (main process)."""
    from diffusers.utils import make_image_grid

    folder = os.path.join(args.output_dir, "validation", name)
    os.makedirs(folder, exist_ok=True)
    key = "test" if name == "final" else "validation"
    wandb_images = []
    for index, log in enumerate(logs):
        tiles = [log["conditioning"]] + log["images"]
        make_image_grid(tiles, 1, len(tiles)).save(os.path.join(folder, f"pair_{index:02d}.png"))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                batch = np.stack([np.asarray(tile) for tile in tiles])
                tracker.writer.add_images(f"{key}/{index}: {log['prompt']}", batch, global_step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                wandb_images.append(wandb.Image(log["conditioning"], caption="Controlnet conditioning"))
                wandb_images += [wandb.Image(image, caption=log["prompt"]) for image in log["images"]]
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({key: wandb_images}, step=global_step)
    return folder


def training_size(args):
    if args.buckets is None:
        return f"at {args.resolution}x{args.resolution}"
    return f"in aspect-ratio buckets (height,width: {args.buckets.describe()})"


def write_model_card(args, global_step, logs):
    from diffusers.utils import make_image_grid
    from huggingface_hub import ModelCard, ModelCardData

    data = args.dataset_name or args.train_data_dir
    gallery = ""
    if logs:
        gallery = "Images generated with the trained ControlNet (conditioning image first):\n\n"
        for index, log in enumerate(logs):
            log["conditioning"].save(os.path.join(args.output_dir, "image_control.png"))
            tiles = [log["conditioning"]] + log["images"]
            make_image_grid(tiles, 1, len(tiles)).save(os.path.join(args.output_dir, f"images_{index}.png"))
            gallery += f"prompt: {log['prompt']}\n![images_{index}](./images_{index}.png)\n\n"
    example_prompt = logs[0]["prompt"] if logs else "red circle with blue background"
    pipeline_name = args.family.pipelines["controlnet"]
    description = f"""
# ControlNet trained on {args.pretrained_model_name_or_path}

ControlNet weights for **{args.pretrained_model_name_or_path}**, trained on **{data}** with `train_controlnet.py`
for {global_step} optimizer steps {training_size(args)}.

{gallery}
## Usage

```python
from diffusers import ControlNetModel, {pipeline_name}
from diffusers.utils import load_image

controlnet = ControlNetModel.from_pretrained("{args.hub_model_id or args.output_dir}")
pipeline = {pipeline_name}.from_pretrained("{args.pretrained_model_name_or_path}", controlnet=controlnet)
image = pipeline({example_prompt!r}, image=load_image("conditioning.png")).images[0]
```

## Training

| setting | value |
|---|---|
| initialised from | {args.controlnet_model_name_or_path or "the UNet (zero convolutions)"} |
| epochs, steps | {args.num_train_epochs}, {global_step} |
| batch size per device x accumulation | {args.train_batch_size} x {args.gradient_accumulation_steps} |
| learning rate, scheduler, warmup | {args.learning_rate}, {args.lr_scheduler}, {args.lr_warmup_steps} |
| proportion of empty prompts | {args.proportion_empty_prompts} |
| Min-SNR gamma, noise offset | {args.snr_gamma}, {args.noise_offset} |
| mixed precision | {args.mixed_precision} |
| seed | {args.seed} |
"""
    if args.pretrained_vae_model_name_or_path:
        description += f"| VAE | {args.pretrained_vae_model_name_or_path} |\n"
    if args.buckets is not None:
        description += f"| aspect-ratio buckets (height,width) | {args.buckets.describe()} |\n"
    if args.masked_loss:
        mask_source = f"the `{args.mask_column}` column" if args.mask_column else "alpha channels / `name.mask.png`"
        description += f"| masked loss | yes, masks from {mask_source} |\n"
    hub_tag = args.family.hub_tag
    tags = [hub_tag, f"{hub_tag}-diffusers", "text-to-image", "diffusers", "controlnet", "diffusers-training"]
    base_model = args.pretrained_model_name_or_path if not os.path.isdir(args.pretrained_model_name_or_path) else None
    card_data = ModelCardData(library_name="diffusers", tags=tags, base_model=base_model,
                              license=args.family.license, inference=True)
    card = ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n{{ model_description }}",
                                   model_description=description)
    card.save(os.path.join(args.output_dir, "README.md"))


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def enable_gradient_checkpointing(args, controlnet, unet):
    """--gradient_checkpointing recomputes the ControlNet's activations (upstream's flag, upstream's meaning);
    --gradient_checkpointing_unet the frozen UNet's, which the loss also backpropagates through into the ControlNet's
    residuals. Either changes memory and speed only, never the result."""
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if args.gradient_checkpointing_unet:
        unet.enable_gradient_checkpointing()


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
    from diffusers import ControlNetModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # Validation and saving run between steps; give them far more than the default collective timeout.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=7200))],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = get_logger(__name__, log_level="INFO")
    if not accelerator.is_local_main_process:
        for library in (datasets, transformers, diffusers):
            library.utils.logging.set_verbosity_error()
    distributed.adopt_engine_settings(accelerator, args.train_batch_size, args.max_grad_norm, supports_zero3=True)
    preemption = checkpointing.PreemptionHandler(accelerator)

    run_state = randomness.RunState(randomness.run_seed(args, accelerator))
    accelerator.register_for_checkpointing(run_state)
    set_seed(run_state.seed)

    # Data first: a bad dataset is reported before any model is built or anything is written.
    with accelerator.main_process_first():
        examples, plan = load_training_rows(args)

    noise_scheduler, tokenizers, text_encoders, vae, unet = load_models(args)
    controlnet = build_controlnet(args, unet)
    # Frozen parts run in the mixed-precision dtype (SDXL's own VAE in fp32); the trained ControlNet stays fp32 (its
    # optimizer states too).
    weight_dtype = frozen_dtype(accelerator)
    unet.requires_grad_(False)
    controlnet.train()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if args.enable_npu_flash_attention:
        unet.enable_npu_flash_attention()
        controlnet.enable_npu_flash_attention()
    enable_gradient_checkpointing(args, controlnet, unet)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    train_dataset = ControlNetExamples(examples, tokenizers, args, run_state, plan)
    train_dataloader, epoch_sampler = build_dataloader(train_dataset, args, run_state,
                                                       pin_memory=accelerator.device.type == "cuda")

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(args, controlnet.parameters())
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
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    def save_model_hook(models, weights, output_dir):
        # A checkpoint is usable by itself: controlnet/ loads with ControlNetModel.from_pretrained. Every rank gathers
        # (ZeRO-3), the main process writes.
        for saved in models:
            model = distributed.whole_model(accelerator, saved, device="cpu")
            if accelerator.is_main_process:
                model.save_pretrained(os.path.join(output_dir, "controlnet"))
        weights.clear()  # the controlnet/ folder replaces accelerate's own copy of the weights

    def load_model_hook(models, input_dir):
        # Under DeepSpeed `models` is empty: the engine restores its own (sharded) weights.
        while models:
            target = accelerator.unwrap_model(models.pop())
            target.load_state_dict(ControlNetModel.from_pretrained(input_dir, subfolder="controlnet").state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    controlnet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        controlnet, optimizer, train_dataloader, lr_scheduler
    )
    unet.to(accelerator.device, dtype=weight_dtype)

    global_step = checkpointing.resume_from_checkpoint(accelerator, args, run_state)

    # The frozen VAE and text encoder go to the device, or fill the cache (the rows trained on depend on the seed,
    # known only now for a resumed run) and leave memory; validation loads them again when it needs them.
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
            text_encoder.to(accelerator.device, dtype=weight_dtype)
    feature_cache.free_memory()

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), exist_ok=True,
                token=args.hub_token,
            ).repo_id
        # TensorBoard cannot store lists (the validation prompts and images) as hyperparameters.
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracked)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataset)} examples, {args.num_train_epochs} epochs of {steps_per_epoch} steps, "
        f"{args.max_train_steps} steps in all, batch {args.train_batch_size} per device, total batch {total_batch_size}"
    )

    def validate(name, model):
        logs = generate_validation_images(accelerator, model, unet, vae, text_encoders, tokenizers, noise_scheduler,
                                          args, run_state.seed)
        if accelerator.is_main_process:
            folder = log_validation_images(accelerator, logs, name, global_step, args)
            logger.info(f"Saved validation images to {folder}")
        return logs

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
        controlnet.train()
        loader, start = train_dataloader, 0
        if epoch == first_epoch and batches_to_skip:
            loader, start = accelerator.skip_first_batches(train_dataloader, batches_to_skip), batches_to_skip
        randomness.set_epoch(loader, epoch_sampler, epoch)
        for batch_index, batch in enumerate(loader, start=start):
            generator = randomness.make_generator(
                accelerator.device, run_state.seed, NOISE_STREAM, epoch, batch_index, accelerator.process_index
            )
            with accelerator.accumulate(controlnet):
                loss = training_loss(controlnet, unet, vae, text_encoders, noise_scheduler, batch, generator, args,
                                     weight_dtype, scaling_factor)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)
            running_loss += loss.detach()
            running_batches += 1

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)

            if global_step % args.logging_steps == 0:
                mean_loss = accelerator.reduce(running_loss, reduction="mean").item() / running_batches
                logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
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
            # After the stop check: a preempted run saves and exits without waiting for validation images.
            if args.validation_pairs and global_step % args.validation_steps == 0:
                validate(f"step_{global_step:06d}", distributed.whole_model(accelerator, controlnet))
            if global_step >= args.max_train_steps:
                break
    progress_bar.close()

    # The final ControlNet: config.json + diffusion_pytorch_model.safetensors at the top of output_dir.
    final_controlnet = distributed.whole_model(accelerator, controlnet, device="cpu")
    if accelerator.is_main_process:
        final_controlnet.save_pretrained(args.output_dir)
        logger.info(f"Saved the ControlNet to {args.output_dir}")
    accelerator.wait_for_everyone()

    # A last validation round with the ControlNet as saved (what users will load), shown in the model card.
    final_logs = None
    if args.validation_pairs:
        saved = ControlNetModel.from_pretrained(args.output_dir).to(accelerator.device)
        final_logs = validate("final", saved)
        del saved
    if accelerator.is_main_process:
        write_model_card(args, global_step, final_logs)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=["step_*", "epoch_*", "checkpoint-*", f"{checkpointing.PARTIAL_PREFIX}*", "logs/*"],
                token=args.hub_token,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    cli.run_main(main)
