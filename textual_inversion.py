#!/usr/bin/env python
"""Textual inversion: learn new token embeddings in a Stable Diffusion (or SDXL) text encoder from a few images.

A drop-in replacement for diffusers' `examples/textual_inversion/textual_inversion.py`: the same flags and defaults,
the same outputs (`learned_embeds.safetensors` for `pipe.load_textual_inversion(output_dir)`,
`learned_embeds-steps-N.safetensors` every `--save_steps`, a full pipeline with `--save_as_full_pipeline`), plus
`--config`, `--cache_latents` (each image's VAE latents, both orientations, computed once, kept on disk under
`--feature_cache_dir` and reused; the VAE then leaves memory), exact resume from small checkpoints (the learned rows,
not the whole text encoder), atomic checkpoints, preemption handling and one-line errors.

    accelerate launch textual_inversion.py --pretrained_model_name_or_path=$MODEL_NAME --train_data_dir=$DATA_DIR \
      --learnable_property="object" --placeholder_token="<cat-toy>" --initializer_token="toy" \
      --resolution=512 --train_batch_size=1 --gradient_accumulation_steps=4 --max_train_steps=3000 \
      --learning_rate=5.0e-04 --scale_lr --lr_scheduler="constant" --lr_warmup_steps=0 \
    --output_dir="textual_inversion_cat"

How only the new rows train: the text encoder's token embedding is replaced, for the run, by `PlaceholderEmbedding`,
which holds the original matrix frozen and the new rows as the only trainable parameter. Every other row therefore
stays bit-identical by construction, the optimizer state is a few vectors (not the whole vocabulary), and a checkpoint
only needs the new rows.

SDXL (`textual_inversion_sdxl.py`'s command line, unchanged): an SDXL base model (trainkit/families/sdxl.py) adds
the tokens to both tokenizers and both text encoders, each initialised from the initializer token in that encoder,
and trains the new rows of both; the UNet is conditioned as SDXL is (both encoders' penultimate hidden states, the
pooled embedding and each image's time ids from its real original size and crop). Outputs: learned_embeds.safetensors
(text_encoder) and learned_embeds_2.safetensors (text_encoder_2, for `load_textual_inversion(...,
text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)`), their -steps-N copies, and a
StableDiffusionXLPipeline with --save_as_full_pipeline.

Real datasets (SPEC §9): with --use_aspect_ratio_buckets or --aspect_ratio_buckets "h,w;..." each image trains at
the bucket of nearest aspect ratio (resized to cover it and cropped: the centre with --center_crop, else a random
place), in batches that never mix buckets; --cache_latents then needs --center_crop and keys each entry by its bucket.
--masked_loss weights the loss per latent pixel by each image's alpha channel or its `name.mask.png`. There is no
--proportion_empty_prompts: the captions are templates around the placeholder, which an empty prompt would drop.
"""

import collections
import functools
import math
import os
import warnings
from datetime import timedelta

import numpy as np
import torch
from PIL import Image, ImageOps

from trainkit import bucketing, checkpointing, cli, distributed, families, feature_cache, objectives, randomness
from trainkit.cli import InputError

# Independent random streams, derived from the run seed (see randomness.derive_seed).
SHUFFLE_STREAM, AUGMENT_STREAM, NOISE_STREAM, VALIDATION_STREAM = 1, 2, 3, 4
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all")
# The families this script trains (the task x family matrix); their defaults do not differ from the flags'.
FAMILY_DEFAULTS = {"sd": {}, "sdxl": {}}
TASK = "textual_inversion"

# The prompts of the textual inversion paper: the concept is always seen inside a short caption.
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
]


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = cli.ArgumentParser(description="Learn new token embeddings (textual inversion) for Stable Diffusion.")
    add = parser.add_argument
    # What is learned (upstream)
    add("--placeholder_token", type=str, required=True,
        help="The new token that stands for the concept, e.g. <cat-toy>.")
    add("--initializer_token", type=str, required=True,
        help="An existing single-token word whose embedding the new token(s) start from.")
    add("--num_vectors", type=int, default=1,
        help="How many embedding vectors learn the concept (extra tokens <tok>_1 ... <tok>_{n-1}).")
    add("--learnable_property", type=str, default="object", choices=["object", "style"],
        help="Caption templates: 'a photo of a <tok>' (object) or 'a painting in the style of <tok>' (style).")
    # Model (upstream)
    add("--pretrained_model_name_or_path", type=str, required=True,
        help="A Stable Diffusion or SDXL pipeline folder or hub id.")
    add("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    add("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    add("--tokenizer_name", type=str, default=None,
        help="A tokenizer folder or hub id, if not the model's own (SD only: SDXL has two).")
    add("--pretrained_vae_model_name_or_path", type=str, default=None,
        help="A VAE to use instead of the model's own, e.g. an fp16-safe one for SDXL (without it the SDXL VAE runs "
             "in fp32).")
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention in the UNet.")
    add("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    # Data (upstream)
    add("--train_data_dir", type=str, required=True, help="A folder of images of the concept (any depth).")
    add("--repeats", type=int, default=100, help="How many times each image appears per epoch.")
    add("--resolution", type=int, default=512,
        help="Images are resized to this square size (with aspect-ratio buckets: the size of the generated buckets); "
             "a multiple of 8.")
    add("--center_crop", action="store_true",
        help="Crop the central square before resizing (otherwise the whole image is resized to a square). With "
             "aspect-ratio buckets: crop the centre of the image resized to cover its bucket (otherwise a random "
             "crop).")
    add("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses; 0 loads in the main one.")
    # Training (upstream)
    add("--output_dir", type=str, default="text-inversion-model", help="Where embeddings and checkpoints go.")
    add("--seed", type=int, default=None, help="Seed for data order, captions, flips, noise and validation.")
    add("--train_batch_size", type=int, default=16, help="Batch size per device.")
    add("--num_train_epochs", type=int, default=100)
    add("--max_train_steps", type=int, default=5000, help="Total optimizer steps; overrides --num_train_epochs.")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=1e-4)
    add("--scale_lr", action="store_true", default=False,
        help="Multiply the learning rate by batch size x accumulation steps x number of processes.")
    add("--lr_scheduler", type=str, default="constant", help=f"One of {', '.join(LR_SCHEDULERS)}.")
    add("--lr_warmup_steps", type=int, default=500)
    add("--lr_num_cycles", type=int, default=1, help="Hard restarts of the cosine_with_restarts scheduler.")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-08)
    add("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    add("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
        help="Precision of the frozen VAE and UNet; the learned embeddings stay fp32.")
    # Saving (upstream)
    add("--save_steps", type=int, default=500, help="Write learned_embeds-steps-N.safetensors every N steps.")
    add("--save_as_full_pipeline", action="store_true", help="Also save the whole pipeline with the new tokens.")
    add("--no_safe_serialization", action="store_true", help="Write learned_embeds*.bin (torch.save) instead.")
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help="A checkpoint-N folder (name in --output_dir, or path) or 'latest' to continue training from.")
    # Validation (upstream)
    add("--validation_prompt", type=str, default=None, help="A prompt using the placeholder, rendered during training.")
    add("--num_validation_images", type=int, default=4)
    add("--validation_steps", type=int, default=100, help="Render the validation prompt every N optimizer steps.")
    add("--validation_epochs", type=int, default=None, help="Deprecated: use --validation_steps.")
    # Logging and hub (upstream)
    add("--report_to", type=str, default="tensorboard", help=f"One of {', '.join(REPORT_TO)}.")
    add("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to --output_dir.")
    add("--push_to_hub", action="store_true")
    add("--hub_token", type=str, default=None)
    add("--hub_model_id", type=str, default=None)
    add("--local_rank", type=int, default=-1, help="Set by the launcher; not needed with accelerate launch.")
    # Additions: aspect-ratio buckets and validation size, masked loss (SPEC §9; textual inversion trains on caption
    # templates, so there is no caption dropout: an empty prompt would drop the placeholder token)
    bucketing.add_bucket_arguments(parser)
    bucketing.add_mask_arguments(parser, column=False)
    add("--max_grad_norm", type=float, default=1.0,
        help="Clip the gradient norm of the learned embeddings to this value.")
    add("--validation_inference_steps", type=int, default=25, help="Denoising steps for validation images.")
    add("--logging_steps", type=int, default=10,
        help="Log the mean loss every N optimizer steps (the loss is not read back from the device in between).")
    add("--cache_latents", action="store_true",
        help="Encode every image with the VAE once (both orientations: images are flipped at random), keep the "
             "latent distributions on disk under --feature_cache_dir, reuse them in later runs, and train without "
             "the VAE in memory. (The text encoder is trained, so its outputs cannot be cached.)")
    add("--feature_cache_dir", type=str, default=None,
        help="Where --cache_latents keeps its files (default: $DIFFUSION_TRAINING_CACHE or "
             "~/.cache/diffusion-training). Entries are keyed by the images, VAE weights, resolution and transforms, "
             "so one folder serves any number of runs; deleting it is always safe.")
    args = cli.parse_args_with_config(parser, argv)
    if args.feature_cache_dir is None:
        args.feature_cache_dir = feature_cache.default_feature_cache_dir()
    return args


def validate_args(args):
    """Every check that needs no model loaded, then the token checks (the tokenizer is cheap to load).

    Returns the tokenizer. Raises InputError."""
    if args.num_vectors < 1:
        raise InputError(f"--num_vectors must be >= 1, got {args.num_vectors}")
    cli.require_positive(
        args, "repeats", "resolution", "train_batch_size", "num_train_epochs", "max_train_steps",
        "gradient_accumulation_steps", "learning_rate", "lr_num_cycles", "save_steps", "checkpointing_steps",
        "checkpoints_total_limit", "num_validation_images", "validation_steps", "validation_epochs",
        "validation_inference_steps", "logging_steps", "max_grad_norm",
    )
    cli.require_multiple_of_8("--resolution", args.resolution)
    bucketing.check_bucket_flags(args)
    if args.cache_latents and args.buckets is not None and not args.center_crop:
        raise InputError("--cache_latents with aspect-ratio buckets needs --center_crop: a random crop of the bucket "
                         "changes every epoch and cannot be cached")
    if args.lr_warmup_steps < 0:
        raise InputError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if args.dataloader_num_workers < 0:
        raise InputError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise InputError(f"--lr_scheduler {args.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if args.report_to not in REPORT_TO:
        raise InputError(f"--report_to {args.report_to!r} is not one of {', '.join(REPORT_TO)}")
    if not args.placeholder_token.strip() or any(c.isspace() for c in args.placeholder_token):
        raise InputError(f"--placeholder_token {args.placeholder_token!r} must be one word without spaces")
    if args.cache_latents and os.path.isfile(args.feature_cache_dir):
        raise InputError(f"--feature_cache_dir {args.feature_cache_dir!r} is a file, not a folder")

    if not os.path.isdir(args.train_data_dir):
        raise InputError(f"--train_data_dir {args.train_data_dir!r} is not a folder")
    if not any(cli.image_files(args.train_data_dir)):
        extensions = ", ".join(cli.IMAGE_EXTENSIONS)
        raise InputError(f"--train_data_dir {args.train_data_dir!r} holds no images ({extensions})")
    args.family = families.select(args, FAMILY_DEFAULTS, "textual_inversion.py")
    args.family.check_folder(args.pretrained_model_name_or_path)
    args.family.refuse_flags(args, TASK)
    if args.tokenizer_name is not None:
        cli.check_local_or_hub_id("--tokenizer_name", args.tokenizer_name)
    if args.pretrained_vae_model_name_or_path is not None:
        cli.check_local_or_hub_id("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path)

    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir {args.output_dir!r} exists and is not a folder")
    args.resume_path = checkpointing.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_path is not None:
        _check_checkpoint_matches(args)

    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise InputError(
            f"--report_to {args.report_to} with --hub_token would expose the token in the run; use `hf auth login`"
        )
    if args.report_to == "wandb":
        cli.require_package("wandb", "--report_to wandb", "pip install wandb")
    if args.report_to == "comet_ml":
        cli.require_package("comet_ml", "--report_to comet_ml", "pip install comet_ml")
    if args.use_8bit_adam:
        cli.require_package("bitsandbytes", "--use_8bit_adam", "pip install bitsandbytes")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise InputError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed "
                "(pip install -r requirements-xformers.txt)"
            )

    tokenizers = load_tokenizers(args)
    check_tokens(args, tokenizers)
    return tokenizers


def _check_checkpoint_matches(args):
    """A checkpoint holds the rows of one placeholder; resuming it under other token flags cannot be exact."""
    from safetensors import safe_open

    for name in checkpoint_embeds_names(args):
        path = os.path.join(args.resume_path, name)
        if not os.path.isfile(path):
            raise InputError(f"--resume_from_checkpoint {args.resume_path!r} holds no {name}")
        with safe_open(path, framework="pt") as file:
            keys = list(file.keys())
            rows = file.get_slice(keys[0]).get_shape()[0] if keys else 0
        if keys != [args.placeholder_token] or rows != args.num_vectors:
            raise InputError(
                f"--resume_from_checkpoint {args.resume_path!r} learned {keys[0] if keys else '?'!r} with {rows} "
                f"vector(s); this run asks for --placeholder_token {args.placeholder_token!r} with --num_vectors "
                f"{args.num_vectors}"
            )


def embeds_stems(family):
    """One embeddings file per text encoder, named after it as upstream names them: learned_embeds for
    text_encoder/, learned_embeds_2 for text_encoder_2/."""
    return [f"learned_embeds{part.removeprefix('text_encoder')}" for part in family.text_encoder_parts]


def input_ids_keys(family):
    """A sample's token ids, one entry per tokenizer: input_ids for tokenizer/, input_ids_2 for tokenizer_2/."""
    return [f"input_ids{part.removeprefix('tokenizer')}" for part in family.tokenizer_parts]


def checkpoint_embeds_names(args):
    """The embeddings files of a checkpoint: one per text encoder."""
    return [f"{stem}.safetensors" for stem in embeds_stems(args.family)]


def load_tokenizers(args):
    """The family's tokenizers (one per text encoder), or the one of --tokenizer_name (refused where the family has
    two)."""
    if args.tokenizer_name is None:
        return args.family.load_tokenizers(args)
    from transformers import CLIPTokenizer

    try:
        return [CLIPTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision)]
    except Exception as error:
        raise InputError(f"--tokenizer_name {args.tokenizer_name!r}: cannot load the tokenizer "
                         f"({cli.first_line(error)})") from None


def placeholder_tokens(args):
    """`<tok>`, then `<tok>_1 ... <tok>_{n-1}`: the names diffusers' load_textual_inversion gives a multi-vector
    embedding, so a prompt that says `<tok>` is expanded to all of them at inference."""
    return [args.placeholder_token] + [f"{args.placeholder_token}_{i}" for i in range(1, args.num_vectors)]


def check_tokens(args, tokenizers):
    """The placeholder tokens must be new and the initializer one token, in every tokenizer (SDXL: both)."""
    for name, tokenizer in zip(args.family.tokenizer_parts, tokenizers):
        vocabulary = tokenizer.get_vocab()  # includes tokens added earlier (e.g. a tokenizer saved by a previous run)
        for token in placeholder_tokens(args):
            if token in vocabulary:
                raise InputError(
                    f"--placeholder_token: the {name} already has the token {token!r}; choose a new placeholder"
                )
        ids = tokenizer.encode(args.initializer_token, add_special_tokens=False)
        if len(ids) != 1:
            pieces = " ".join(tokenizer.convert_ids_to_tokens(ids)) if ids else "nothing"
            raise InputError(
                f"--initializer_token {args.initializer_token!r} must be exactly one token; the {name} splits it "
                f"into {len(ids)} ({pieces})"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def readable_images(folder):
    """(the images of `folder` that decode, a warning naming each one that does not): a bad file is skipped up front
    instead of crashing the run mid-way."""
    readable, skipped = [], []
    for path in cli.image_files(folder):
        try:
            with Image.open(path) as image:
                image.load()
            readable.append(path)
        except Exception as error:
            skipped.append(f"Skipping unreadable image {path} ({cli.first_line(error)})")
    if not readable:
        raise InputError(f"--train_data_dir {folder!r}: none of the {len(skipped)} images can be read")
    return readable, skipped


def check_masks(paths, folder):
    """--masked_loss, before anything loads: every `name.mask.png` has its image's size, and at least one image has a
    mask (that file, or an alpha channel). Returns the images without one: they train at full weight."""
    unmasked = []
    for path in paths:
        mask_path = bucketing.mask_path_for(path)
        if os.path.isfile(mask_path):
            width, height = oriented_size(path)
            try:
                mask_height, mask_width = bucketing.image_size({"path": mask_path})
            except Exception as error:
                reason = cli.first_line(error)
                raise InputError(f"--masked_loss: cannot read the mask {mask_path} ({reason})") from None
            if (mask_width, mask_height) != (width, height):
                raise InputError(f"--masked_loss: the mask {mask_path} is {mask_width}x{mask_height} but its image "
                                 f"{path} is {width}x{height}; a mask must have its image's size")
        else:
            with Image.open(path) as image:  # the mode is in the header: nothing is decoded
                if not bucketing.has_alpha(image):
                    unmasked.append(path)
    if len(unmasked) == len(paths):
        raise InputError(f"--masked_loss: no image in --train_data_dir {folder!r} has a mask (looked for "
                         "name.mask.png beside each image name.* and for an alpha channel in each image)")
    return unmasked


@functools.lru_cache(maxsize=64)
def _load_rgb(path):
    """Decoded once per process: a textual inversion folder holds a few images, each seen `--repeats` times."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


@functools.lru_cache(maxsize=64)
def _load_mask(path):
    """The loss mask of an image as an 'L' image of its displayed size: `name.mask.png` beside it, else its alpha
    channel; None when it has neither (it then trains at full weight)."""
    mask_path = bucketing.mask_path_for(path)
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if os.path.isfile(mask_path):
            return bucketing.load_mask(image, mask_path, name=path)
        return bucketing.load_mask(image, name=path) if bucketing.has_alpha(image) else None


def oriented_size(path):
    """(width, height) of an image as displayed (EXIF orientation applied, as _load_rgb does), read from its header
    alone."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
    return width, height


# How one image becomes a training sample of one shape. `source_box`: the region of the image kept before resizing
# (None: all of it); `size`: the (width, height) it is resized to; `crop_box`: the region of the resized image kept
# (None: all of it); `crop_top_left`: (top, left) of the crop in the resized frame, as SDXL's time ids state it;
# `target`: the (height, width) trained at.
Framing = collections.namedtuple("Framing", "source_box size crop_box crop_top_left target")


class SquareFraming:
    """Upstream's square: with --center_crop the central square of the image, resized to --resolution; without it
    the whole image resized to the square (its aspect ratio is not kept). Draws nothing."""

    def __init__(self, resolution, center_crop):
        self.resolution, self.center_crop = resolution, center_crop

    def target(self, width, height):
        return self.resolution, self.resolution

    def frame(self, width, height, generator):
        size = (self.resolution, self.resolution)
        if not self.center_crop:
            return Framing(None, size, None, (0, 0), size)
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        scale = self.resolution / side
        return Framing((left, top, left + side, top + side), size, None, (round(top * scale), round(left * scale)),
                       size)


class BucketFraming:
    """Aspect-ratio buckets (SPEC §9): the image resized, aspect kept, to cover its bucket (the nearest aspect ratio,
    args.buckets.assign) and cropped to it: the centre with --center_crop, otherwise a place drawn from the sample's
    generator (left, then top)."""

    def __init__(self, buckets, center_crop):
        self.buckets, self.center_crop = buckets, center_crop

    def target(self, width, height):
        return self.buckets.assign(height, width)

    def frame(self, width, height, generator):
        target_height, target_width = self.target(width, height)
        cover = bucketing.cover_size(width, height, target_height, target_width)
        top, left = bucketing.crop_origin(*cover, target_height, target_width, self.center_crop, generator)
        return Framing(None, cover, (left, top, left + target_width, top + target_height), (top, left),
                       (target_height, target_width))


def image_framing(args):
    """SquareFraming, or BucketFraming with --use_aspect_ratio_buckets / --aspect_ratio_buckets."""
    buckets = getattr(args, "buckets", None)  # absent from hand-built arguments that predate the bucket flags
    if buckets is None:
        return SquareFraming(args.resolution, args.center_crop)
    return BucketFraming(buckets, args.center_crop)


def apply_framing(image, framing, resample):
    if framing.source_box is not None:
        image = image.crop(framing.source_box)
    image = image.resize(framing.size, resample=resample)
    if framing.crop_box is not None:
        image = image.crop(framing.crop_box)
    return image


def image_tensor(image, framing, flip):
    """RGB PIL image -> (3, height, width) float tensor in [-1, 1]: framed with a bicubic resize (as upstream) and
    flipped left-right if `flip`."""
    image = apply_framing(image, framing, Image.BICUBIC)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def latent_mask(mask, framing, flip):
    """An 'L' loss mask (None: full weight) -> (1, height / 8, width / 8) weights in [0, 1], one per latent pixel:
    framed and flipped as its image (a bilinear resize), then averaged over each 8 x 8 block."""
    height, width = framing.target
    if mask is None:
        return torch.ones(1, height // 8, width // 8)
    mask = apply_framing(mask, framing, Image.BILINEAR)
    if flip:
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
    return bucketing.mask_to_latents(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None], 8)


class TextualInversionDataset(torch.utils.data.Dataset):
    """Each image `--repeats` times (sample i is image i mod N), each sample with a caption template holding the
    placeholder tokens.

    Indexed by (epoch, index) from randomness.EpochSampler or bucketing.BucketBatchSampler: the template, the crop
    (random only with buckets and without --center_crop) and the flip depend only on the run seed, the epoch and the
    sample index, so they are the same on resume and with any number of workers.

    Once `use_latent_cache` is called, samples hold the cached latent distribution of their image (in the drawn
    orientation) instead of pixels, and no image is read; the random draws stay the same, so the training run does
    not change.

    `tokenizers`: one or a list, one per text encoder of `args.family` (the caption's ids for each, as
    `input_ids`, `input_ids_2`: input_ids_keys). Each sample also holds its image's `original_size`, its
    `crop_top_left` and its `target_size` for the family's added conditions (SDXL's time ids), and with
    --masked_loss its `loss_mask` on the latent grid (latent_mask)."""

    def __init__(self, paths, tokenizers, placeholder_text, args, run_state):
        self.paths, self.placeholder_text = paths, placeholder_text
        self.tokenizers = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
        self.family, self.ids_keys = args.family, input_ids_keys(args.family)
        self.templates = STYLE_TEMPLATES if args.learnable_property == "style" else OBJECT_TEMPLATES
        self.repeats, self.framing = args.repeats, image_framing(args)
        self.masked = getattr(args, "masked_loss", False)
        self.sizes = [oriented_size(path) for path in paths]
        self.run_state = run_state
        self.latent_cache = self.cache_keys = None

    def use_latent_cache(self, cache, cache_keys):
        """`cache_keys`: one cache key per path, in the order of `paths`."""
        self.latent_cache, self.cache_keys = cache, cache_keys

    def __len__(self):
        return len(self.paths) * self.repeats

    def targets(self):
        """The (height, width) each sample trains at, in sample order: its image's bucket."""
        per_image = [self.framing.target(*size) for size in self.sizes]
        return [per_image[index % len(self.paths)] for index in range(len(self))]

    def describe_buckets(self):
        counts = collections.Counter(self.framing.target(*size) for size in self.sizes)
        return ", ".join(f"{height}x{width}: {count}" for (height, width), count in sorted(counts.items()))

    def __getitem__(self, key):
        epoch, index = key
        image_index = index % len(self.paths)
        generator = randomness.make_generator("cpu", self.run_state.seed, AUGMENT_STREAM, epoch, index)
        template = self.templates[int(torch.randint(len(self.templates), (1,), generator=generator))]
        ids = self.family.tokenize(self.tokenizers, template.format(self.placeholder_text))
        width, height = self.sizes[image_index]
        framing = self.framing.frame(width, height, generator)
        flip = torch.rand(1, generator=generator).item() < 0.5
        sample = {"original_size": torch.tensor((height, width)), "crop_top_left": torch.tensor(framing.crop_top_left),
                  "target_size": torch.tensor(framing.target)}
        for name, input_ids in zip(self.ids_keys, ids):
            sample[name] = input_ids[0]
        if self.latent_cache is not None:
            entry = self.latent_cache.load(self.cache_keys[image_index])
            sample["latent_dist"] = entry["flipped" if flip else "latent_dist"]
            if self.masked:
                sample["loss_mask"] = entry["mask_flipped" if flip else "mask"]
            return sample
        path = self.paths[image_index]
        sample["pixel_values"] = image_tensor(_load_rgb(path), framing, flip)
        if self.masked:
            sample["loss_mask"] = latent_mask(_load_mask(path), framing, flip)
        return sample


def training_dataloader(train_dataset, args, run_state, pin_memory):
    """(data loader, its sampler): shuffled samples in batches of --train_batch_size (randomness.EpochSampler), or with
    aspect-ratio buckets in batches that each hold one bucket (bucketing.BucketBatchSampler, which yields whole batches;
    a bucket's last batch may be smaller, nothing is dropped)."""
    if args.buckets is None:
        sampler = randomness.EpochSampler(len(train_dataset), run_state, SHUFFLE_STREAM)
        batching = {"batch_size": args.train_batch_size, "sampler": sampler}
    else:
        sampler = bucketing.BucketBatchSampler(train_dataset.targets(), args.train_batch_size, run_state,
                                               SHUFFLE_STREAM)
        batching = {"batch_sampler": sampler}
    loader = torch.utils.data.DataLoader(train_dataset, num_workers=args.dataloader_num_workers, pin_memory=pin_memory,
                                         **batching)
    return loader, sampler


def latent_cache_settings(vae, args, weight_dtype):
    """What every entry of the latent cache depends on. With buckets the resolution is not among them: each entry's
    key holds its bucket (latent_cache_key), so new bucket settings recompute only the images whose bucket changed."""
    settings = {"vae": feature_cache.model_fingerprint(vae), "dtype": str(weight_dtype), "interpolation": "bicubic",
                "flip": True, "preprocess": "textual_inversion: EXIF orientation, RGB, [-1, 1]"}
    if args.buckets is None:
        settings["resolution"] = args.resolution
        settings["crop"] = "center square" if args.center_crop else "none (resized to a square)"
    else:
        settings["crop"] = "resized to cover the bucket, center crop"
    if args.masked_loss:
        settings["mask"] = "latent grid: bilinear resize, mean of 8 x 8, both orientations"
    return settings


def latent_cache_key(path, target, args):
    """An image's entry: its file; with buckets also the (height, width) it trains at; with --masked_loss also its
    mask file (an alpha channel is part of the image)."""
    key = feature_cache.image_fingerprint({"path": path})
    parts = []
    if args.buckets is not None:
        parts += list(target)
    if args.masked_loss:
        mask_path = bucketing.mask_path_for(path)
        parts.append(feature_cache.image_fingerprint({"path": mask_path}) if os.path.isfile(mask_path)
                     else "no mask file")
    return feature_cache.fingerprint(key, *parts) if parts else key


def cache_latents(accelerator, train_dataset, vae, args, weight_dtype):
    """Fill the latent cache for every image (one entry per file at its training size, holding both orientations,
    and with --masked_loss both orientations of its latent-grid mask; the missing ones split across ranks) and switch
    the dataset to it."""
    settings = latent_cache_settings(vae, args, weight_dtype)
    cache = feature_cache.FeatureCache(args.feature_cache_dir, "latents", settings)
    framings = {path: train_dataset.framing.frame(*size, None)  # a centre crop or none: nothing is drawn
                for path, size in zip(train_dataset.paths, train_dataset.sizes)}
    cache_keys = [latent_cache_key(path, framings[path].target, args) for path in train_dataset.paths]

    def encode(paths):
        entries = {}
        same_size = {}
        for path in paths:
            same_size.setdefault(framings[path].target, []).append(path)
        for group in same_size.values():  # one VAE batch per shape (with buckets, several shapes)
            pixels = torch.stack([image_tensor(_load_rgb(path), framings[path], flip=False) for path in group])
            parameters = vae.encode(torch.cat([pixels, pixels.flip(-1)]).to(accelerator.device, weight_dtype))
            parameters = parameters.latent_dist.parameters
            for i, path in enumerate(group):
                entries[path] = {"latent_dist": parameters[i], "flipped": parameters[len(group) + i]}
                if train_dataset.masked:
                    mask = _load_mask(path)
                    entries[path]["mask"] = latent_mask(mask, framings[path], flip=False)
                    entries[path]["mask_flipped"] = latent_mask(mask, framings[path], flip=True)
        return [entries[path] for path in paths]

    vae.to(accelerator.device, dtype=weight_dtype)
    cache.fill(accelerator, dict(zip(cache_keys, train_dataset.paths)), encode, args.train_batch_size)
    _load_rgb.cache_clear()  # training reads no image any more
    _load_mask.cache_clear()
    train_dataset.use_latent_cache(cache, cache_keys)


# ----------------------------------------------------------------------------------------------------------------------
# The learned embedding
# ----------------------------------------------------------------------------------------------------------------------


class PlaceholderEmbedding(torch.nn.Module):
    """A token embedding whose first `len(base)` rows are the frozen original matrix and whose last rows (the new
    tokens' ids, appended at the end of the vocabulary) are the only trainable parameter."""

    def __init__(self, base_weight, new_rows):
        super().__init__()
        # A frozen parameter, not a buffer: DDP would broadcast a buffer of the whole vocabulary every forward.
        self.base = torch.nn.Parameter(base_weight, requires_grad=False)
        self.new_rows = torch.nn.Parameter(new_rows)

    @property
    def num_embeddings(self):
        return self.base.shape[0] + self.new_rows.shape[0]

    @property
    def embedding_dim(self):
        return self.base.shape[1]

    @property
    def weight(self):
        return torch.cat([self.base, self.new_rows])

    def forward(self, input_ids):
        # Two small lookups instead of concatenating the whole vocabulary every step.
        first_new = self.base.shape[0]
        is_new = (input_ids >= first_new).unsqueeze(-1)
        old = torch.nn.functional.embedding(input_ids.clamp(max=first_new - 1), self.base)
        new = torch.nn.functional.embedding((input_ids - first_new).clamp(min=0), self.new_rows)
        return torch.where(is_new, new.to(old.dtype), old)

    def as_embedding(self):
        """A plain nn.Embedding with the learned rows in place, for saving a whole text encoder."""
        embedding = torch.nn.Embedding(self.num_embeddings, self.embedding_dim)
        embedding.weight.data = self.weight.detach().clone()
        return embedding


def add_placeholder_tokens(args, tokenizer, text_encoder):
    """Add the placeholder tokens to the tokenizer and give the text encoder a PlaceholderEmbedding whose new rows
    start as copies of the initializer token's embedding. Returns the PlaceholderEmbedding."""
    tokens = placeholder_tokens(args)
    tokenizer.add_tokens(tokens)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    first_new = len(tokenizer) - len(tokens)
    # Checked already by check_tokens; this guards the id layout the embedding relies on.
    assert token_ids == list(range(first_new, len(tokenizer))), token_ids
    initializer_id = tokenizer.encode(args.initializer_token, add_special_tokens=False)[0]

    old_weight = text_encoder.get_input_embeddings().weight.data
    if old_weight.shape[0] < first_new:
        raise InputError(
            f"--pretrained_model_name_or_path: the text encoder has {old_weight.shape[0]} token embeddings but the "
            f"tokenizer has {first_new} tokens"
        )
    # Rows past the tokenizer's vocabulary (padding some models carry) are dropped, as resize_token_embeddings does.
    base = old_weight[:first_new].clone()
    new_rows = base[initializer_id].repeat(len(tokens), 1).float()
    embedding = PlaceholderEmbedding(base, new_rows)
    text_encoder.set_input_embeddings(embedding)
    text_encoder.config.vocab_size = embedding.num_embeddings
    return embedding


def save_embeddings(embedding, placeholder_token, path, safe=True):
    """The format diffusers' load_textual_inversion reads: {placeholder_token: (num_vectors, dim)}."""
    state = {placeholder_token: embedding.new_rows.detach().cpu().clone()}
    if safe:
        from safetensors.torch import save_file

        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)


def embeds_file_name(args, step=None, encoder=0):
    """learned_embeds[_2][-steps-N].safetensors (or .bin) for text encoder 0 or 1."""
    stem = embeds_stems(args.family)[encoder] + ("" if step is None else f"-steps-{step}")
    return stem + (".bin" if args.no_safe_serialization else ".safetensors")


def save_all_embeddings(embeddings, args, folder, step=None, checkpoint=False):
    """Every text encoder's new rows into `folder` (embeds_stems: SDXL writes two), as outputs or, with
    `checkpoint`, as a checkpoint holds them (always safetensors). Returns the paths."""
    names = checkpoint_embeds_names(args) if checkpoint else [
        embeds_file_name(args, step, encoder) for encoder in range(len(embeddings))]
    for name, embedding in zip(names, embeddings):
        save_embeddings(embedding, args.placeholder_token, os.path.join(folder, name),
                        safe=checkpoint or not args.no_safe_serialization)
    return [os.path.join(folder, name) for name in names]


# ----------------------------------------------------------------------------------------------------------------------
# Validation, saving, model card
# ----------------------------------------------------------------------------------------------------------------------


def text_parts(family, text_encoders, tokenizers):
    """{part: model} of the text encoders and tokenizers, as the family's pipeline names them."""
    return {**dict(zip(family.text_encoder_parts, text_encoders)), **dict(zip(family.tokenizer_parts, tokenizers))}


def validation_pipeline(text_encoders, tokenizers, unet, vae, noise_scheduler, args):
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline) around the models being trained."""
    from diffusers import DPMSolverMultistepScheduler

    family = args.family
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
    return family.pipeline_class(TASK)(
        vae=vae, **text_parts(family, text_encoders, tokenizers), **{family.denoiser_part: unet}, scheduler=scheduler,
        **family.pipeline_kwargs,
    )


def generate_validation_images(accelerator, text_encoders, tokenizers, unet, vae, noise_scheduler, args, seed,
                               vae_dtype):
    """Render `--num_validation_images` images of `--validation_prompt`, split across ranks (no rank idles past a
    collective timeout). Image i always comes from the same seed, whatever the number of processes. The main process
    gets the PIL images, other ranks None. `text_encoders`: unwrapped."""
    from accelerate.utils import gather_object

    mine = list(range(accelerator.process_index, args.num_validation_images, accelerator.num_processes))
    images = []
    if mine:
        if vae is None:
            # Dropped by --cache_latents: loaded again for the length of the validation.
            vae = args.family.load_vae(args).to(accelerator.device, dtype=vae_dtype)
        pipeline = validation_pipeline(text_encoders, tokenizers, unet, vae, noise_scheduler, args)
        pipeline.set_progress_bar_config(disable=True)
        for text_encoder in text_encoders:
            text_encoder.eval()
        for index in mine:
            generator = randomness.make_generator(accelerator.device, seed, VALIDATION_STREAM, index)
            with torch.no_grad(), accelerator.autocast():
                image = pipeline(
                    args.validation_prompt, num_inference_steps=args.validation_inference_steps, generator=generator,
                    height=args.validation_height or args.resolution, width=args.validation_width or args.resolution,
                ).images[0]
            images.append((index, np.asarray(image)))
        for text_encoder in text_encoders:
            text_encoder.train()
        del pipeline
    gathered = gather_object(images) if accelerator.num_processes > 1 else images
    if not accelerator.is_main_process:
        return None
    return [Image.fromarray(array) for _, array in sorted(gathered, key=lambda pair: pair[0])]


def save_validation_images(accelerator, images, global_step, args):
    """Write the images to output_dir/validation/ and send them to the trackers. Returns the relative paths."""
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = os.path.join("validation", f"step_{global_step}_{index}.png")
        image.save(os.path.join(args.output_dir, path))
        paths.append(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", batch, global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=f"{i}: {args.validation_prompt}")
                                        for i, image in enumerate(images)]}, step=global_step)
    return paths


def save_full_pipeline(accelerator, text_encoders, embeddings, tokenizers, args):
    """The family's pipeline folder (StableDiffusionPipeline, StableDiffusionXLPipeline) whose text encoders and
    tokenizers know the new tokens; the UNet, VAE (--pretrained_vae_model_name_or_path's, if given) and scheduler are
    reloaded in their stored precision."""
    models = [accelerator.unwrap_model(text_encoder) for text_encoder in text_encoders]
    for model, embedding in zip(models, embeddings):
        model.set_input_embeddings(embedding.as_embedding())
    parts = text_parts(args.family, models, tokenizers)
    if args.pretrained_vae_model_name_or_path:
        parts["vae"] = args.family.load_vae(args)
    pipeline = args.family.pipeline_class(TASK).from_pretrained(
        args.pretrained_model_name_or_path, **parts, revision=args.revision, variant=args.variant,
    )
    pipeline.save_pretrained(args.output_dir)
    for model, embedding in zip(models, embeddings):
        model.set_input_embeddings(embedding)


def write_model_card(args, global_step, validation_paths):
    from huggingface_hub import ModelCard, ModelCardData

    family = args.family
    tokens = " ".join(placeholder_tokens(args))
    pipeline_class = family.pipelines[TASK]
    location = args.hub_model_id or args.output_dir
    # The first text encoder's file loads by default; each other one names its file, encoder and tokenizer.
    others = zip(embeds_stems(family)[1:], family.text_encoder_parts[1:], family.tokenizer_parts[1:])
    indent = " " * len("pipeline.load_textual_inversion(")
    second = "".join(f'pipeline.load_textual_inversion("{location}", weight_name="{stem}.safetensors",\n'
                     f'{indent}text_encoder=pipeline.{encoder}, tokenizer=pipeline.{tokenizer})\n'
                     for stem, encoder, tokenizer in others)
    images = "\n".join(f"![validation {i}](./{path})" for i, path in enumerate(validation_paths))
    real_datasets = ""
    if args.buckets is not None:
        crop = "centre" if args.center_crop else "random"
        real_datasets += (f"| aspect-ratio buckets (height,width) | {args.buckets.describe()} (resized to cover, "
                          f"{crop} crop) |\n")
    if args.masked_loss:
        real_datasets += "| masked loss | alpha channels / name.mask.png beside each image |\n"
    gallery = f"Validation images for `{args.validation_prompt}` at step {global_step}:\n\n{images}\n" if images else ""
    description = f"""
# Textual inversion: {args.placeholder_token}

A textual inversion embedding for `{args.pretrained_model_name_or_path}`, learned with textual_inversion.py from the
images in `{args.train_data_dir}` ({args.learnable_property}, {args.num_vectors} vector(s): {tokens}) for
{global_step} optimizer steps, starting from the embedding of `{args.initializer_token}`.

```python
from diffusers import {pipeline_class}

pipeline = {pipeline_class}.from_pretrained("{args.pretrained_model_name_or_path}")
pipeline.load_textual_inversion("{location}")
{second}image = pipeline("a photo of {args.placeholder_token}").images[0]
```

{gallery}
## Training

| setting | value |
|---|---|
| resolution, center crop | {args.resolution}, {args.center_crop} |
| batch size per device x accumulation | {args.train_batch_size} x {args.gradient_accumulation_steps} |
| learning rate, scheduler, warmup | {args.learning_rate}, {args.lr_scheduler}, {args.lr_warmup_steps} |
| mixed precision | {args.mixed_precision} |
{real_datasets}| seed | {args.seed} |
"""
    card_data = ModelCardData(
        library_name="diffusers", license="creativeml-openrail-m", base_model=args.pretrained_model_name_or_path,
        tags=[family.hub_tag, f"{family.hub_tag}-diffusers", "text-to-image", "diffusers", "textual_inversion"],
    )
    card = ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n{{ model_description }}",
                                   model_description=description)
    card.save(os.path.join(args.output_dir, "README.md"))


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def load_models(args):
    """The frozen parts (noise scheduler, VAE, UNet) and the family's text encoders (SD: [CLIPTextModel]; SDXL: with a
    CLIPTextModelWithProjection), from the base model, in fp32 (the text encoders hold the trained rows; the frozen
    parts move to the device in the training dtype)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    family, source = args.family, args.pretrained_model_name_or_path
    noise_scheduler = families.loading.load_part(args, "scheduler", DDPMScheduler.from_pretrained)
    text_encoders = family.load_text_encoders(args)
    unet = families.loading.load_part(args, family.denoiser_part, UNet2DConditionModel.from_pretrained,
                                      variant=args.variant)
    vae = family.load_vae(args)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(
            f"--pretrained_model_name_or_path {source!r}: unsupported prediction type "
            f"{noise_scheduler.config.prediction_type!r} (epsilon or v_prediction)"
        )
    return noise_scheduler, text_encoders, vae, unet


def encode_batch(text_encoders, batch, args, weight_dtype):
    """The UNet's conditioning of a batch, with gradients into the new rows: (encoder_hidden_states, its
    added_cond_kwargs), as the family encodes prompts (SD: the text encoder's last hidden state, no added conditions;
    SDXL: both encoders, the pooled embedding and each sample's time ids from its image's real original size, its
    crop and the size it trains at: its bucket). All in the frozen UNet's dtype, as upstream (and as the pipeline
    makes the time ids: in the prompt's dtype)."""
    family = args.family
    prompt_embeds, pooled = family.encode_prompt(text_encoders, [batch[key] for key in input_ids_keys(family)])
    return prompt_embeds.to(weight_dtype), family.batch_added_conditions(pooled, batch, args, weight_dtype)


def main(argv=None):
    args = parse_args(argv)
    tokenizers = validate_args(args)
    # Data first: a folder of unreadable images is reported before anything is loaded or written.
    paths, skipped = readable_images(args.train_data_dir)
    unmasked = check_masks(paths, args.train_data_dir) if args.masked_loss else []

    import datasets
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
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
    import logging

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = get_logger(__name__, log_level="INFO")
    if not accelerator.is_local_main_process:
        for library in (datasets, diffusers, transformers):
            library.utils.logging.set_verbosity_error()
    distributed.adopt_engine_settings(accelerator, args.train_batch_size, args.max_grad_norm)
    if len(args.family.text_encoder_parts) > 1 and accelerator.state.deepspeed_plugin is not None:
        raise InputError(
            f"DeepSpeed cannot train the {args.family.title} model {args.pretrained_model_name_or_path!r}: its "
            f"{len(args.family.text_encoder_parts)} text encoders all train, and accelerate gives one model to a "
            "DeepSpeed engine; launch without DeepSpeed"
        )
    preemption = checkpointing.PreemptionHandler(accelerator)

    run_state = randomness.RunState(randomness.run_seed(args, accelerator))
    accelerator.register_for_checkpointing(run_state)
    set_seed(run_state.seed)

    for warning in skipped:
        logger.warning(warning)
    if unmasked:
        logger.warning(f"--masked_loss: {len(unmasked)} of {len(paths)} images have no mask and train at full weight "
                       f"(e.g. {unmasked[0]})")

    noise_scheduler, text_encoders, vae, unet = load_models(args)
    embeddings = [add_placeholder_tokens(args, tokenizer, text_encoder)
                  for tokenizer, text_encoder in zip(tokenizers, text_encoders)]
    # Only the new rows train: the rest of the text encoder(s), the VAE and the UNet are frozen.
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    for text_encoder, embedding in zip(text_encoders, embeddings):
        text_encoder.requires_grad_(False)
        embedding.new_rows.requires_grad_(True)
    if args.gradient_checkpointing:
        # Checkpointing needs train mode in the UNet; its dropout is 0, so the outputs are unchanged.
        unet.train()
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # Captions spell out every vector's token; at inference the pipeline expands `<tok>` to the same string.
    train_dataset = TextualInversionDataset(paths, tokenizers, " ".join(placeholder_tokens(args)), args, run_state)
    train_dataloader, epoch_sampler = training_dataloader(train_dataset, args, run_state,
                                                          pin_memory=accelerator.device.type == "cuda")

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(
        [embedding.new_rows for embedding in embeddings],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    steps_per_epoch = randomness.steps_per_epoch(len(train_dataloader), accelerator.num_processes,
                                             args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.validation_epochs is not None:
        warnings.warn(
            f"--validation_epochs is deprecated; using --validation_steps {args.validation_epochs * steps_per_epoch}",
            FutureWarning,
            stacklevel=1,
        )
        args.validation_steps = args.validation_epochs * steps_per_epoch
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
    )

    def save_model_hook(models, weights, output_dir):
        # A checkpoint holds what is trained: the new rows, in the format load_textual_inversion reads (so the
        # checkpoint is usable by itself); the frozen text encoder is not copied.
        if accelerator.is_main_process:
            save_all_embeddings(embeddings, args, output_dir, checkpoint=True)
        weights.clear()

    def load_model_hook(models, input_dir):
        from safetensors.torch import load_file

        models.clear()  # the frozen weights come from the base model; only the new rows are restored
        for name, embedding in zip(checkpoint_embeds_names(args), embeddings):
            rows = load_file(os.path.join(input_dir, name))[args.placeholder_token]
            with torch.no_grad():
                embedding.new_rows.copy_(rows)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    *text_encoders, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *text_encoders, optimizer, train_dataloader, lr_scheduler
    )
    # The frozen models only run forward: keep them in the mixed precision dtype (the VAE: the family's vae_dtype).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae_dtype = args.family.vae_dtype(args, weight_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)

    global_step = checkpointing.resume_from_checkpoint(accelerator, args, run_state)

    # The VAE goes to the device, or fills the latent cache and leaves memory (validation loads it again).
    scaling_factor = vae.config.scaling_factor
    if args.cache_latents:
        cache_latents(accelerator, train_dataset, vae, args, vae_dtype)
        vae = None
        feature_cache.free_memory()
    else:
        vae.to(accelerator.device, dtype=vae_dtype)

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), exist_ok=True,
                token=args.hub_token,
            ).repo_id
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("textual_inversion", config=tracked)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(paths)} images x {args.repeats} repeats = {len(train_dataset)} samples, {args.num_train_epochs} epochs "
        f"of {steps_per_epoch} steps, {args.max_train_steps} steps in all, batch {args.train_batch_size} per device, "
        f"total batch {total_batch_size}, learning rate {args.learning_rate:g}"
    )
    if args.buckets is not None:
        logger.info(f"Aspect-ratio buckets (height x width: images): {train_dataset.describe_buckets()}; "
                    f"{len(epoch_sampler)} batches an epoch")

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
    validation_paths = []
    for text_encoder in text_encoders:
        text_encoder.train()

    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        loader, start = train_dataloader, 0
        if epoch == first_epoch and batches_to_skip:
            loader, start = accelerator.skip_first_batches(train_dataloader, batches_to_skip), batches_to_skip
        randomness.set_epoch(loader, epoch_sampler, epoch)
        for batch_index, batch in enumerate(loader, start=start):
            generator = randomness.make_generator(
                accelerator.device, run_state.seed, NOISE_STREAM, epoch, batch_index, accelerator.process_index
            )
            with accelerator.accumulate(*text_encoders):
                with torch.no_grad():
                    if "latent_dist" in batch:
                        latent_dist = DiagonalGaussianDistribution(batch["latent_dist"])
                    else:
                        latent_dist = vae.encode(batch["pixel_values"].to(vae_dtype)).latent_dist
                    latents = (latent_dist.sample(generator=generator) * scaling_factor).to(weight_dtype)
                noise = objectives.sample_noise(latents, generator)
                timesteps = objectives.sample_timesteps(
                    latents.shape[0], noise_scheduler.config.num_train_timesteps, generator, latents.device
                )
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states, added_cond_kwargs = encode_batch(text_encoders, batch, args, weight_dtype)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states,
                                  added_cond_kwargs=added_cond_kwargs).sample
                target = objectives.loss_target(
                    noise_scheduler, noise_scheduler.config.prediction_type, latents, noise, timesteps
                )
                loss = objectives.diffusion_loss(model_pred, target, mask=batch.get("loss_mask"))
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_([embedding.new_rows for embedding in embeddings], args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
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

            if global_step % args.save_steps == 0 and accelerator.is_main_process:
                saved = save_all_embeddings(embeddings, args, args.output_dir, step=global_step)
                logger.info(f"Saved {', '.join(saved)}")

            checkpointer.save_if_due(global_step)

            if args.validation_prompt is not None and global_step % args.validation_steps == 0:
                images = generate_validation_images(
                    accelerator, [accelerator.unwrap_model(text_encoder) for text_encoder in text_encoders],
                    tokenizers, unet, vae, noise_scheduler, args, run_state.seed, vae_dtype,
                )
                if accelerator.is_main_process:
                    validation_paths = save_validation_images(accelerator, images, global_step, args)
                    logger.info(f"Saved validation images to {os.path.join(args.output_dir, 'validation')}")

            stop_status = checkpointer.stop_if_requested(global_step)
            if stop_status:
                progress_bar.close()
                accelerator.end_training()
                return stop_status
            if global_step >= args.max_train_steps:
                break
    progress_bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_full = args.save_as_full_pipeline
        if args.push_to_hub and not save_full:
            logger.warning("--push_to_hub: saving the full pipeline as well (as upstream does)")
            save_full = True
        if save_full:
            save_full_pipeline(accelerator, text_encoders, embeddings, tokenizers, args)
        saved = save_all_embeddings(embeddings, args, args.output_dir)
        write_model_card(args, global_step, validation_paths)
        logger.info(f"Saved {', '.join(saved)}")
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=["step_*", "epoch_*", "checkpoint-*", f"{checkpointing.PARTIAL_PREFIX}*"],
                token=args.hub_token,
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    cli.run_main(main)
