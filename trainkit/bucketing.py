"""Real datasets (SPEC §9): aspect-ratio buckets (diffusers' bucket arithmetic, capped to each image's size), the
batch order over buckets, crops and loss masks.
"""

import contextlib
import os

import torch

from trainkit.cli import InputError, first_line, require_multiple_of_8, require_positive
from trainkit.randomness import make_generator


def add_bucket_arguments(parser):
    """The aspect-ratio bucket flags, identical in the five latent scripts. The first two are upstream's (the newer
    diffusers DreamBooth examples); the others are ours, for what diffusers' bucket helpers leave out."""
    add = parser.add_argument
    add("--use_aspect_ratio_buckets", action="store_true",
        help="Train each image at the aspect ratio nearest its own instead of one --resolution square: buckets of "
             "about --resolution^2 pixels in the common aspect ratios (diffusers' generate_aspect_ratio_buckets), "
             "capped to each image's own size so that small images go to a smaller bucket instead of being upscaled.")
    add("--aspect_ratio_buckets", type=str, default=None,
        help="An explicit bucket list 'h1,w1;h2,w2;...' (sides in pixels, multiples of 8). Images go to the bucket of "
             "nearest aspect ratio and are resized to cover it and cropped. Implies --use_aspect_ratio_buckets; "
             "--resolution then only sets the validation size.")
    add("--bucket_min_resolution", type=int, default=None,
        help="(ours) The smallest bucket ladder --use_aspect_ratio_buckets builds for images smaller than "
             "--resolution: rungs every --bucket_divisibility pixels from this up to --resolution "
             "(default: --resolution / 2). An image smaller than every rung goes to the smallest one.")
    add("--bucket_divisibility", type=int, default=64,
        help="(ours) Generated bucket sides are multiples of this (default 64, so that every UNet level divides the "
             "latents evenly; a multiple of 8).")
    add("--validation_height", type=int, default=None,
        help="(ours) Height of validation images (default: --resolution), e.g. to preview a bucket shape.")
    add("--validation_width", type=int, default=None,
        help="(ours) Width of validation images (default: --resolution).")


def add_mask_arguments(parser, column=True):
    add = parser.add_argument
    add("--masked_loss", action="store_true",
        help="(ours) Weight the loss per latent pixel by a mask: the image's alpha channel, or `name.mask.png` beside "
             "`name.png`" + (", or the dataset column --mask_column" if column else "") + ". White trains, black "
             "is ignored; the mask follows the image's resize, crop and flip.")
    if column:
        add("--mask_column", type=str, default=None,
            help="(ours) With --masked_loss, the dataset column that holds each image's mask.")


def check_bucket_flags(args):
    """Bucket flags -> args.buckets: None (square --resolution, today's behaviour) or a `Buckets`. Raises InputError.
    Call after --resolution has been checked."""
    require_multiple_of_8("--validation_height", args.validation_height)
    require_multiple_of_8("--validation_width", args.validation_width)
    require_positive(args, "validation_height", "validation_width", "bucket_min_resolution", "bucket_divisibility")
    args.buckets = None
    if args.aspect_ratio_buckets is not None:
        if args.bucket_min_resolution is not None:
            raise InputError("--bucket_min_resolution shapes the generated bucket ladder; it cannot be combined with "
                             "the explicit list of --aspect_ratio_buckets")
        from diffusers.training_utils import parse_buckets_string

        try:
            with _quiet_warnings():  # its warning about sides not divisible by 8 becomes our error below
                sizes = parse_buckets_string(args.aspect_ratio_buckets)
        except ValueError as error:
            raise InputError(f"--aspect_ratio_buckets {args.aspect_ratio_buckets!r}: {first_line(error)} "
                             "(expected 'height,width;height,width;...')") from None
        for height, width in sizes:
            if height % 8 or width % 8:
                raise InputError(f"--aspect_ratio_buckets: bucket {height},{width} has a side that is not a "
                                 "multiple of 8 (the VAE downsamples by 8)")
        args.buckets = Buckets(explicit=list(dict.fromkeys(sizes)))
    elif args.use_aspect_ratio_buckets:
        require_multiple_of_8("--bucket_divisibility", args.bucket_divisibility, "bucket sides are multiples of it")
        minimum = args.bucket_min_resolution or max(args.bucket_divisibility, args.resolution // 2)
        if minimum > args.resolution:
            raise InputError(f"--bucket_min_resolution ({minimum}) must be <= --resolution ({args.resolution})")
        args.buckets = Buckets(resolution=args.resolution, minimum=minimum, divisibility=args.bucket_divisibility)
    elif args.bucket_min_resolution is not None or args.bucket_divisibility != 64:
        flag = "--bucket_min_resolution" if args.bucket_min_resolution is not None else "--bucket_divisibility"
        raise InputError(f"{flag} applies only with --use_aspect_ratio_buckets")


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Buckets:
    """Which (height, width) each image trains at. An explicit list: the bucket of nearest aspect ratio
    (diffusers' `find_nearest_bucket`). Generated: a ladder of bucket sets, one per rung from `resolution` down to
    `minimum` every `divisibility` pixels (diffusers' `generate_aspect_ratio_buckets`); an image goes to the nearest
    aspect ratio of the largest rung whose bucket fits inside it, so it is never upscaled unless it is smaller than
    the smallest rung."""

    def __init__(self, explicit=None, resolution=None, minimum=None, divisibility=64):
        from diffusers.training_utils import generate_aspect_ratio_buckets

        if explicit is not None:
            self.rungs = [explicit]
        else:
            sides = range(resolution, minimum - 1, -divisibility)
            self.rungs = [generate_aspect_ratio_buckets(side, divisibility=divisibility) for side in sides]
        self.explicit = explicit is not None

    def assign(self, height, width):
        """The (height, width) bucket of an image of that size."""
        from diffusers.training_utils import find_nearest_bucket

        for rung in self.rungs:
            bucket = rung[find_nearest_bucket(height, width, rung)]
            if self.explicit or (bucket[0] <= height and bucket[1] <= width):
                return bucket
        return bucket

    def all(self):
        return sorted({bucket for rung in self.rungs for bucket in rung})

    def describe(self):
        """For logs, model cards and cache settings."""
        return ";".join(f"{h},{w}" for h, w in self.all())


def image_size(cell):
    """(height, width) of an image without decoding its pixels: a PIL image, or a datasets image cell with
    decode=False ({"bytes", "path"}), as displayed: datasets decodes with the EXIF orientation applied, so a photo
    stored on its side is measured upright."""
    from io import BytesIO

    from PIL import Image

    if isinstance(cell, Image.Image):
        return cell.height, cell.width
    with Image.open(BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as image:
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # Orientation: rotated by 90 or 270 degrees
            return image.width, image.height
        return image.height, image.width


def cover_size(width, height, target_height, target_width):
    """(width, height) of an image resized, aspect kept, to the smallest size that covers the target, the long side
    rounded. For a square target this is the short side resized to the target (a script whose square transform
    truncates the long side, as torchvision's Resize does, keeps its own arithmetic)."""
    if target_width * height >= target_height * width:  # the width binds
        return target_width, max(target_height, round(height * target_width / width))
    return max(target_width, round(width * target_height / height)), target_height


def crop_origin(width, height, target_height, target_width, center, generator):
    """(top, left) of a target-sized crop of a (width, height) image: centred, or drawn from `generator`, left first,
    then top (a script whose square transform draws in another order keeps its order)."""
    if center:
        return round((height - target_height) / 2), round((width - target_width) / 2)
    left = int(torch.randint(0, width - target_width + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - target_height + 1, (1,), generator=generator))
    return top, left


def mask_path_for(image_path):
    """`name.mask.png` beside `name.<ext>`."""
    return os.path.splitext(image_path)[0] + ".mask.png"


def has_alpha(image):
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_mask(image, mask=None, name="image"):
    """The loss mask of a PIL `image` as an 'L' image of its size: `mask` (a PIL image or a path) if given,
    otherwise the image's alpha channel. Raises InputError when the sizes differ or there is no mask."""
    from PIL import Image

    if mask is not None:
        mask_name = mask if isinstance(mask, str) else f"the mask of {name}"
        mask = Image.open(mask) if isinstance(mask, str) else mask
        if mask.size != image.size:
            raise InputError(f"--masked_loss: {mask_name} is {mask.width}x{mask.height} but {name} is "
                             f"{image.width}x{image.height}; a mask must have its image's size")
        return mask.convert("L")
    if has_alpha(image):
        return image.convert("RGBA").getchannel("A")
    raise InputError(f"--masked_loss: {name} has no alpha channel and no mask")


def mask_to_latents(mask, factor=8):
    """A (..., H, W) mask in [0, 1] averaged over each `factor` x `factor` block: one weight per latent pixel."""
    return torch.nn.functional.avg_pool2d(mask.float().reshape(-1, 1, *mask.shape[-2:]), factor).reshape(
        *mask.shape[:-2], mask.shape[-2] // factor, mask.shape[-1] // factor)


def bucket_batches(buckets_of_samples, batch_size, seed, stream, epoch, shuffle=True):
    """The batches of one epoch as lists of sample indices: each bucket's samples shuffled and cut into batches of
    `batch_size` (a bucket's last batch may be smaller: nothing is dropped), then the batches of all buckets shuffled
    together. A pure function of (seed, stream, epoch) and the buckets, so every rank and a resumed run compute the
    same order."""
    members = {}
    for index, bucket in enumerate(buckets_of_samples):
        members.setdefault(tuple(bucket), []).append(index)
    generator = make_generator("cpu", seed, stream, epoch)
    batches = []
    for bucket in sorted(members):
        indices = members[bucket]
        if shuffle:
            indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        batches += [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


class BucketBatchSampler(torch.utils.data.Sampler):
    """A batch sampler of (epoch, index) lists whose samples all share a bucket (`bucket_batches`), the bucketed
    counterpart of `EpochSampler`. It has no `batch_size` attribute on purpose: accelerate then shards whole batches
    round-robin across ranks (a batch is never split or mixed) and, at an epoch's end, tops ranks up with whole
    batches from the epoch's start.

    Start each epoch with `set_epoch(loader, sampler, epoch)`: accelerate's own does not reach a batch sampler."""

    def __init__(self, buckets_of_samples, batch_size, run_state, stream, shuffle=True):
        self.buckets_of_samples = [tuple(bucket) for bucket in buckets_of_samples]
        self.images_per_batch, self.run_state, self.stream, self.shuffle = batch_size, run_state, stream, shuffle
        self.epoch = 0
        self.num_batches = len(bucket_batches(self.buckets_of_samples, batch_size, 0, stream, 0, shuffle=False))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        batches = bucket_batches(self.buckets_of_samples, self.images_per_batch, self.run_state.seed, self.stream,
                                 self.epoch, self.shuffle)
        return iter([[(self.epoch, index) for index in batch] for batch in batches])
