#!/usr/bin/env python
"""Fine-tune a Stable Diffusion or SDXL UNet for instruction-based image editing (InstructPix2Pix, full fine-tuning).

A drop-in replacement for diffusers' `examples/instruct_pix2pix/train_instruct_pix2pix.py` and, given an SDXL base
model, for `train_instruct_pix2pix_sdxl.py`: the same flags and defaults, the same output layout (a
`StableDiffusionInstructPix2PixPipeline` or `StableDiffusionXLInstructPix2PixPipeline` folder in `--output_dir`,
`checkpoint-N/` folders), plus `--config`, `--logging_steps`, `--validation_inference_steps`, `--snr_gamma`,
`--noise_offset`, `--offload_ema`/`--foreach_ema`, `--cache_latents`/`--cache_text_embeddings` (VAE latents and
prompt embeddings computed once, kept on disk under `--feature_cache_dir` and reused; the frozen models then leave
memory), exact resume, atomic checkpoints, preemption handling, and the raw (non-EMA) weights kept in `unet_raw/` when
`--use_ema` is on. For real datasets (SPEC §9): aspect-ratio buckets (`--use_aspect_ratio_buckets`,
`--aspect_ratio_buckets`; the bucket is chosen from the original image, and the edited image gets exactly the same
resize, crop and flip), `--masked_loss` (the edited image's alpha channel, `name.mask.png` beside it, or
`--mask_column`: the loss is on the edited image's latents), `--proportion_empty_prompts` and
`--validation_height/--validation_width`.

The UNet's first convolution is widened from 4 to 8 input channels: the noisy latent of the edited image and the
(unscaled) VAE latent of the original image are concatenated, and the 4 new input channels start at zero, so the
untrained model behaves exactly like the base model. On SDXL the UNet is also conditioned on the pooled embedding of
text_encoder_2 and on each sample's time ids (its real original size, crop and --resolution; explicit
--crops_coords_top_left_h/w win), and a dropped prompt drops both the hidden states and the pooled embedding.

    accelerate launch train_instruct_pix2pix.py --pretrained_model_name_or_path ./sd-folder \\
        --dataset_name fusing/instructpix2pix-1000-samples --resolution 256 --random_flip \\
        --conditioning_dropout_prob 0.05 --val_image_url ./mountain.png --validation_prompt "make it snowy"
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
SHUFFLE_STREAM, AUGMENT_STREAM, NOISE_STREAM, SUBSET_STREAM, VALIDATION_STREAM, DROPOUT_STREAM = 1, 2, 3, 4, 5, 6
EMPTY_PROMPT_STREAM = 7  # --proportion_empty_prompts: its own draws, so the other draws do not move with it
# The families this script trains, each with the defaults of its upstream script (train_instruct_pix2pix.py and
# train_instruct_pix2pix_sdxl.py) where they differ, for flags left out: the validation cadence and the tracker project.
FAMILY_DEFAULTS = {
    "sd": {"validation_epochs": 1, "tracker_project_name": "instruct-pix2pix"},
    "sdxl": {"validation_steps": 100, "tracker_project_name": "instruct-pix2pix-xl"},
}
TASK = "instruct_pix2pix"  # the families' key for this script's pipeline and flags
# Batches and caches carry each tokenizer's ids under these names (SD: the first only).
INPUT_IDS = ("input_ids", "input_ids_2")
VAE_PRECISIONS = ("bf16", "fp16", "fp32")
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
# The UNet reads the noisy edited latent and the original image's latent, 4 channels each.
LATENT_CHANNELS, EDIT_IN_CHANNELS = 4, 8
# Upstream's validation guidance: how strongly to follow the original image and the instruction.
VALIDATION_IMAGE_GUIDANCE, VALIDATION_TEXT_GUIDANCE = 1.5, 7.0
URL_PREFIXES = ("http://", "https://")


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Fine-tune a Stable Diffusion UNet for InstructPix2Pix image editing.")
    add = parser.add_argument
    # Model (upstream)
    add("--pretrained_model_name_or_path", type=str, required=True,
        help="A Stable Diffusion pipeline folder or hub id (tokenizer/, text_encoder/, vae/, unet/, scheduler/); an "
             "SDXL pipeline (with tokenizer_2/ and text_encoder_2/) trains SDXL. An InstructPix2Pix pipeline "
             "(8-channel UNet) continues training as it is.")
    add("--pretrained_vae_model_name_or_path", type=str, default=None,
        help="A VAE folder or hub id to use instead of the pipeline's, e.g. an fp16-safe SDXL VAE; it runs in the "
             "mixed-precision dtype. The saved pipeline holds this VAE.")
    add("--vae_precision", type=str, default=None, choices=VAE_PRECISIONS,
        help="SDXL: the dtype the pipeline's own VAE runs in (default fp32: SDXL's VAE overflows in fp16), as "
             "upstream; not used with --pretrained_vae_model_name_or_path.")
    add("--revision", type=str, default=None, help="Hub revision of the pretrained model.")
    add("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    add("--non_ema_revision", type=str, default=None,
        help="Revision of the UNet to train (the EMA copy starts from --revision). Defaults to --revision.")
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention.")
    # Data (upstream)
    add("--dataset_name", type=str, default=None,
        help="A dataset on the hub, or a local dataset folder (parquet/arrow/imagefolder/save_to_disk).")
    add("--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several.")
    add("--train_data_dir", type=str, default=None,
        help="An imagefolder whose metadata.jsonl/metadata.csv names both images (e.g. input_image_file_name and "
             "edited_image_file_name, or file paths in the image columns) and the edit prompt. Ignored if "
             "--dataset_name is given.")
    add("--original_image_column", type=str, default="input_image",
        help="The dataset column that holds the images before the edit.")
    add("--edited_image_column", type=str, default="edited_image",
        help="The dataset column that holds the images after the edit.")
    add("--edit_prompt_column", type=str, default="edit_prompt",
        help="The dataset column that holds the edit instructions.")
    add("--max_train_samples", type=int, default=None, help="Train on a random subset of this many examples.")
    add("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    add("--resolution", type=int, default=256,
        help="Both images are resized (short side) and cropped to this square size; a multiple of 8. With "
             "--use_aspect_ratio_buckets, the buckets hold about this many pixels squared.")
    add("--crops_coords_top_left_h", type=int, default=None,
        help="SDXL: the crop top (in the resized image) put into every sample's time ids; default: each sample's real "
             "crop.")
    add("--crops_coords_top_left_w", type=int, default=None,
        help="SDXL: the crop left put into every sample's time ids; default: each sample's real crop.")
    add("--center_crop", action="store_true",
        help="Crop the centre instead of a random square (the same square from the original and the edited image).")
    add("--random_flip", action="store_true", help="Flip the original and the edited image together at random.")
    add("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses; 0 loads in the main one.")
    # Training (upstream)
    add("--output_dir", type=str, default="instruct-pix2pix-model", help="Where the pipeline and checkpoints go.")
    add("--seed", type=int, default=None,
        help="Seed for data order, augmentation, conditioning dropout, noise and validation images.")
    add("--train_batch_size", type=int, default=16, help="Batch size per device.")
    add("--num_train_epochs", type=int, default=100, help="Passes over the data (unless --max_train_steps is set).")
    add("--max_train_steps", type=int, default=None, help="Stop after this many optimizer steps (overrides epochs).")
    add("--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer step.")
    add("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet backward.")
    add("--learning_rate", type=float, default=1e-4, help="Initial learning rate (after warmup).")
    add("--scale_lr", action="store_true",
        help="Multiply the learning rate by processes x accumulation steps x batch size.")
    add("--lr_scheduler", type=str, default="constant", help=f"One of {', '.join(LR_SCHEDULERS)}.")
    add("--lr_warmup_steps", type=int, default=500, help="Learning-rate warmup in optimizer steps.")
    add("--conditioning_dropout_prob", type=float, default=None,
        help="Conditioning dropout p (0 to 1) for classifier-free guidance on both conditions: per sample, u < 2p "
             "drops the edit prompt and p <= u < 3p drops the original image (so p <= u < 2p drops both). The "
             "InstructPix2Pix paper uses 0.05.")
    add("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    add("--use_ema", action="store_true", help="Keep an EMA of the UNet weights; the final pipeline holds the EMA.")
    add("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    add("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    add("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    add("--adam_epsilon", type=float, default=1e-08, help="Adam epsilon.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Default: accelerate's config. The frozen VAE and text encoder run in this precision; the UNet "
             "weights stay fp32.")
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help="A checkpoint-N folder (name in --output_dir, or path) or 'latest' to continue training from.")
    # Validation, logging and hub (upstream)
    add("--val_image_url", type=str, default=None,
        help="The image to edit for validation: a local path or an http(s) URL. Needs --validation_prompt.")
    add("--validation_prompt", type=str, default=None,
        help="The edit instruction applied to --val_image_url every --validation_epochs epochs and after training.")
    add("--num_validation_images", type=int, default=4, help="Edited images generated at each validation.")
    add("--val_image_url_or_path", type=str, default=None, help="Upstream SDXL's name for --val_image_url.")
    add("--validation_epochs", type=int, default=None, help="Run validation every N epochs (default 1; SDXL: off).")
    add("--validation_steps", type=int, default=None,
        help="Run validation every N optimizer steps and after the first (default: off; SDXL 100, as upstream).")
    add("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, comet_ml or all.")
    add("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    add("--push_to_hub", action="store_true", help="Upload the final pipeline to the hub.")
    add("--hub_token", type=str, default=None, help="Hub token for --push_to_hub.")
    add("--hub_model_id", type=str, default=None, help="Hub repository for --push_to_hub (default: output_dir name).")
    add("--local_rank", type=int, default=-1, help="Set by the launcher; not needed with accelerate launch.")
    # Additions
    add("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (recommended 5.0).")
    add("--noise_offset", type=float, default=0, help="Scale of offset noise.")
    add("--offload_ema", action="store_true", help="Keep the EMA weights in CPU memory between updates.")
    add("--foreach_ema", action="store_true", help="Update the EMA with torch's faster foreach kernels.")
    add("--logging_steps", type=int, default=10,
        help="Log the mean loss every N optimizer steps (the loss is not read back from the device in between).")
    add("--validation_inference_steps", type=int, default=20, help="Denoising steps for validation images.")
    add("--cache_latents", action="store_true",
        help="Encode every original and edited image with the VAE once (both orientations with --random_flip), keep "
             "the latent distributions on disk under --feature_cache_dir, reuse them in later runs, and train without "
             "the VAE in memory. Needs --center_crop: a random crop cannot be cached.")
    add("--cache_text_embeddings", action="store_true",
        help="Encode every edit prompt (and the empty prompt conditioning dropout uses) with the text encoder once, "
             "keep the embeddings on disk under --feature_cache_dir, reuse them in later runs, and train without the "
             "text encoder in memory.")
    add("--feature_cache_dir", type=str, default=None,
        help="Where --cache_latents and --cache_text_embeddings keep their files (default: $DIFFUSION_TRAINING_CACHE "
             "or ~/.cache/diffusion-training). Entries are keyed by the images, prompts, model weights, resolution "
             "and transforms, so one folder serves any number of runs; deleting it is always safe.")
    add("--proportion_empty_prompts", type=float, default=0,
        help="Replace this proportion of edit prompts (0 to 1) by the empty prompt, drawn per sample independently of "
             "--conditioning_dropout_prob (upstream's name, from the SDXL examples).")
    # Real datasets (SPEC §9): aspect-ratio buckets (chosen from the original image; the edited image follows it),
    # validation size, masked loss (the edited image's mask: the loss is on its latents)
    bucketing.add_bucket_arguments(parser)
    bucketing.add_mask_arguments(parser, column=True)
    args = cli.parse_args_with_config(parser, argv)
    if args.non_ema_revision is None:
        args.non_ema_revision = args.revision
    if args.feature_cache_dir is None:
        args.feature_cache_dir = feature_cache.default_feature_cache_dir()
    # The base model's family; the flags its upstream script defaults differently follow.
    args.family = families.select(args, FAMILY_DEFAULTS, "train_instruct_pix2pix.py")
    return args


def validate_args(args):
    """Every check that needs no model or dataset loaded. Raises InputError."""
    cli.require_positive(
        args, "resolution", "train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps",
        "learning_rate", "checkpointing_steps", "checkpoints_total_limit", "max_train_samples", "validation_epochs",
        "validation_steps", "num_validation_images", "logging_steps", "validation_inference_steps",
    )
    cli.require_multiple_of_8("--resolution", args.resolution)
    bucketing.check_bucket_flags(args)
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise InputError(f"--proportion_empty_prompts must be between 0 and 1, got {args.proportion_empty_prompts}")
    if args.mask_column is not None and not args.masked_loss:
        raise InputError("--mask_column applies only with --masked_loss")
    for name in ("lr_warmup_steps", "dataloader_num_workers", "noise_offset", "max_grad_norm",
                 "crops_coords_top_left_h", "crops_coords_top_left_w"):
        if (getattr(args, name) or 0) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.conditioning_dropout_prob is not None and not 0 <= args.conditioning_dropout_prob <= 1:
        raise InputError(f"--conditioning_dropout_prob must be between 0 and 1 (the paper uses 0.05), "
                         f"got {args.conditioning_dropout_prob}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise InputError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise InputError(f"--lr_scheduler {args.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if args.cache_latents and not args.center_crop:
        raise InputError("--cache_latents needs --center_crop: a random crop changes every epoch and cannot be cached")
    if (args.cache_latents or args.cache_text_embeddings) and os.path.isfile(args.feature_cache_dir):
        raise InputError(f"--feature_cache_dir {args.feature_cache_dir!r} is a file, not a folder")
    check_validation_args(args)

    args.family.check_folder(args.pretrained_model_name_or_path)
    args.family.refuse_flags(args, TASK)
    if args.pretrained_vae_model_name_or_path is not None:
        cli.check_local_or_hub_id("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path)
    if args.dataset_name is None and args.train_data_dir is None:
        raise InputError(
            "give --dataset_name (a hub id or a local dataset folder) or --train_data_dir (an imagefolder)"
        )
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


def check_validation_args(args):
    """Validation needs both the image and the instruction. A local image must exist and be readable now; a URL is
    fetched when the run starts (load_validation_image). --val_image_url_or_path is the same flag."""
    if args.val_image_url_or_path is not None:
        if args.val_image_url not in (None, args.val_image_url_or_path):
            raise InputError("--val_image_url and --val_image_url_or_path name different images; give one of them")
        args.val_image_url = args.val_image_url_or_path
    if args.val_image_url is not None and args.validation_prompt is None:
        raise InputError("--val_image_url needs --validation_prompt (the edit instruction to validate with)")
    if args.validation_prompt is not None and args.val_image_url is None:
        raise InputError("--validation_prompt needs --val_image_url (the image to edit for validation)")
    source = args.val_image_url
    if source is None or source.startswith(URL_PREFIXES):
        return
    if not os.path.isfile(source):
        raise InputError(f"{image_flag(args)} {source!r} does not exist (give a local image file or an http(s) URL)")
    if not cli.is_readable_image({"path": source}):
        raise InputError(f"{image_flag(args)} {source!r} is not a readable image")


def image_flag(args):
    """The flag the validation image was given with."""
    return "--val_image_url_or_path" if getattr(args, "val_image_url_or_path", None) else "--val_image_url"


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def image_columns(args):
    return (args.original_image_column, args.edited_image_column)


def mask_column(args):
    """The --mask_column of a --masked_loss run, or None (the masks then come from alpha channels or mask files)."""
    return getattr(args, "mask_column", None)


def load_edit_dataset(args):
    """The training examples as a datasets.Dataset with the original image, edited image and edit prompt columns.

    Sources: a hub dataset or local dataset folder (`--dataset_name`), or an imagefolder (`--train_data_dir`) whose
    metadata names both images. A column of file paths instead of images is read relative to the data folder. Rows
    with an unreadable image are removed with a warning naming the file.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    flag, source = ("--dataset_name", args.dataset_name) if args.dataset_name else ("--train_data_dir",
                                                                                   args.train_data_dir)
    try:
        if args.dataset_name is None:
            dataset = load_dataset("imagefolder", data_dir=source, cache_dir=args.cache_dir)
        elif any(os.path.isfile(os.path.join(source, name)) for name in ("state.json", "dataset_dict.json")):
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
    masks = mask_column(args)
    for column_flag, column in (("--original_image_column", args.original_image_column),
                                ("--edited_image_column", args.edited_image_column),
                                ("--edit_prompt_column", args.edit_prompt_column),
                                *((("--mask_column", masks),) if masks else ())):
        if column not in columns:
            raise InputError(f"{column_flag} {column!r} is not a column of {source!r}; columns: {', '.join(columns)}")
    _check_prompt_feature(dataset.features[args.edit_prompt_column], args.edit_prompt_column, source)
    dataset = dataset.select_columns([*image_columns(args), args.edit_prompt_column, *([masks] if masks else [])])
    if len(dataset) == 0:
        raise InputError(f"{flag} {source!r} holds no examples")
    for column in image_columns(args) + ((masks,) if masks else ()):
        dataset = _paths_to_images(dataset, column, source)
    # A row without a mask trains on every pixel (see EditExamples.check_masks); its mask cell is not a bad image.
    return cli.drop_unreadable_images(dataset, image_columns(args), flag, source)


def _paths_to_images(dataset, column, source):
    """A column of file names becomes an image column; relative paths are read from the data folder."""
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


def _check_prompt_feature(feature, column, source):
    """Edit prompts must be text; anything else is reported before training starts."""
    from datasets import Value

    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise InputError(f"--edit_prompt_column {column!r} of {source!r} holds {feature}; expected text")


def as_target(target):
    """(height, width) of a training target: one side (the --resolution square) or a (height, width) bucket."""
    return (target, target) if isinstance(target, int) else tuple(int(side) for side in target)


def resized_size(width, height, target_height, target_width=None):
    """(width, height) of an image resized, aspect ratio kept, to the smallest size that covers the target: for the
    square target (`target_width` omitted), its short side becomes `target_height`."""
    target_width = target_height if target_width is None else target_width
    # For a square, max(r / w, r / h) is exactly r / min(w, h): the square arithmetic, bit for bit.
    scale = max(target_width / width, target_height / height)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


def resize_to_cover(image, target, resample=Image.BICUBIC):
    """`image` resized to cover `target` = (height, width) (bicubic, PIL's default that upstream uses)."""
    return image.resize(resized_size(*image.size, *target), resample=resample)


def resize_short_side(image, resolution):
    """RGB copy of `image` whose short side is `resolution`."""
    return resize_to_cover(image.convert("RGB"), (resolution, resolution))


def crop_origin(size, target, crop_position):
    """(left, top) of the `target` = (height, width) crop at `crop_position` in an image of `size` = (width,
    height)."""
    return round(crop_position[0] * (size[0] - target[1])), round(crop_position[1] * (size[1] - target[0]))


def crop_and_flip(image, target, crop_position, flip):
    """A `target` = (height, width) crop at `crop_position` = (x, y) in [0, 1] of the room left over (0.5, 0.5 = the
    centre), flipped left-right if `flip`. The position is relative, so images of the same aspect ratio but different
    sizes get the same crop."""
    left, top = crop_origin(image.size, target, crop_position)
    image = image.crop((left, top, left + target[1], top + target[0]))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image


def to_model_range(image):
    """RGB PIL image -> (3, H, W) float tensor in [-1, 1], what the VAE encodes."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels * 2.0 - 1.0).contiguous()


CENTRE = (0.5, 0.5)  # the relative crop position of --center_crop


def draw_augmentation(center_crop, random_flip, generator):
    """(crop position, flip) of one sample, drawn from `generator` (upstream draws one for the whole batch); a centre
    crop draws nothing."""
    crop_position = CENTRE if center_crop else tuple(torch.rand(2, generator=generator).tolist())
    return crop_position, bool(random_flip and torch.rand(1, generator=generator).item() < 0.5)


def micro_conditioning(width, height, target, crop_position, flip):
    """SDXL's per-sample time-id inputs for an image of (width, height) before resizing: its original (height, width),
    the crop's (top, left) in the resized image, seen in the flipped image when flipped, and the target (height,
    width) trained at (--resolution square or the sample's bucket)."""
    target = as_target(target)
    resized = resized_size(width, height, *target)
    left, top = crop_origin(resized, target, crop_position)
    left = resized[0] - left - target[1] if flip else left
    return {"original_size": torch.tensor([height, width]), "crop_top_left": torch.tensor([top, left]),
            "target_size": torch.tensor(target)}


def preprocess_pair(original, edited, target, crop_position, flip):
    """The original and the edited image as tensors in [-1, 1], resized to cover `target` (--resolution, or a
    (height, width) bucket), cropped and flipped identically so that the edit stays aligned with its source."""
    target = as_target(target)
    return tuple(to_model_range(crop_and_flip(resize_to_cover(image.convert("RGB"), target), target, crop_position,
                                              flip))
                 for image in (original, edited))


def preprocess_mask(mask, target, crop_position, flip):
    """A loss mask ('L', the edited image's size) through the edited image's resize, crop and flip (bilinear: values
    stay in [0, 1]), averaged to one weight per latent pixel: (1, height / 8, width / 8)."""
    target = as_target(target)
    mask = crop_and_flip(resize_to_cover(mask, target, Image.BILINEAR), target, crop_position, flip)
    return bucketing.mask_to_latents(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None], 8)


# Where a row's loss mask comes from (EditExamples.check_masks): the edited image's alpha channel, a `name.mask.png`
# file beside the edited image file, or the --mask_column cell; None: no mask, every pixel trains.
ALPHA, MASK_FILE, MASK_CELL = "alpha", "file", "column"


def load_loss_mask(source, edited, mask_image=None):
    """The 'L' loss mask of the decoded `edited` image from its `source` ((kind, path)), or None."""
    if source is None:
        return None
    kind, path = source
    if kind == ALPHA:
        return bucketing.load_mask(edited)
    return bucketing.load_mask(edited, path if kind == MASK_FILE else mask_image, name="the edited image")


class EditExamples(torch.utils.data.Dataset):
    """Indexed by (epoch, index) from randomness.EpochSampler (or bucketing.BucketBatchSampler). The crop, the flip
    and the dropout draws depend only on the run seed, the epoch and the sample index, so they are the same on resume
    and with any number of workers or processes.

    With `--max_train_samples` the subset is drawn from the run seed too, lazily (a resumed run's seed is the
    checkpoint's).

    Each sample trains at its target: the --resolution square, or with buckets the bucket of its original image's
    size (read from the image headers up front); the edited image follows the original's resize, crop and flip. With
    --masked_loss a sample also holds the edited image's mask on the latent grid.

    Once `use_latent_cache` / `use_text_cache` are called, examples hold the cached latent distributions of both
    images / the prompt's embedding instead of pixels / token ids; the random draws stay the same, so the training
    run does not change. On SDXL an example also holds the edited image's original size, crop and target (its time
    ids)."""

    def __init__(self, dataset, tokenizers, args, run_state):
        self.dataset, self.tokenizers, self.args, self.run_state = dataset, tokenizers, args, run_state
        self.size = len(dataset) if args.max_train_samples is None else min(args.max_train_samples, len(dataset))
        self._subset = (None, None)  # (seed, indices)
        self.latent_cache = self.image_keys = None
        self.text_cache = self.prompt_keys = None
        # Flags of SPEC §9, absent from the namespaces older callers build.
        self.buckets = getattr(args, "buckets", None)
        self.masked_loss = getattr(args, "masked_loss", False)
        self.proportion_empty_prompts = getattr(args, "proportion_empty_prompts", 0)
        self._buckets = (None, None)  # (seed, each sample's bucket)
        self._masks = (None, None)  # (seed, {row: mask source})

    def rows(self):
        """The dataset rows this run trains on."""
        return [self._row(index) for index in range(self.size)]

    def use_latent_cache(self, cache, image_keys):
        """`image_keys`: {row: (original image's key, edited image's key)}."""
        # The buckets and mask sources are read from the image columns, which are dropped now.
        self.sample_buckets()
        self.check_masks()
        self.latent_cache, self.image_keys = cache, image_keys
        # The image columns are no longer read: skip decoding them.
        self.dataset = self.dataset.select_columns([self.args.edit_prompt_column])

    def use_text_cache(self, cache, prompt_keys):
        self.text_cache, self.prompt_keys = cache, prompt_keys

    def __len__(self):
        return self.size

    def _row(self, index):
        if self.size == len(self.dataset):
            return index
        seed, indices = self._subset
        if seed != self.run_state.seed:
            rng = np.random.default_rng(randomness.derive_seed(self.run_state.seed, SUBSET_STREAM))
            indices = rng.permutation(len(self.dataset))[: self.size].tolist()
            self._subset = (self.run_state.seed, indices)
        return indices[index]

    def undecoded(self, columns):
        """(row, {column: undecoded cell {"bytes", "path"}}) for the rows trained on, read in chunks: a dataset that
        embeds its images can be larger than memory."""
        from datasets import Image as ImageFeature

        cells = self.dataset.select_columns(list(columns))
        for column in columns:
            cells = cells.cast_column(column, ImageFeature(decode=False))
        rows = self.rows()
        for start in range(0, len(rows), 1000):
            chunk = rows[start:start + 1000]
            batch = cells[chunk]
            for offset, row in enumerate(chunk):
                yield row, {column: batch[column][offset] for column in columns}

    def sample_buckets(self):
        """Each sample's (height, width) bucket, from its original image's size (headers only), or None without
        buckets: what bucketing.BucketBatchSampler groups batches by."""
        if self.buckets is None:
            return None
        seed, buckets = self._buckets
        if seed != self.run_state.seed:
            column = self.args.original_image_column
            buckets = [self.buckets.assign(*bucketing.image_size(cells[column]))
                       for _, cells in self.undecoded([column])]
            self._buckets = (self.run_state.seed, buckets)
        return buckets

    def target(self, index):
        """(height, width) that sample `index` trains at: its bucket, or the --resolution square."""
        return as_target(self.args.resolution) if self.buckets is None else self.sample_buckets()[index]

    def check_masks(self):
        """--masked_loss: {row: where its edited image's mask comes from (None: every pixel trains)}, found up front
        from the headers so that a run without any mask, or with a mask of the wrong size, stops before training.
        {} without --masked_loss. Raises InputError."""
        if not self.masked_loss:
            return {}
        seed, sources = self._masks
        if seed != self.run_state.seed:
            a = self.args
            columns = [a.edited_image_column, *([mask_column(a)] if mask_column(a) else [])]
            sources = {row: find_mask(cells[a.edited_image_column], cells.get(mask_column(a)), row, a)
                       for row, cells in self.undecoded(columns)}
            missing = sum(source is None for source in sources.values())
            where = (f"an alpha channel in --edited_image_column {a.edited_image_column!r}, a name.mask.png beside "
                     "each edited image file" + (f", --mask_column {mask_column(a)!r}" if mask_column(a) else ""))
            if sources and missing == len(sources):
                raise InputError(f"--masked_loss: none of the {len(sources)} edited images of "
                                 f"{a.dataset_name or a.train_data_dir!r} has a mask (looked for {where})")
            if missing:
                import logging

                logging.getLogger(__name__).warning(
                    f"--masked_loss: {missing} of {len(sources)} edited images have no mask ({where}); they train "
                    "on every pixel")
            self._masks = (self.run_state.seed, sources)
        return sources

    def dropout_draw(self, epoch, index):
        """u ~ U[0, 1) for the conditioning dropout of sample `index` in `epoch` (its own stream, so turning dropout
        on or off does not change the crops and flips)."""
        generator = randomness.make_generator("cpu", self.run_state.seed, DROPOUT_STREAM, epoch, index)
        return torch.rand((), generator=generator)

    def drops_prompt(self, epoch, index):
        """--proportion_empty_prompts: whether sample `index` trains with the empty prompt in `epoch` (its own
        stream: the crops, flips and conditioning dropout draws do not change with it)."""
        if not self.proportion_empty_prompts:
            return False
        generator = randomness.make_generator("cpu", self.run_state.seed, EMPTY_PROMPT_STREAM, epoch, index)
        return bool(torch.rand((), generator=generator) < self.proportion_empty_prompts)

    def __getitem__(self, key):
        epoch, index = key
        a = self.args
        row = self._row(index)
        example = self.dataset[row]
        generator = randomness.make_generator("cpu", self.run_state.seed, AUGMENT_STREAM, epoch, index)
        crop_position, flip = draw_augmentation(a.center_crop, a.random_flip, generator)
        target = self.target(index)
        item = {}
        if self.latent_cache is None:
            edited = example[a.edited_image_column]
            item["original_pixel_values"], item["edited_pixel_values"] = preprocess_pair(
                example[a.original_image_column], edited, target, crop_position, flip)
            width, height = edited.size
            if self.masked_loss:
                mask = load_loss_mask(self.check_masks()[row], edited, example.get(mask_column(a)))
                item["loss_mask"] = (preprocess_mask(mask, target, crop_position, flip) if mask is not None
                                     else all_pixels(target))
        else:
            for name, image_key in zip(("original_latent_dist", "edited_latent_dist"), self.image_keys[row]):
                entry = self.latent_cache.load(image_key)
                item[name] = entry["flipped" if flip else "latent_dist"]
            # The edited image's size, for the time ids.
            height, width = entry["original_size"].tolist() if a.family.size_conditioned else (0, 0)
            if self.masked_loss:
                item["loss_mask"] = entry.get("mask_flipped" if flip else "mask", all_pixels(target))
        if a.family.size_conditioned:
            item.update(micro_conditioning(width, height, target, crop_position, flip))
        prompt = "" if self.drops_prompt(epoch, index) else example[a.edit_prompt_column] or ""
        if self.text_cache is None:
            for name, ids in zip(INPUT_IDS, a.family.tokenize(self.tokenizers, prompt)):
                item[name] = ids[0]
        else:
            entry = self.text_cache.load(self.prompt_keys[prompt])
            item["encoder_hidden_states"] = entry["hidden_states"]
            if "pooled" in entry:
                item["pooled_prompt_embeds"] = entry["pooled"]
        item["dropout_draw"] = self.dropout_draw(epoch, index)
        return item


def all_pixels(target):
    """The latent-grid loss mask of an image without a mask: every pixel trains."""
    height, width = as_target(target)
    return torch.ones(1, height // 8, width // 8)


def find_mask(edited_cell, mask_cell, row, args):
    """Where the mask of one edited image (an undecoded cell) comes from: the --mask_column cell, else a
    `name.mask.png` beside its file, else its alpha channel; None if it has none. Raises InputError when a mask cannot
    be read or its size differs from the image's."""
    width, height, alpha = _image_header(edited_cell, f"--edited_image_column {args.edited_image_column!r} row {row}")
    if mask_cell and (mask_cell.get("bytes") or mask_cell.get("path")):
        source, name = (MASK_CELL, None), f"--mask_column {mask_column(args)!r} row {row}"
    elif edited_cell.get("path") and not edited_cell.get("bytes") and os.path.isfile(
            bucketing.mask_path_for(edited_cell["path"])):
        source = name = bucketing.mask_path_for(edited_cell["path"])
        source = (MASK_FILE, source)
    else:
        return (ALPHA, None) if alpha else None
    mask_width, mask_height, _ = _image_header({"path": source[1]} if source[0] == MASK_FILE else mask_cell, name)
    if (mask_width, mask_height) != (width, height):
        raise InputError(f"--masked_loss: the mask {name} is {mask_width}x{mask_height} but its edited image is "
                         f"{width}x{height}; a mask must have its image's size")
    return source


def _image_header(cell, name):
    """(width, height, has alpha) of an undecoded image cell, from its header."""
    from io import BytesIO

    try:
        with Image.open(BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
            return image.width, image.height, bucketing.has_alpha(image)
    except (OSError, ValueError) as error:
        raise InputError(f"--masked_loss: cannot read {name} ({cli.first_line(error)})") from None


# ----------------------------------------------------------------------------------------------------------------------
# Feature cache: latents and prompt embeddings computed once, then the VAE / text encoder leave memory
# ----------------------------------------------------------------------------------------------------------------------


def cache_latents(accelerator, train_dataset, vae, args, vae_dtype):
    """Fill the latent cache for the original and edited images of the rows this run trains on (one entry per
    distinct image and target, split across ranks) and switch the dataset to it. An entry holds the latent
    distribution's parameters, so training takes the original image's mode and samples the edited image's as it does
    uncached; on SDXL also the image's original (height, width), for the time ids; with --masked_loss the edited
    image's entry also holds its latent-grid mask.

    With buckets an entry is at its pair's bucket, and the bucket is part of its key (the folder's settings hold no
    resolution): changing the bucket settings recomputes exactly the images whose bucket changed."""
    from datasets import Image as ImageFeature

    settings = {
        "vae": feature_cache.model_fingerprint(vae), "dtype": str(vae_dtype), "resolution": args.resolution,
        "interpolation": "bicubic", "crop": "center", "flip": args.random_flip,
        "preprocess": "instruct_pix2pix: RGB, short side resized, relative crop (0.5, 0.5), [-1, 1]",
    }
    if train_dataset.buckets is not None:
        del settings["resolution"]
        settings["preprocess"] = "instruct_pix2pix: RGB, resized to cover the bucket in the key, relative crop (0.5, " \
                                 "0.5), [-1, 1]"
    cache = feature_cache.FeatureCache(args.feature_cache_dir, "latents",
                                {**settings, "original_size": True} if args.family.size_conditioned else settings)
    columns = image_columns(args)
    masks = train_dataset.check_masks()
    cell_columns = columns + ((mask_column(args),) if mask_column(args) else ())
    image_keys, inputs = {}, {}
    for index, (row, cells) in enumerate(train_dataset.undecoded(cell_columns)):
        target = train_dataset.target(index)
        keys = []
        for column in columns:
            mask = masks.get(row) if column == args.edited_image_column else None
            bucket = target if train_dataset.buckets is not None else None
            key = latent_key(feature_cache.image_fingerprint(cells[column]), bucket,
                             mask_key(mask, cells.get(mask_column(args))))
            keys.append(key)
            inputs.setdefault(key, (row, column, target, mask))
        image_keys[row] = tuple(keys)
    # Decoded exactly as the dataset decodes them, so the latents are those of the uncached run.
    undecoded = train_dataset.dataset.select_columns(list(cell_columns))
    for column in cell_columns:
        undecoded = undecoded.cast_column(column, ImageFeature(decode=False))
    decoder = ImageFeature()

    def decode(row, column):
        return decoder.decode_example(undecoded[row][column])

    def encode(batch_inputs):
        # Images of one target size are encoded together (a batch of one shape), in their order.
        entries = [None] * len(batch_inputs)
        by_target = {}
        for position, (_, _, target, _) in enumerate(batch_inputs):
            by_target.setdefault(target, []).append(position)
        for target, positions in by_target.items():
            images = [decode(*batch_inputs[position][:2]) for position in positions]
            pixels = torch.stack([to_model_range(crop_and_flip(resize_to_cover(image.convert("RGB"), target), target,
                                                               CENTRE, False))
                                  for image in images])
            views = torch.cat([pixels, pixels.flip(-1)]) if args.random_flip else pixels
            parameters = vae.encode(views.to(accelerator.device, vae_dtype)).latent_dist.parameters
            for i, (position, image) in enumerate(zip(positions, images)):
                entry = {"latent_dist": parameters[i]}
                if args.random_flip:
                    entry["flipped"] = parameters[len(images) + i]
                if args.family.size_conditioned:
                    entry["original_size"] = torch.tensor([image.height, image.width])
                row, _, _, source = batch_inputs[position]
                mask_image = decode(row, mask_column(args)) if source and source[0] == MASK_CELL else None
                mask = load_loss_mask(source, image, mask_image)
                if mask is not None:
                    entry["mask"] = preprocess_mask(mask, target, CENTRE, False)
                    if args.random_flip:  # the flipped view's mask (8-pixel blocks: the flip of the grid)
                        entry["mask_flipped"] = entry["mask"].flip(-1)
                entries[position] = entry
        return entries

    vae.to(accelerator.device, dtype=vae_dtype)
    cache.fill(accelerator, inputs, encode, args.train_batch_size)
    train_dataset.use_latent_cache(cache, image_keys)


def latent_key(image_key, bucket=None, mask=None):
    """A latent cache entry's key: the image's own (the square run's key, unchanged), with its bucket and its mask's
    key when there are."""
    parts = [*(bucket or ()), *(("mask", mask) if mask else ())]
    return feature_cache.fingerprint(image_key, *parts) if parts else image_key


def mask_key(source, mask_cell):
    """What identifies a loss mask for the cache: its file or cell; an alpha channel is part of the image's bytes."""
    if source is None:
        return None
    kind, path = source
    if kind == ALPHA:
        return ALPHA
    return feature_cache.image_fingerprint({"path": path} if kind == MASK_FILE else mask_cell)


def cache_text_embeddings(accelerator, train_dataset, text_encoders, tokenizers, args, weight_dtype):
    """Fill the text-embedding cache for the edit prompts of the rows this run trains on and for the empty prompt
    (what conditioning dropout puts in place of a prompt), and switch the dataset to it. Entries are keyed by token
    ids, so a different tokenizer is a miss too; on SDXL they hold both encoders' hidden states and the pooled
    embedding. Returns the empty prompt's (hidden states (1, tokens, dim), pooled embedding or None) on the device."""
    settings = {"text_encoder": feature_cache.model_fingerprint(text_encoders[0]), "dtype": str(weight_dtype)}
    if len(text_encoders) > 1:
        settings["text_encoder_2"] = feature_cache.model_fingerprint(text_encoders[1])
    cache = feature_cache.FeatureCache(args.feature_cache_dir, "text_embeddings", settings)
    rows = train_dataset.rows()
    prompts = {prompt or "" for prompt in train_dataset.dataset.select(rows)[args.edit_prompt_column]} | {""}
    token_ids = {prompt: [ids[0] for ids in args.family.tokenize(tokenizers, prompt)] for prompt in sorted(prompts)}
    # SD's keys are those of the token ids alone, as before SDXL.
    prompt_keys = {prompt: feature_cache.fingerprint(ids[0].tolist() if len(ids) == 1 else [i.tolist() for i in ids])
                   for prompt, ids in token_ids.items()}

    def encode(batch_ids):
        hidden_states, pooled = args.family.encode_prompt(text_encoders, [torch.stack(ids).to(accelerator.device)
                                                                          for ids in zip(*batch_ids)])
        if pooled is None:
            return [{"hidden_states": states} for states in hidden_states]
        return [{"hidden_states": states, "pooled": embeds} for states, embeds in zip(hidden_states, pooled)]

    for text_encoder in text_encoders:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    cache.fill(accelerator, {prompt_keys[p]: ids for p, ids in token_ids.items()}, encode, args.train_batch_size)
    train_dataset.use_text_cache(cache, prompt_keys)
    empty = cache.load(prompt_keys[""])
    pooled = empty["pooled"][None].to(accelerator.device) if "pooled" in empty else None
    return empty["hidden_states"][None].to(accelerator.device), pooled


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def load_models(args):
    """(noise_scheduler, tokenizers, text_encoders, vae, unet) from the pretrained pipeline (one tokenizer and text
    encoder for SD, two for SDXL; the VAE from --pretrained_vae_model_name_or_path if given), the UNet widened to 8
    input channels; load errors are InputErrors naming the part that failed."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    source = args.pretrained_model_name_or_path
    family = args.family

    def load(part, loader, **kwargs):
        try:
            return loader(source, subfolder=part, **{"revision": args.revision, "cache_dir": args.cache_dir, **kwargs})
        except Exception as error:
            reason = cli.first_line(error)
            raise InputError(f"--pretrained_model_name_or_path {source!r}: cannot load {part}/ ({reason})") from None

    # Trained with DDPM noising whatever the pipeline samples with (SDXL ships EulerDiscreteScheduler), as upstream.
    noise_scheduler = load("scheduler", DDPMScheduler.from_pretrained)
    tokenizers = family.load_tokenizers(args)
    with distributed.frozen_models_outside_zero3():
        text_encoders = family.load_text_encoders(args)
        vae = family.load_vae(args)
    unet = load("unet", UNet2DConditionModel.from_pretrained, variant=args.variant, revision=args.non_ema_revision)
    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise InputError(f"--pretrained_model_name_or_path {source!r}: the scheduler predicts "
                         f"{noise_scheduler.config.prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return noise_scheduler, tokenizers, text_encoders, vae, widen_conv_in(unet)


def widen_conv_in(unet):
    """The UNet with `conv_in` taking 8 channels: the 4 original input channels keep their weights (and the bias is
    kept), the 4 new ones, which read the original image's latent, start at zero. A UNet that already has 8 input
    channels (an InstructPix2Pix model being trained further) is returned as it is."""
    in_channels = unet.config.in_channels
    if in_channels == EDIT_IN_CHANNELS:
        return unet
    if in_channels != LATENT_CHANNELS:
        raise InputError(f"--pretrained_model_name_or_path: the UNet takes {in_channels} input channels; expected "
                         f"{LATENT_CHANNELS} (a text-to-image model) or {EDIT_IN_CHANNELS} (an InstructPix2Pix model)")
    old = unet.conv_in
    new = torch.nn.Conv2d(EDIT_IN_CHANNELS, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :LATENT_CHANNELS].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=EDIT_IN_CHANNELS)
    return unet


def build_ema(args, unet):
    """An EMAModel of the (widened) UNet, starting from --revision's weights (which differ from the trained UNet's
    only when --non_ema_revision names another revision)."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    start = unet
    if args.non_ema_revision != args.revision:
        start = widen_conv_in(UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant,
            cache_dir=args.cache_dir,
        ).to(torch.float32))
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


def conditioning_dropout_masks(draws, probability):
    """Upstream's masks from per-sample draws u in [0, 1): (drop the prompt: u < 2p, drop the original image:
    p <= u < 3p). So p of the samples lose only the prompt, p both, p only the image."""
    drop_prompt = draws < 2 * probability
    drop_image = (draws >= probability) & (draws < 3 * probability)
    return drop_prompt, drop_image


def apply_conditioning_dropout(encoder_hidden_states, original_latents, draws, probability, empty_prompt,
                               pooled_prompt_embeds=None):
    """Replace dropped prompts by the encoding of the empty prompt (`empty_prompt` = (hidden states, pooled embedding
    or None); on SDXL both the hidden states and the pooled embedding) and zero dropped original-image latents.
    Returns (hidden states, original latents, pooled embedding)."""
    drop_prompt, drop_image = conditioning_dropout_masks(draws.to(original_latents.device), probability)
    empty_states, empty_pooled = empty_prompt
    empty = empty_states.to(encoder_hidden_states.dtype).expand_as(encoder_hidden_states)
    encoder_hidden_states = torch.where(drop_prompt[:, None, None], empty, encoder_hidden_states)
    if pooled_prompt_embeds is not None:
        empty = empty_pooled.to(pooled_prompt_embeds.dtype).expand_as(pooled_prompt_embeds)
        pooled_prompt_embeds = torch.where(drop_prompt[:, None], empty, pooled_prompt_embeds)
    original_latents = original_latents * (~drop_image).to(original_latents.dtype)[:, None, None, None]
    return encoder_hidden_states, original_latents, pooled_prompt_embeds


def added_conditions(batch, pooled_prompt_embeds, args):
    """The UNet's `added_cond_kwargs` from the family: None for SD; for SDXL the pooled embedding and each sample's
    time ids from its real original size and crop (an explicit --crops_coords_top_left_h/w wins, as upstream) and its
    target size (its bucket, or --resolution square)."""
    family = args.family
    targets = batch.get("target_size", (args.resolution, args.resolution))
    return family.added_conditions(pooled_prompt_embeds, batch.get("original_size"),
                                   family.time_id_crops(args, batch.get("crop_top_left")), targets)


def training_loss(unet, vae, text_encoders, noise_scheduler, batch, generator, args, vae_dtype, empty_prompt,
                  scaling_factor):
    """The diffusion loss of one batch: encode both images and the prompt with the frozen models (or take them from
    the cache), noise the edited image's latent, concatenate the original image's latent (after conditioning
    dropout), predict with the 8-channel UNet (on SDXL with the pooled embedding and time ids), weight by Min-SNR and,
    with --masked_loss, per latent pixel by the edited image's mask.

    Every random draw (latent sampling, noise, timesteps) comes from `generator` and the dropout draws come with the
    batch, so a resumed run repeats them."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    def latent_dist(name):
        if f"{name}_latent_dist" in batch:
            return DiagonalGaussianDistribution(batch[f"{name}_latent_dist"])
        return vae.encode(batch[f"{name}_pixel_values"].to(vae_dtype)).latent_dist

    with torch.no_grad():
        latents = latent_dist("edited").sample(generator=generator).float() * scaling_factor
        if "encoder_hidden_states" in batch:
            encoder_hidden_states, pooled = batch["encoder_hidden_states"], batch.get("pooled_prompt_embeds")
        else:
            encoder_hidden_states, pooled = args.family.encode_prompt(
                text_encoders, [batch[name] for name in INPUT_IDS if name in batch])
        # Unscaled and deterministic (the mode), as the InstructPix2Pix pipelines encode the image they edit.
        original_latents = latent_dist("original").mode().float()
    if args.conditioning_dropout_prob:
        encoder_hidden_states, original_latents, pooled = apply_conditioning_dropout(
            encoder_hidden_states, original_latents, batch["dropout_draw"], args.conditioning_dropout_prob,
            empty_prompt, pooled,
        )

    noise = objectives.sample_noise(latents, generator, args.noise_offset)
    timesteps = objectives.sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, generator,
                                        latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    model_input = torch.cat([noisy_latents, original_latents], dim=1)
    model_pred = unet(model_input, timesteps, encoder_hidden_states, added_cond_kwargs=added_conditions(
        batch, pooled, args), return_dict=False)[0]

    prediction_type = noise_scheduler.config.prediction_type
    target = objectives.loss_target(noise_scheduler, prediction_type, latents, noise, timesteps)
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


def load_validation_image(accelerator, args):
    """The validation image (a local file, or a URL fetched once, by the main process, when the run starts so that an
    unreachable URL fails before training rather than after the first epoch), fitted to --resolution, or to
    --validation_height x --validation_width when either is given. Every rank gets it. None without validation."""
    if args.val_image_url is None:
        return None
    from accelerate.utils import broadcast_object_list
    from diffusers.utils import load_image

    loaded = [None, None]  # (image, error)
    if accelerator.is_main_process:
        try:
            loaded[0] = fit_for_validation(load_image(args.val_image_url), args.resolution, validation_size(args))
        except Exception as error:  # requests and PIL raise many types
            loaded[1] = (f"{image_flag(args)} {args.val_image_url!r}: cannot load the image "
                         f"({cli.first_line(error)})")
    if accelerator.num_processes > 1:
        broadcast_object_list(loaded, from_process=0)
    if loaded[1] is not None:
        raise InputError(loaded[1])
    return loaded[0]


def validation_size(args):
    """(height, width) of validation images from --validation_height/--validation_width (the other side defaults to
    --resolution), or None: the validation image keeps its aspect ratio at --resolution."""
    height, width = getattr(args, "validation_height", None), getattr(args, "validation_width", None)
    if height is None and width is None:
        return None
    return height or args.resolution, width or args.resolution


def fit_for_validation(image, resolution, size=None):
    """`image` resized to `resolution` on its short side and centre-cropped to multiples of 8, the size the pipeline
    edits at (so the edited images line up with the original in the logs); with `size` = (height, width), resized to
    cover it and centre-cropped to it (the pipeline edits at the image's size: this previews a bucket shape)."""
    if size is not None:
        return crop_and_flip(resize_to_cover(image.convert("RGB"), size), size, CENTRE, False)
    image = resize_short_side(image, resolution)
    width, height = image.size
    left, top = (width % 8) // 2, (height % 8) // 2
    return image.crop((left, top, left + width - width % 8, top + height - height % 8))


def generate_validation_images(accelerator, pipeline, image, args, seed):
    """Edit `image` with --validation_prompt --num_validation_images times, the work split across all ranks (no rank
    idles past a collective timeout). Image k always comes from a generator seeded from (run seed, k), so the images
    do not depend on the number of processes. The main process gets the PIL images in order, other ranks None."""
    from accelerate.utils import gather_object

    mine = range(accelerator.process_index, args.num_validation_images, accelerator.num_processes)
    rendered = []
    pipeline.set_progress_bar_config(disable=True)
    if args.enable_xformers_memory_efficient_attention:
        pipeline.enable_xformers_memory_efficient_attention()
    # With --validation_height/--validation_width the pipeline edits at the image's size (SDXL's is told so).
    size = args.family.edit_size_kwargs(image) if validation_size(args) else {}
    for k in mine:
        generator = randomness.make_generator(accelerator.device, seed, VALIDATION_STREAM, k)
        with torch.no_grad(), accelerator.autocast():
            edited = pipeline(
                args.validation_prompt, image=image, num_inference_steps=args.validation_inference_steps,
                image_guidance_scale=VALIDATION_IMAGE_GUIDANCE, guidance_scale=VALIDATION_TEXT_GUIDANCE,
                generator=generator, output_type="np", **size,
            ).images[0]
        rendered.append((k, (edited * 255).round().astype("uint8")))
    gathered = gather_object(rendered) if accelerator.num_processes > 1 else rendered
    if not accelerator.is_main_process:
        return None
    return [Image.fromarray(edited) for _, edited in sorted(gathered, key=lambda pair: pair[0])]


def validate_during_training(accelerator, unet, ema_unet, vae, text_encoders, tokenizers, image, args, seed):
    """Validation images from the current weights (the EMA weights when --use_ema: swapped in, then the trained
    weights restored). A frozen model the cache made unnecessary (None) is loaded again for the length of the
    validation, in the dtype training would run it in."""
    model = distributed.whole_model(accelerator, unet)  # every rank calls this function
    if ema_unet is not None:
        ema_unet.store(model.parameters())
        ema_unet.copy_to(model.parameters())
    was_training = model.training
    model.eval()
    try:
        family = args.family
        frozen = dict(zip(family.tokenizer_parts, tokenizers))
        if vae is not None or args.pretrained_vae_model_name_or_path is not None:
            frozen["vae"] = vae if vae is not None else family.load_vae(args).to(accelerator.device)
        frozen.update(zip(family.text_encoder_parts, text_encoders or ()))
        pipeline = load_pipeline(args, unet=model, **frozen)
        weight_dtype = frozen_dtype(accelerator)
        if vae is None:
            pipeline.vae.to(accelerator.device, dtype=family.vae_dtype(args, weight_dtype))
        for name in family.text_encoder_parts if text_encoders is None else ():
            getattr(pipeline, name).to(accelerator.device, dtype=weight_dtype)
        return generate_validation_images(accelerator, pipeline, image, args, seed)
    finally:
        model.train(was_training)
        if ema_unet is not None:
            ema_unet.restore(model.parameters())


def load_pipeline(args, **components):
    """The base model's InstructPix2Pix pipeline (its family's class) with `components` in place of its own."""
    family = args.family
    with distributed.frozen_models_outside_zero3():
        return family.pipeline_class(TASK).from_pretrained(
            args.pretrained_model_name_or_path, **components, **family.pipeline_kwargs, revision=args.revision,
            variant=args.variant, cache_dir=args.cache_dir)


def log_validation_images(accelerator, original, edited, name, epoch, global_step, args):
    """Save the original and the edited images under output_dir/validation/<name>/ and send them to TensorBoard and
    wandb (as upstream's table of original image, edited image, edit prompt). Main process only."""
    folder = os.path.join(args.output_dir, "validation", name)
    os.makedirs(folder, exist_ok=True)
    original.save(os.path.join(folder, "original.png"))
    for index, image in enumerate(edited):
        image.save(os.path.join(folder, f"{index:02d}.png"))
    tag = "test" if name == "final" else "validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(image) for image in [original] + edited])
            tracker.writer.add_images(tag, batch, epoch, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            table = wandb.Table(columns=["original_image", "edited_image", "edit_prompt"])
            for image in edited:
                table.add_data(wandb.Image(original), wandb.Image(image), args.validation_prompt)
            tracker.log({tag: table}, step=global_step)
    return folder


def save_pipeline(model, ema_unet, args):
    """Write the InstructPix2Pix pipeline (SD or SDXL) with the trained UNet `model` (from `distributed.whole_model`) to
    --output_dir: the EMA weights in unet/ when --use_ema (the raw trained weights in unet_raw/), the trained UNet
    otherwise. The VAE (--pretrained_vae_model_name_or_path's if given) and text encoders are saved as loaded (not
    downcast)."""
    if ema_unet is not None:
        model.save_pretrained(os.path.join(args.output_dir, "unet_raw"))
        ema_unet.store(model.parameters())
        ema_unet.copy_to(model.parameters())
    vae = {} if args.pretrained_vae_model_name_or_path is None else {"vae": args.family.load_vae(args)}
    load_pipeline(args, unet=model, **vae).save_pretrained(args.output_dir)
    if ema_unet is not None:
        ema_unet.restore(model.parameters())


def training_size(args):
    """The model card's words for the training size."""
    if args.buckets is None:
        return f"{args.resolution}x{args.resolution}"
    return f"aspect-ratio buckets (height,width: {args.buckets.describe()}) chosen from each original image"


def masked_loss_note(args):
    if not args.masked_loss:
        return "off"
    column = f" or --mask_column {args.mask_column!r}" if args.mask_column else ""
    return f"on: the edited image's alpha channel, `name.mask.png`{column}"


def write_model_card(args, global_step, original, edited):
    from diffusers.utils import make_image_grid
    from huggingface_hub import ModelCard, ModelCardData

    data = args.dataset_name or args.train_data_dir
    gallery = ""
    example_prompt = args.validation_prompt or "make it snowy"
    pipeline_name = args.family.pipelines[TASK]
    if edited:
        make_image_grid([original] + edited, 1, len(edited) + 1).save(os.path.join(args.output_dir,
                                                                                   "val_imgs_grid.png"))
        gallery = (f"The validation image (first) edited by the trained pipeline with the instruction "
                   f"*{args.validation_prompt}*:\n\n![val_imgs_grid](./val_imgs_grid.png)\n")
    description = f"""
# InstructPix2Pix fine-tuning of {args.pretrained_model_name_or_path}

The UNet of **{args.pretrained_model_name_or_path}**, widened to 8 input channels, trained for instruction-based image
editing on **{data}** with `train_instruct_pix2pix.py` for {global_step} optimizer steps at
{training_size(args)}.

{gallery}
## Usage

```python
from diffusers import {pipeline_name}
from diffusers.utils import load_image

pipeline = {pipeline_name}.from_pretrained("{args.hub_model_id or args.output_dir}")
image = load_image("image_to_edit.png")
edited = pipeline({example_prompt!r}, image=image, image_guidance_scale=1.5, guidance_scale=7).images[0]
```

## Training

| setting | value |
|---|---|
| weights in `unet/` | {"EMA (raw trained weights in `unet_raw/`)" if args.use_ema else "trained"} |
| epochs, steps | {args.num_train_epochs}, {global_step} |
| batch size per device x accumulation | {args.train_batch_size} x {args.gradient_accumulation_steps} |
| learning rate, scheduler, warmup | {args.learning_rate}, {args.lr_scheduler}, {args.lr_warmup_steps} |
| conditioning dropout probability | {args.conditioning_dropout_prob} |
| empty-prompt proportion | {args.proportion_empty_prompts} |
| masked loss | {masked_loss_note(args)} |
| Min-SNR gamma, noise offset | {args.snr_gamma}, {args.noise_offset} |
| mixed precision | {args.mixed_precision} |
| seed | {args.seed} |
"""
    tags = [args.family.hub_tag, "stable-diffusion-diffusers", "image-to-image", "instruct-pix2pix", "diffusers",
            "diffusers-training"]
    base_model = args.pretrained_model_name_or_path if not os.path.isdir(args.pretrained_model_name_or_path) else None
    card_data = ModelCardData(library_name="diffusers", tags=tags, base_model=base_model,
                              license=args.family.license, inference=True)
    card = ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n{{ model_description }}",
                                   model_description=description)
    card.save(os.path.join(args.output_dir, "README.md"))


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def build_dataloader(train_dataset, args, run_state, accelerator):
    """(data loader, its sampler): batches of (epoch, index) keys in an order that depends only on the run seed and
    the epoch. Without buckets, a shuffle of all samples cut into --train_batch_size batches (accelerate splits each
    across ranks); with buckets, batches of one bucket each (bucketing.BucketBatchSampler: a bucket's remainder is a
    smaller batch, nothing is dropped), shuffled across buckets, whole batches dealt round-robin to the ranks."""
    buckets = train_dataset.sample_buckets()
    loading = {"num_workers": args.dataloader_num_workers, "pin_memory": accelerator.device.type == "cuda"}
    if buckets is None:
        sampler = randomness.EpochSampler(len(train_dataset), run_state, SHUFFLE_STREAM)
        return torch.utils.data.DataLoader(train_dataset, batch_size=args.train_batch_size, sampler=sampler,
                                           **loading), sampler
    sampler = bucketing.BucketBatchSampler(buckets, args.train_batch_size, run_state, SHUFFLE_STREAM)
    return torch.utils.data.DataLoader(train_dataset, batch_sampler=sampler, **loading), sampler


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
    from diffusers.training_utils import EMAModel
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
    args.mixed_precision = accelerator.mixed_precision  # what accelerate chose (flag, launch option or config)
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

    # Data and the validation image first: bad input is reported before any model is built or anything is written.
    with accelerator.main_process_first():
        examples = load_edit_dataset(args)
    train_dataset = EditExamples(examples, None, args, run_state)  # its tokenizers come with the models
    train_dataset.check_masks()  # a run without masks, or a mask of the wrong size, is bad input too
    validation_image = load_validation_image(accelerator, args)

    noise_scheduler, tokenizers, text_encoders, vae, unet = load_models(args)
    train_dataset.tokenizers = tokenizers
    # Frozen parts run in the mixed-precision dtype (SDXL's own VAE: --vae_precision, fp32 by default); the trained
    # UNet stays fp32 (its optimizer states too).
    weight_dtype = frozen_dtype(accelerator)
    vae_weight_dtype = args.family.vae_dtype(args, weight_dtype)
    for frozen in [vae, *text_encoders]:
        frozen.requires_grad_(False)
    unet.to(torch.float32).train()
    ema_unet = build_ema(args, unet) if args.use_ema else None
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    train_dataloader, train_sampler = build_dataloader(train_dataset, args, run_state, accelerator)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(args, unet.parameters())
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

    def save_model_hook(models, weights, output_dir):
        # A checkpoint is usable by itself: unet/ holds the trained (8-channel) weights, unet_ema/ the EMA. Every rank
        # gathers (ZeRO-3), the main process writes.
        for saved in models:
            model = distributed.whole_model(accelerator, saved, device="cpu")
            if accelerator.is_main_process:
                model.save_pretrained(os.path.join(output_dir, "unet"))
        if accelerator.is_main_process and ema_unet is not None:
            ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
        weights.clear()  # the unet/ folder replaces accelerate's own copy of the weights

    def load_model_hook(models, input_dir):
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

    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
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
        cache_latents(accelerator, train_dataset, vae, args, vae_weight_dtype)
        vae = None
    else:
        vae.to(accelerator.device, dtype=vae_weight_dtype)
    # What a dropped prompt becomes: the encoding of "" (hidden states, pooled embedding or None), computed once (the
    # text encoders are frozen) or cached.
    if args.cache_text_embeddings:
        empty_prompt = cache_text_embeddings(accelerator, train_dataset, text_encoders, tokenizers, args, weight_dtype)
        text_encoders = None
    else:
        for text_encoder in text_encoders:
            text_encoder.to(accelerator.device, dtype=weight_dtype)
        with torch.no_grad():
            empty_prompt = args.family.encode_prompt(text_encoders, [ids.to(accelerator.device)
                                                                     for ids in args.family.tokenize(tokenizers, [""])])
    feature_cache.free_memory()

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

    def log_validation(name, epoch, edited):
        if accelerator.is_main_process:
            folder = log_validation_images(accelerator, validation_image, edited, name, epoch, global_step, args)
            logger.info(f"Saved validation images to {folder}")

    def validate(name, epoch):
        edited = validate_during_training(accelerator, unet, ema_unet, vae, text_encoders, tokenizers,
                                          validation_image, args, run_state.seed)
        log_validation(name, epoch, edited)

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
        unet.train()
        loader, start = train_dataloader, 0
        if epoch == first_epoch and batches_to_skip:
            loader, start = accelerator.skip_first_batches(train_dataloader, batches_to_skip), batches_to_skip
        randomness.set_epoch(loader, train_sampler, epoch)
        for batch_index, batch in enumerate(loader, start=start):
            generator = randomness.make_generator(
                accelerator.device, run_state.seed, NOISE_STREAM, epoch, batch_index, accelerator.process_index
            )
            with accelerator.accumulate(unet):
                loss = training_loss(unet, vae, text_encoders, noise_scheduler, batch, generator, args,
                                     vae_weight_dtype, empty_prompt, scaling_factor)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += loss.detach()
            running_batches += 1

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
            # Upstream SDXL's cadence: every --validation_steps optimizer steps, and after the first.
            if validation_image is not None and args.validation_steps and (
                    global_step % args.validation_steps == 0 or global_step == 1):
                validate(f"step_{global_step:06d}", epoch)

            stop_status = checkpointer.stop_if_requested(global_step)
            if stop_status:
                progress_bar.close()
                accelerator.end_training()
                return stop_status
            if global_step >= args.max_train_steps:
                break

        # Upstream cadence: validation images at the end of every --validation_epochs-th epoch.
        if validation_image is not None and args.validation_epochs and epoch % args.validation_epochs == 0:
            validate(f"epoch_{epoch:04d}", epoch)
        accelerator.wait_for_everyone()
    progress_bar.close()

    final_unet = distributed.whole_model(accelerator, unet, device="cpu")
    if accelerator.is_main_process:
        save_pipeline(final_unet, ema_unet, args)
        logger.info(f"Saved the InstructPix2Pix pipeline to {args.output_dir}")
    accelerator.wait_for_everyone()

    # A last validation round from the pipeline as saved (what users will load), shown in the model card.
    final_images = None
    if validation_image is not None:
        with distributed.frozen_models_outside_zero3():
            saved = args.family.pipeline_class(TASK).from_pretrained(args.output_dir).to(accelerator.device)
        final_images = generate_validation_images(accelerator, saved, validation_image, args, run_state.seed)
        del saved
        log_validation("final", args.num_train_epochs, final_images)
    if accelerator.is_main_process:
        write_model_card(args, global_step, validation_image, final_images)
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
