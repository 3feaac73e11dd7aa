"""What must behave identically in every training script of the suite.

These groups, nothing else (dataset code, argparse and save hooks stay in each script):

* Command line and bad input: one-line errors (`InputError`, `ArgumentParser`, `run_main`), `--config FILE.yaml`
  loading, and the checks every script applies to paths, packages and images (SPEC §7).
* Diffusion maths: restorable per-batch randomness, noise/timestep sampling with offset noise and input
  perturbation, the loss target for each prediction type, and Min-SNR loss weights.
* Checkpoint safety: atomic `checkpoint-N` writes, rotation after a complete save, `latest` resolution that never
  sees a partial checkpoint, and a preemption flag that all ranks agree on at an optimizer-step boundary.
* Feature cache: latents and text embeddings computed once by the frozen models and kept on disk, keyed so that a
  change of data, model or transforms is a miss (`FeatureCache`, `--cache_latents`, `--cache_text_embeddings`).
* Distributed engines: the DeepSpeed settings that come from the command line and the engines a script refuses
  (`adopt_engine_settings`), and the trained weights gathered whole under ZeRO-3 (`whole_model`).
"""

import argparse
import contextlib
import gc
import logging
import math
import os
import re
import shutil
import signal
import sys

import numpy as np
import torch

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


class InputError(Exception):
    """A mistake in the command line or in the user's data. Reported as one line, without a traceback."""


def _is_rank_zero():
    return int(os.environ.get("RANK", "0")) == 0


def run_main(main):
    """Run a script's `main()` and exit with the status it returns (143/130 after a preemption stop).

    `InputError` becomes a one-line message and exit status 2. The models `main()` held are released and the process
    group is destroyed before exit: with torch 2.13 a DDP process can otherwise abort at interpreter exit.
    """
    try:
        status = main() or 0
    except InputError as error:
        if _is_rank_zero():
            print(f"error: {error}", file=sys.stderr, flush=True)
        status = 2
    gc.collect()
    _destroy_process_group()
    sys.exit(status)


def _destroy_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the suite's error contract: one line naming the flag, exit status 2, no usage dump."""

    def error(self, message):
        if _is_rank_zero():
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args_with_config(parser, argv=None):
    """Parse `argv` with `--config FILE.yaml` support.

    The YAML file maps flag names without dashes to values (`train_batch_size: 4`); the command line wins over the
    file; an unknown key, a missing file or a value of the wrong type is an error naming it.
    """
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="A YAML file whose keys are flag names without dashes. Flags given on the command line win.",
    )
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", default=None)
    known, _ = config_only.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**_load_config_file(parser, known.config))
    return parser.parse_args(argv)


def _load_config_file(parser, path):
    import yaml

    if not os.path.isfile(path):
        parser.error(f"argument --config: file {path!r} does not exist")
    try:
        with open(path) as file:
            values = yaml.safe_load(file) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"argument --config: cannot read {path!r} as YAML ({type(error).__name__})")
    if not isinstance(values, dict):
        parser.error(f"argument --config: {path!r} must hold a mapping of flag names to values")

    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            parser.error(f"--config {path}: unknown key {key!r} (keys are flag names without the leading dashes)")
        defaults[action.dest] = _config_value(parser, path, key, action, value)
        # A required flag given in the file no longer has to be on the command line.
        action.required = False
    return defaults


def _config_value(parser, path, key, action, value):
    flag = action.option_strings[-1] if action.option_strings else key

    def convert(item):
        # PyYAML reads `1e-4` as a string, so string values go through the flag's own type like argv does.
        if isinstance(item, str) and action.type is not None:
            try:
                item = action.type(item)
            except (TypeError, ValueError):
                parser.error(f"--config {path}: key {key!r}: invalid value {item!r} for {flag}")
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            parser.error(f"--config {path}: key {key!r}: {item!r} is not one of {choices}")
        return item

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            parser.error(f"--config {path}: key {key!r} must be true or false")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [convert(item) for item in items]
    if isinstance(value, (list, dict)):
        parser.error(f"--config {path}: key {key!r} takes a single value")
    return convert(value)


def require_positive(args, *names):
    """Raise InputError for the first of `names` whose value is set and <= 0."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name} must be > 0, got {value}")


def require_multiple_of_8(flag, value, why="the VAE downsamples by 8"):
    """Image sides must be whole latent pixels: the same rule, and message, in every latent-space script."""
    if value is not None and value % 8:
        raise InputError(f"{flag} must be a multiple of 8 ({why}), got {value}")


def first_line(error):
    """The first line of an exception's message (library errors can be pages long), or its type name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_local_or_hub_id(flag, value):
    """A value that is clearly a path must exist; one that could be a hub id (`name`, `owner/name`) is checked when
    it is loaded, where a failure becomes an InputError too."""
    looks_like_path = value.startswith((".", "/", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)
    if looks_like_path and not os.path.exists(os.path.expanduser(value)):
        raise InputError(f"{flag} {value!r} does not exist")


def check_pipeline_folder(path, parts):
    """`--pretrained_model_name_or_path`: a path must exist, and a local pipeline folder must hold every part
    (`unet`, `vae`, ...) the script loads; a hub id is checked when loaded."""
    check_local_or_hub_id("--pretrained_model_name_or_path", path)
    if os.path.isdir(path):
        missing = [part for part in parts if not os.path.isdir(os.path.join(path, part))]
        if "unet" in missing and is_flux_model(path):
            raise InputError(f"--pretrained_model_name_or_path {path!r} is a FLUX.1 model, which only "
                             "train_dreambooth_lora.py trains (FLUX.1 LoRA); this script trains SD and SDXL UNets")
        if missing:
            raise InputError(
                f"--pretrained_model_name_or_path {path!r} is not a Stable Diffusion pipeline folder "
                f"(missing {', '.join(f'{part}/' for part in missing)})"
            )

def require_package(module, flag, install):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"{flag} needs the {module} package: {install}")


# Installed version pairs known to break a feature: (package, its versions, the other package, its versions, the
# feature they break, the fix). A run that needs the feature stops at start-up in one line instead of failing with a
# library traceback once the models are loaded. requirements.txt excludes these pairs; this catches other installs.
KNOWN_INCOMPATIBLE = (
    # transformers 5.24 demands peft >= 0.22 (unreleased on 2026-12-01) for every PEFT adapter on its models.
    ("transformers", ">=5.24", "peft", "<0.22", "text-encoder LoRA", 'pip install "transformers<5.24"'),
)


def check_compatible_versions(feature):
    """Raise InputError if the installed packages are a KNOWN_INCOMPATIBLE pair for `feature`."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet

    for first, first_range, second, second_range, broken, fix in KNOWN_INCOMPATIBLE:
        if broken != feature:
            continue
        try:
            first_version, second_version = version(first), version(second)
        except PackageNotFoundError:
            continue
        if SpecifierSet(first_range).contains(first_version, prereleases=True) and \
                SpecifierSet(second_range).contains(second_version, prereleases=True):
            raise InputError(
                f"{first} {first_version} with {second} {second_version} cannot train or load a {feature} "
                f"({first} {first_range} needs {second} outside {second_range}); fix: {fix}"
            )


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder):
    """Image files under `folder` (any depth), in a stable order. A `name.mask.png` beside an image `name.<ext>` is
    that image's loss mask (--masked_loss), not an image to train on."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        stems = {os.path.splitext(name)[0] for name in files if name.lower().endswith(IMAGE_EXTENSIONS)}
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            if name.lower().endswith(".mask.png") and name[: -len(".mask.png")] in stems:
                continue
            yield os.path.join(root, name)


def drop_unreadable_images(dataset, columns, flag, source):
    """`dataset` without the rows where an image in `columns` (one name or several) cannot be decoded, each file
    named in a warning.

    Every image is decoded once up front (datasets caches the result), so a corrupt file is skipped here by name
    instead of crashing the run mid-epoch. No readable row at all is an InputError.
    """
    from datasets import Image as ImageFeature

    columns = [columns] if isinstance(columns, str) else list(columns)
    raw = dataset
    for column in columns:
        raw = raw.cast_column(column, ImageFeature(decode=False))

    def check(batch):
        rows = range(len(batch[columns[0]]))
        return {"readable": [all(is_readable_image(batch[column][row]) for column in columns) for row in rows]}

    readable = raw.map(check, batched=True, remove_columns=raw.column_names, desc="Checking images")["readable"]
    bad = [index for index, ok in enumerate(readable) if not ok]
    for index in bad:
        row = raw[index]
        names = [(row[c] or {}).get("path") or f"row {index} of {c}" for c in columns if not is_readable_image(row[c])]
        logger.warning(f"Skipping unreadable image {', '.join(names)} in {source}")
    if len(bad) == len(dataset):
        what = "images" if len(columns) == 1 else "examples"
        raise InputError(f"{flag} {source!r}: none of the {len(dataset)} {what} can be read")
    return dataset.select([index for index, ok in enumerate(readable) if ok]) if bad else dataset


def is_readable_image(item):
    """`item`: a datasets image cell with decode=False ({"bytes", "path"}), or {"path": file}."""
    from io import BytesIO

    from PIL import Image

    if not item:
        return False
    try:
        with Image.open(BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
            image.load()
            return image.width > 0 and image.height > 0
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------------------------
# Restorable randomness, noise and loss
# --------------------------------------------------------------------------------------------------------------------


def derive_seed(*keys):
    """A well-mixed 63-bit seed from integers (run seed, stream, epoch, index, rank, ...).

    Randomness derived this way depends only on where it is used, not on how much randomness was drawn before, so a
    resumed run draws exactly what the uninterrupted run drew, whatever the data loader workers did.
    """
    # The key count goes first: SeedSequence treats trailing zeros as absent, so (a, b) would equal (a, b, 0).
    entropy = [len(keys)] + [int(key) % (1 << 64) for key in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_generator(device, *keys):
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def resolve_seed(seed, accelerator):
    """The run's base seed: `--seed` if given, otherwise one drawn on the main process and shared with all ranks."""
    if seed is not None:
        return seed
    from accelerate.utils import broadcast_object_list

    drawn = [int.from_bytes(os.urandom(4), "little")]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn, from_process=0)
    return drawn[0]


def run_seed(args, accelerator):
    """The run's base seed, known before the data is built: a resumed run's is its checkpoint's (the RunState every
    script registers first; accelerate restores it again with the rest of the state), otherwise `resolve_seed`. A
    --max_train_samples subset, and so the bucketed batches and the number of steps per epoch, depend on it."""
    saved = os.path.join(args.resume_path, "custom_checkpoint_0.pkl") if args.resume_path else None
    if saved and os.path.isfile(saved):
        state = torch.load(saved, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "seed" in state:
            return state["seed"]
    return resolve_seed(args.seed, accelerator)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) pairs: a shuffle of range(num_samples) that depends only on the run seed and the epoch.

    Every rank computes the same order (accelerate then gives each rank its share of each batch), a resumed run
    recomputes it, and the dataset receives the epoch with each index to derive per-sample augmentation randomness.
    Start each epoch with `set_epoch(loader, sampler, epoch)` (below).
    """

    def __init__(self, num_samples, run_state, stream, shuffle=True):
        self.num_samples, self.run_state, self.stream, self.shuffle = num_samples, run_state, stream, shuffle
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            generator = make_generator("cpu", self.run_state.seed, self.stream, self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        return iter([(self.epoch, index) for index in order])


def set_epoch(loader, sampler, epoch):
    """Start an epoch on the (prepared, maybe skipping) data loader and on its sampler (`EpochSampler` or
    `BucketBatchSampler`). accelerate's `loader.set_epoch` does not reach a sampler behind its sharding wrapper on
    2+ processes (a batch sampler) or behind `skip_first_batches` on top of it (a resumed epoch): without the
    second call such an epoch would silently replay epoch 0's order."""
    loader.set_epoch(epoch)
    sampler.set_epoch(epoch)


def steps_per_epoch(num_batches, num_processes, gradient_accumulation_steps):
    """Optimizer steps in one epoch: accelerate gives each rank ceil(batches / processes) batches, and the last,
    possibly partial, accumulation of an epoch still makes a step."""
    return math.ceil(math.ceil(num_batches / num_processes) / gradient_accumulation_steps)


def resume_position(global_step, steps_per_epoch, gradient_accumulation_steps):
    """(epoch, batches of it to skip) where a run that has made `global_step` optimizer steps continues."""
    epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    return epoch, steps_into_epoch * gradient_accumulation_steps


class RunState:
    """Values a resumed run must take from its checkpoint rather than from the command line (the base seed)."""

    def __init__(self, seed):
        self.seed = seed

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state):
        self.seed = state["seed"]


def sample_noise(latents, generator, noise_offset=0.0):
    """Gaussian noise shaped like `latents`, plus per-channel offset noise when `noise_offset` > 0."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device)
        noise = noise + noise_offset * offset.to(latents.dtype)
    return noise


def sample_timesteps(batch_size, num_train_timesteps, generator, device, weights=None):
    """Training timesteps: uniform, or drawn with probabilities `weights` (from `timestep_bias_weights`, on
    `device`). Either way from `generator`, so a resumed run draws the same timesteps."""
    if weights is None:
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()
    return torch.multinomial(weights, batch_size, replacement=True, generator=generator).long()


TIMESTEP_BIAS_STRATEGIES = ("earlier", "later", "range", "none")


def check_timestep_bias(strategy, multiplier, begin, end, portion):
    """The --timestep_bias_* checks that need no model (the scheduler's timestep count is checked by
    `timestep_bias_weights`). Raises InputError."""
    if not 0 < portion <= 1:
        raise InputError(f"--timestep_bias_portion must be in (0, 1], got {portion}")
    if strategy == "none":
        return
    if multiplier <= 0:
        # Upstream's reason: a multiplier of 0 would stop training those timesteps altogether.
        raise InputError(f"--timestep_bias_multiplier must be > 0, got {multiplier} "
                         "(to train without a bias, use --timestep_bias_strategy none)")
    if strategy == "range":
        if begin < 0:
            raise InputError(f"--timestep_bias_begin must be >= 0, got {begin}")
        if begin >= end:
            raise InputError(f"--timestep_bias_strategy range needs --timestep_bias_begin < --timestep_bias_end, "
                             f"got {begin} and {end}")


def timestep_bias_weights(strategy, num_timesteps, multiplier=1.0, begin=0, end=1000, portion=0.25):
    """Sampling probabilities over the training timesteps for --timestep_bias_strategy (upstream SDXL's
    `generate_timestep_weights`): `multiplier` times the weight on the first (`earlier`) or last (`later`)
    `portion` of the timesteps, or on [begin, end) (`range`). None for `none`: plain uniform sampling."""
    if strategy == "none":
        return None
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise InputError(f"--timestep_bias_strategy {strategy!r} is not one of {', '.join(TIMESTEP_BIAS_STRATEGIES)}")
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    count = int(portion * num_timesteps)
    if strategy == "earlier":
        biased = slice(0, count)
    elif strategy == "later":
        biased = slice(num_timesteps - count, num_timesteps)  # not slice(-count, None): count may be 0
    else:
        if end > num_timesteps:
            raise InputError(f"--timestep_bias_end {end} is past the scheduler's {num_timesteps} training timesteps")
        biased = slice(begin, end)
    weights[biased] *= multiplier
    return (weights / weights.sum()).float()


def perturb_noise(noise, input_perturbation, generator):
    """The noise actually added to the inputs under input perturbation (https://arxiv.org/abs/2301.11706); the loss
    target stays the unperturbed `noise`."""
    if not input_perturbation:
        return noise
    extra = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + input_perturbation * extra


def loss_target(noise_scheduler, prediction_type, clean, noise, timesteps):
    """What the network is trained to predict for `prediction_type` (epsilon, v_prediction or sample)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"Unknown prediction type {prediction_type!r}")


def min_snr_loss_weights(noise_scheduler, timesteps, snr_gamma, prediction_type):
    """Per-sample loss weights of Min-SNR-gamma (https://arxiv.org/abs/2303.09556), shaped (batch,)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(prediction, target, weights=None, mask=None):
    """Mean squared error in fp32; with `weights` (batch,), a weighted mean of the per-sample errors.

    With `mask` (batch, 1, h, w) of latent-pixel weights (`mask_to_latents`), the mean error over the masked pixels:
    the masked squared error divided by the mask's mean, over the batch or, with `weights`, per sample. An all-ones
    mask therefore gives exactly the unmasked loss, and a zero-weight pixel has no gradient."""
    squared_error = (prediction.float() - target.float()) ** 2
    if mask is not None:
        mask = mask.float().to(squared_error.device)
        squared_error = squared_error * mask
    if weights is None:
        if mask is None:
            return squared_error.mean()
        return squared_error.mean() / mask.mean().clamp_min(1e-8)
    dims = list(range(1, squared_error.ndim))
    per_sample = squared_error.mean(dim=dims)
    if mask is not None:
        per_sample = per_sample / mask.mean(dim=dims).clamp_min(1e-8)
    return (per_sample * weights.float()).mean()



# Flow matching (FLUX.1): the model predicts the velocity noise - latents along the straight path
# x_sigma = (1 - sigma) * latents + sigma * noise, with timesteps and loss weights from diffusers' SD3/Flux helpers.
FLOW_WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def sample_flow_matching_sigmas(scheduler, batch_size, weighting_scheme, generator, device, logit_mean=0.0,
                                logit_std=1.0, mode_scale=1.29):
    """(timesteps, sigmas (batch, 1, 1, 1)) for flow-matching training: positions drawn by diffusers'
    compute_density_for_timestep_sampling from `generator` (restorable), mapped onto the training schedule of the
    FlowMatchEulerDiscreteScheduler (its shifted sigmas), as upstream's Flux script maps them."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, logit_mean, logit_std, mode_scale,
                                              device=generator.device, generator=generator)
    count = scheduler.config.num_train_timesteps
    indices = (u * count).long().clamp(0, count - 1).cpu()
    timesteps = scheduler.timesteps[indices].to(device)
    sigmas = scheduler.sigmas[indices].to(device=device, dtype=torch.float32).reshape(batch_size, 1, 1, 1)
    return timesteps, sigmas


def flow_matching_inputs(latents, noise, sigmas):
    """(noisy latents, velocity target): the point at `sigmas` on the straight path from latents to noise, and
    the direction the model learns to predict there."""
    return (1.0 - sigmas) * latents + sigmas * noise, noise - latents


def flow_matching_loss(prediction, target, sigmas, weighting_scheme, mask=None):
    """diffusion_loss weighted per sample by diffusers' compute_loss_weighting_for_sd3 (sigma_sqrt, cosmap; uniform
    otherwise), the same per-sample mean upstream's Flux script takes."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weights = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).reshape(-1)
    if weighting_scheme not in ("sigma_sqrt", "cosmap"):
        weights = None  # uniform: the plain mean, as diffusion_loss takes it
    return diffusion_loss(prediction, target, weights, mask=mask)

# --------------------------------------------------------------------------------------------------------------------
# SDXL: model detection, two-encoder prompts, micro-conditioning, VAE precision
# --------------------------------------------------------------------------------------------------------------------

# What an SDXL base pipeline folder holds, next to SD's tokenizer/, text_encoder/, vae/, unet/, scheduler/.
SDXL_PIPELINE_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler")


def read_model_index(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """The pipeline's model_index.json as a dict: read from a local folder, fetched for a hub id ({} where there is
    none, or where the path does not exist: the caller's folder check reports that). A hub id that cannot be
    reached is an InputError."""
    import json

    path = pretrained_model_name_or_path
    if os.path.isdir(path):
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            return {}
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        return {}
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            index_file = hf_hub_download(path, "model_index.json", revision=revision, cache_dir=cache_dir)
        except EntryNotFoundError:
            return {}
        except Exception as error:
            raise InputError(f"--pretrained_model_name_or_path {path!r}: cannot read model_index.json "
                             f"({first_line(error)})") from None
    try:
        with open(index_file) as file:
            index = json.load(file)
    except (OSError, ValueError) as error:
        raise InputError(f"--pretrained_model_name_or_path {path!r}: cannot read model_index.json "
                         f"({first_line(error)})") from None
    return index if isinstance(index, dict) else {}


def is_sdxl_model(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """Whether the base model is SDXL: a StableDiffusionXL* pipeline or a text_encoder_2 in model_index.json, or, in
    a local folder, a text_encoder_2/ or a UNet conditioned on `text_time` (SDXL's pooled text + size embedding)."""
    import json

    index = read_model_index(pretrained_model_name_or_path, revision, cache_dir)
    if str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index:
        return True
    path = pretrained_model_name_or_path
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        return True
    try:
        with open(os.path.join(path, "unet", "config.json")) as file:
            return json.load(file).get("addition_embed_type") == "text_time"
    except (OSError, ValueError, AttributeError):
        return False  # the folder check or the model loading reports a missing or broken unet/



# What a FLUX.1 base pipeline folder holds: CLIP (pooled) and T5 (sequence) text encoders, a transformer.
FLUX_PIPELINE_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "transformer",
                       "scheduler")


def is_flux_model(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """Whether the base model is FLUX.1: a Flux* pipeline in model_index.json or, in a local folder, a transformer/
    whose config names FluxTransformer2DModel."""
    import json

    index = read_model_index(pretrained_model_name_or_path, revision, cache_dir)
    if str(index.get("_class_name", "")).startswith("Flux"):
        return True
    try:
        with open(os.path.join(pretrained_model_name_or_path, "transformer", "config.json")) as file:
            return json.load(file).get("_class_name") == "FluxTransformer2DModel"
    except (OSError, ValueError, AttributeError):
        return False

def tokenize_prompts(tokenizers, prompts):
    """Token ids of `prompts` (a string or a list) for each tokenizer, padded to its maximum length, as SD and SDXL
    pipelines tokenize them: a list of (batch, max_length) tensors, one per tokenizer."""
    return [
        tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        for tokenizer in tokenizers
    ]


def encode_prompt_sdxl(text_encoders, input_ids):
    """SDXL's prompt conditioning, as `StableDiffusionXLPipeline.encode_prompt` computes it with clip_skip=None:
    the penultimate hidden states of both CLIP encoders concatenated on the last dimension, and the pooled
    (projected) embedding of the second. `input_ids`: one tensor per encoder (`tokenize_prompts`). Returns
    (prompt_embeds (batch, tokens, hidden 1 + hidden 2), pooled_prompt_embeds (batch, projection)). Gradients flow
    where the encoders train (text-encoder LoRA); wrap in torch.no_grad() otherwise."""
    hidden_states = []
    for text_encoder, ids in zip(text_encoders, input_ids):
        output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    # text_encoder_2 is a CLIPTextModelWithProjection: `text_embeds` is its pooled, projected embedding.
    return torch.cat(hidden_states, dim=-1), output.text_embeds


def sdxl_time_ids(original_sizes, crops_top_left, target_size, device=None, dtype=torch.float32):
    """SDXL's micro-conditioning, one row of 6 numbers per sample: original (height, width) of the image before any
    resize, the (top, left) of the crop in the resized image, and the target (height, width) trained at, as
    `StableDiffusionXLPipeline._get_add_time_ids` orders them. `original_sizes`, `crops_top_left`: (batch, 2)
    tensors or lists of pairs; `target_size`: one pair, or (batch, 2) for per-sample targets (buckets)."""
    original = torch.as_tensor(original_sizes, dtype=torch.float64).reshape(-1, 2)
    crops = torch.as_tensor(crops_top_left, dtype=torch.float64).reshape(-1, 2)
    target = torch.as_tensor(target_size, dtype=torch.float64).reshape(-1, 2).expand(original.shape[0], 2)
    return torch.cat([original, crops, target], dim=1).to(device=device, dtype=dtype)


def check_crop_flags(args):
    """--crops_coords_top_left_h/_w: SDXL only (they go into its time ids), and >= 0. Raises InputError."""
    for name in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
        value = getattr(args, name)
        if value is not None and not args.sdxl:
            raise InputError(f"--{name} applies to SDXL models only (SDXL's time ids); "
                             f"{args.pretrained_model_name_or_path!r} is a Stable Diffusion model")
        if value is not None and value < 0:
            raise InputError(f"--{name} must be >= 0, got {value}")


def crops_for_time_ids(crops_top_left, top=None, left=None):
    """The crop top-lefts SDXL's time ids carry: each sample's real crop, except a coordinate given explicitly with
    upstream's --crops_coords_top_left_h (`top`) / --crops_coords_top_left_w (`left`), which then wins for every
    sample, as upstream."""
    crops = torch.as_tensor(crops_top_left).clone()
    for column, value in enumerate((top, left)):
        if value is not None:
            crops[:, column] = value
    return crops


def sdxl_added_conditions(pooled_prompt_embeds, time_ids):
    """The UNet's `added_cond_kwargs` for SDXL (`addition_embed_type` text_time)."""
    return {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids.to(pooled_prompt_embeds.device)}


def sdxl_vae_dtype(weight_dtype, pretrained_vae_model_name_or_path=None):
    """The dtype the SDXL VAE runs in. SDXL's own VAE overflows in fp16 (NaN latents), so upstream keeps it in fp32
    unless --pretrained_vae_model_name_or_path names another VAE (such as an fp16-safe one), which then runs in the
    mixed-precision dtype like the other frozen models."""
    return weight_dtype if pretrained_vae_model_name_or_path else torch.float32


def vae_dtype(args, weight_dtype):
    """The dtype a script's VAE runs in: SD's in the frozen models' dtype, SDXL's by `sdxl_vae_dtype`."""
    return sdxl_vae_dtype(weight_dtype, args.pretrained_vae_model_name_or_path) if args.sdxl else weight_dtype


def load_vae(args):
    """The base pipeline's vae/, or the VAE folder or hub id --pretrained_vae_model_name_or_path names (its own
    repository: the base model's --revision and --variant do not apply to it). A load error is an InputError."""
    from diffusers import AutoencoderKL

    custom = args.pretrained_vae_model_name_or_path
    cache_dir = getattr(args, "cache_dir", None)
    if custom:
        flag, source, part, kwargs = "--pretrained_vae_model_name_or_path", custom, "the VAE", {}
    else:
        flag, source, part = "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "vae/"
        kwargs = {"subfolder": "vae", "revision": args.revision, "variant": args.variant}
    try:
        return AutoencoderKL.from_pretrained(source, cache_dir=cache_dir, **kwargs)
    except Exception as error:
        raise InputError(f"{flag} {source!r}: cannot load {part} ({first_line(error)})") from None


def encode_prompt(text_encoders, input_ids):
    """(encoder_hidden_states, pooled embedding or None) of token ids, one tensor per encoder: SD's last hidden state
    of its one encoder, or SDXL's two-encoder conditioning (`encode_prompt_sdxl`)."""
    if len(text_encoders) == 2:
        return encode_prompt_sdxl(text_encoders, input_ids)
    text_encoder = text_encoders[0]
    return text_encoder(input_ids[0].to(text_encoder.device), return_dict=False)[0], None


# --------------------------------------------------------------------------------------------------------------------
# Real datasets (SPEC §9): aspect-ratio buckets, loss masks
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Checkpoints are written under this prefix and renamed when complete; the name does not contain "checkpoint-N"
# at its start, so neither `latest` nor the diffusers-style `startswith("checkpoint")` listings ever see one.
PARTIAL_PREFIX = ".partial-"


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_resume_checkpoint(output_dir, value):
    """The checkpoint folder `--resume_from_checkpoint value` names, or None to start fresh.

    `latest` picks the newest complete checkpoint (None when there is none); a `checkpoint-N` name is looked up in
    `output_dir`, a path is used as given. A named checkpoint that does not exist is an InputError.
    """
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    for candidate in (value, os.path.join(output_dir, os.path.basename(os.path.normpath(value)))):
        if os.path.isdir(candidate) and CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(candidate))):
            return candidate
    raise InputError(
        f"--resume_from_checkpoint {value!r}: no such checkpoint (expected a checkpoint-N folder in {output_dir!r}"
        " or a path to one, or 'latest')"
    )


def checkpoint_step(path):
    return int(CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path))).group(1))


def save_checkpoint(accelerator, output_dir, step, total_limit=None):
    """Write `output_dir/checkpoint-{step}` atomically and return its path.

    Every rank calls this (accelerate's save_state runs on every rank). The state is written under a partial name,
    flushed to disk, and renamed by the main process; only then are old checkpoints beyond `total_limit` removed.
    A crash at any point leaves the previous checkpoints intact and no `checkpoint-N` that is incomplete.
    """
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    partial_path = os.path.join(output_dir, f"{PARTIAL_PREFIX}checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(partial_path)
        if os.path.exists(final_path):
            # Re-saving a step (e.g. after resuming from an older checkpoint): retire the old copy first.
            retired = os.path.join(output_dir, f"{PARTIAL_PREFIX}retired-checkpoint-{step}")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final_path, retired)
            os.replace(partial_path, final_path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(partial_path, final_path)
        _fsync_dir(output_dir)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final_path


def resume_from_checkpoint(accelerator, args, run_state):
    """Restore `args.resume_path` (resolved by validation from --resume_from_checkpoint) into the prepared objects
    and return the optimizer step to continue from; 0 for a new run, which `latest` without a checkpoint says."""
    if args.resume_path is None:
        if args.resume_from_checkpoint == "latest":
            _main_log(accelerator, f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}, "
                                   "starting a new run")
        return 0
    _main_log(accelerator, f"Resuming from {args.resume_path}")
    accelerator.load_state(args.resume_path)
    if args.seed is not None and args.seed != run_state.seed:
        _main_log(accelerator, f"--seed {args.seed} ignored: the checkpoint's run uses seed {run_state.seed}",
                  logging.WARNING)
    return checkpoint_step(args.resume_path)


class Checkpointer:
    """The checkpoint side of the training loop, identical in every script: `checkpoint-N` every
    `--checkpointing_steps`, and on a preemption request a checkpoint at the current step (unless one was just
    written) and the exit status to return. Every rank calls both methods after every optimizer step."""

    def __init__(self, accelerator, output_dir, checkpointing_steps, total_limit, preemption):
        self.accelerator, self.output_dir = accelerator, output_dir
        self.checkpointing_steps, self.total_limit, self.preemption = checkpointing_steps, total_limit, preemption
        self.last_step, self.last_path = None, None

    def save(self, step):
        self.last_path = save_checkpoint(self.accelerator, self.output_dir, step, self.total_limit)
        self.last_step = step
        _main_log(self.accelerator, f"Saved {self.last_path}")
        return self.last_path

    def save_if_due(self, step):
        if step % self.checkpointing_steps == 0:
            self.save(step)

    def stop_if_requested(self, step):
        """0 to go on; otherwise the exit status (143 or 130), after the checkpoint of `step` is on disk."""
        status = self.preemption.stop_requested()
        if status:
            if self.last_step != step:
                self.save(step)
            self.accelerator.print(
                f"Stopped at step {step}: checkpoint saved to {self.last_path}. "
                "Continue with --resume_from_checkpoint latest."
            )
        return status


def _main_log(accelerator, message, level=logging.INFO):
    if accelerator.is_main_process:
        logger.log(level, message)


def rotate_checkpoints(output_dir, total_limit):
    """Keep the newest `total_limit` complete checkpoints; remove older ones and leftovers of interrupted writes."""
    for name in os.listdir(output_dir):
        if name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if not total_limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        logger.info(f"Removing old checkpoint {path} (--checkpoints_total_limit={total_limit})")
        shutil.rmtree(path)


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_dir(root)


def _fsync_dir(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------------------------------------------------
# Feature cache (--cache_latents, --cache_text_embeddings)
# --------------------------------------------------------------------------------------------------------------------

# Bump when what an entry holds changes: old entries then live in another folder and are never read.
FEATURE_CACHE_FORMAT = 1


def default_feature_cache_dir():
    return os.environ.get("DIFFUSION_TRAINING_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "diffusion-training"
    )


def fingerprint(*parts):
    """A short hex digest of JSON-able `parts` (strings, numbers, lists, dicts)."""
    import hashlib
    import json

    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def model_fingerprint(model):
    """A digest of a model's config and every weight, so that a cache made with other weights is never read. Costs
    one pass over the weights (about 0.5 s for Stable Diffusion's VAE)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})  # transformers / diffusers
    digest.update(fingerprint(type(model).__name__, config).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_fingerprint(cell):
    """A digest of one image as a datasets image cell with decode=False ({"bytes", "path"}): the bytes when they are
    held in the dataset, otherwise the file's path, size and modification time, so that an edited image gets a new
    entry without every file being read at each start."""
    if cell.get("bytes"):
        import hashlib

        return hashlib.blake2b(cell["bytes"], digest_size=16).hexdigest()
    path = os.path.abspath(cell["path"])
    info = os.stat(path)
    return fingerprint("file", path, info.st_size, info.st_mtime_ns)


class FeatureCache:
    """Tensors computed by a frozen model once per distinct input (an image's latent distribution, a caption's text
    embedding) and kept on disk, one small safetensors file per input.

    The folder is named by a digest of `settings` (the model's fingerprint, dtype, resolution, transforms, ...), the
    file by a digest of the input itself, so a change to either is a cache miss, never a stale hit; unchanged inputs
    keep their entries across runs, resumed runs and output folders. Entries are written under a temporary name and
    renamed, so an interrupted fill leaves no partial file. Deleting the folder is always safe.
    """

    def __init__(self, root, kind, settings):
        self.folder = os.path.join(root, kind, fingerprint(FEATURE_CACHE_FORMAT, settings))
        self.kind, self.settings = kind, settings

    def path(self, key):
        return os.path.join(self.folder, key[:2], f"{key}.safetensors")

    def load(self, key):
        from safetensors.torch import load_file

        return load_file(self.path(key))

    def missing(self, keys):
        return [key for key in dict.fromkeys(keys) if not os.path.isfile(self.path(key))]

    def fill(self, accelerator, inputs, encode, batch_size):
        """Make sure every key of `inputs` ({key: input}) has an entry. The missing ones are split across all ranks;
        `encode(list of inputs)` returns one {name: tensor} per input. Call on every rank."""
        # Every rank must see the same missing list before any of them writes, or the split would differ: one
        # barrier so that earlier writes are done, one so that no rank writes while another is still listing.
        accelerator.wait_for_everyone()
        missing = self.missing(inputs)
        accelerator.wait_for_everyone()
        _main_log(accelerator, f"{self.kind}: {len(inputs) - len(missing)} of {len(inputs)} cached in {self.folder}; "
                               f"computing {len(missing)}")
        if accelerator.is_main_process:
            self._write_settings()
        self._compute(missing[accelerator.process_index::accelerator.num_processes], inputs, encode, batch_size)
        accelerator.wait_for_everyone()
        # Ranks on nodes that do not share this folder compute what the other nodes wrote elsewhere.
        self._compute(self.missing(missing), inputs, encode, batch_size)

    def _compute(self, keys, inputs, encode, batch_size):
        from safetensors.torch import save_file

        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            with torch.no_grad():
                outputs = encode([inputs[key] for key in chunk])
            for key, tensors in zip(chunk, outputs):
                path = self.path(key)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                partial = f"{path}.{os.getpid()}.partial"
                save_file({name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}, partial)
                os.replace(partial, path)

    def _write_settings(self):
        import json

        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, "settings.json")
        if not os.path.isfile(path):
            with open(f"{path}.{os.getpid()}.partial", "w") as file:
                json.dump({"kind": self.kind, "format": FEATURE_CACHE_FORMAT, **self.settings}, file, indent=1,
                          default=str)
            os.replace(f"{path}.{os.getpid()}.partial", path)


def free_memory():
    """Give back the memory of models the caller just dropped (frozen models a cache made unnecessary)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# Distributed engines
# --------------------------------------------------------------------------------------------------------------------


def adopt_engine_settings(accelerator, train_batch_size, max_grad_norm, supports_zero3=False):
    """Under DeepSpeed, give its config what the command line says; refuse FSDP; a no-op otherwise. Call right after
    creating the Accelerator, before `prepare`.

    DeepSpeed owns gradient accumulation (accelerate fills it from `--gradient_accumulation_steps`) and clipping
    (`accelerator.clip_grad_norm_` does nothing under it), so its `auto` clipping becomes `--max_grad_norm` and its
    `auto` batch sizes become `--train_batch_size` per process. Without an accelerator device (CPU runs, as in the
    tests) accelerate counts one process of rank 0 on every rank although DeepSpeed started a group of several; the
    real rank and world size are restored so that data sharding and main-process-only writes stay correct.
    ZeRO-3 is refused unless the script `supports_zero3` (gathers its sharded weights with `whole_model` wherever it
    saves or validates them).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # accelerate runs FSDP only on GPUs, which this project has not had to build and test it on, and the scripts
        # read whole weights (saving, validation, EMA) that FSDP keeps sharded between steps.
        zero3 = ", or configs/launch/deepspeed_zero3.yaml to shard the weights too" if supports_zero3 else ""
        raise InputError(f"PyTorch FSDP is not supported yet; use configs/launch/deepspeed_zero2.yaml{zero3}")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    if plugin.zero_stage == 3:
        if not supports_zero3:
            # LoRA layers and new token embeddings are a few trained weights inside a frozen model that ZeRO-3 would
            # shard with them, and their saving reads them on the main process alone: refuse rather than save shards.
            raise InputError(
                "DeepSpeed ZeRO-3 is not supported by this script (it trains a few weights inside a frozen model, "
                "which ZeRO-3 would shard with them); use configs/launch/deepspeed_zero2.yaml or "
                "configs/launch/deepspeed_zero2_offload.yaml (optimizer states in CPU memory)"
            )
        # diffusers' EMAModel.step gathers ZeRO-3 parameters through a module-level `deepspeed` that
        # diffusers.training_utils imports only if ZeRO-3 was configured before it was first imported (it was not:
        # NameError at the first EMA step).
        import deepspeed
        import diffusers.training_utils

        diffusers.training_utils.deepspeed = deepspeed
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != accelerator.num_processes:
        from accelerate import PartialState

        rank = torch.distributed.get_rank()
        # Both shared states: AcceleratorState holds a copy of PartialState's values.
        for state in (PartialState(), accelerator.state):
            state.num_processes = torch.distributed.get_world_size()
            state.process_index = rank
            state.local_process_index = int(os.environ.get("LOCAL_RANK", rank))
    config = plugin.deepspeed_config
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = train_batch_size
    if config.get("train_batch_size") == "auto":
        # DeepSpeed derives it from micro batch x accumulation x world size.
        del config["train_batch_size"]


def whole_model(accelerator, model):
    """The trained (prepared) `model` with all of its weights in one module, for saving and validation.

    Under DeepSpeed ZeRO-3 each rank holds only a shard of every weight, so every rank must call this together: each
    gets a full fp32 copy, assembled from the optimizer's fp32 shards (fp16/bf16 training still saves full precision)
    and usable without collectives (ranks may then render different numbers of validation images). Otherwise the
    unwrapped model itself, at no cost."""
    unwrapped = accelerator.unwrap_model(model)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return unwrapped
    from deepspeed.utils import safe_get_full_fp32_param

    parameters = dict(unwrapped.named_parameters())
    state_dict = {
        name: (safe_get_full_fp32_param(parameters[name]) if name in parameters else value).detach().cpu()
        for name, value in unwrapped.state_dict().items()
    }
    copy = type(unwrapped).from_config(unwrapped.config)
    copy.load_state_dict(state_dict)
    return copy.to(accelerator.device).train(unwrapped.training)


@contextlib.contextmanager
def frozen_models_outside_zero3():
    """Load the frozen models (VAE, text encoder, a UNet that is not trained) whole under DeepSpeed ZeRO-3: only the
    model DeepSpeed prepares may be partitioned, and a partitioned frozen model cannot run its own forward.

    accelerate's `zero3_init_context_manager(enable=False)` is not enough: it re-registers a stage-3 config with
    transformers, whose `from_pretrained` then partitions the model anyway. So the config is taken away while the
    frozen models load, and registered again afterwards for the trained model."""
    import accelerate
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin if accelerate.state.is_initialized() else None
    if plugin is None or not plugin.is_zero3_init_enabled():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    with plugin.zero3_init_context_manager(enable=False):
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()


class PreemptionHandler:
    """Turns SIGTERM, SIGUSR1 and SIGINT into a request to stop at the next optimizer-step boundary.

    `stop_requested()` is called by every rank after every optimizer step and returns the same answer on
    all of them (the exit status to use, or 0), so that all ranks save the same checkpoint and stop together even
    when the signal reached only one of them. A second SIGINT interrupts at once.
    """

    EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGUSR1: 143, signal.SIGINT: 130}

    def __init__(self, accelerator):
        self.requested = 0
        self._group = None
        if accelerator.num_processes > 1:
            # A CPU (gloo) group: agreeing on the flag never waits for the GPU to finish its queued work.
            self._group = torch.distributed.new_group(backend="gloo")
        for signum in self.EXIT_STATUS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = max(self.requested, self.EXIT_STATUS[signum])
        print(
            f"Received {signal.Signals(signum).name}: stopping after the current optimizer step"
            " and saving a checkpoint.",
            file=sys.stderr,
            flush=True,
        )

    def stop_requested(self):
        if self._group is None:
            return self.requested
        flag = torch.tensor([self.requested], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag.item())
