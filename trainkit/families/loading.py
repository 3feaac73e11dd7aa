"""What every family does the same way with a pipeline folder: read its model_index.json, check that the parts a
family needs are there (before anything loads), and load one part with a one-line error naming it."""

import json
import os

import torch

from trainkit.cli import InputError, check_local_or_hub_id, first_line
from trainkit.feature_cache import remember_source


def read_model_index(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """The pipeline's model_index.json as a dict: read from a local folder, fetched for a hub id ({} where there is
    none, or where the path does not exist: the caller's folder check reports that). A hub id that cannot be
    reached is an InputError."""
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


def read_part_config(path, part):
    """A local folder's `part/config.json` as a dict ({} when it is missing or broken: the folder check or the model
    loading reports that)."""
    try:
        with open(os.path.join(path, part, "config.json")) as file:
            config = json.load(file)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_parts(path, parts, described):
    """`--pretrained_model_name_or_path`: a path must exist, and a local pipeline folder must hold every part
    (`unet/`, `vae/`, ...) the script loads; a hub id is checked when loaded."""
    check_local_or_hub_id("--pretrained_model_name_or_path", path)
    if os.path.isdir(path):
        missing = [part for part in parts if not os.path.isdir(os.path.join(path, part))]
        if missing:
            raise InputError(f"--pretrained_model_name_or_path {path!r} is not {described} pipeline folder "
                             f"(missing {', '.join(f'{part}/' for part in missing)})")


def load_part(args, part, from_pretrained, **kwargs):
    """`from_pretrained(--pretrained_model_name_or_path, subfolder=part, revision=--revision, ...)`; a load error is
    an InputError naming the part. Pass `variant=args.variant` for weights, `torch_dtype=` to load frozen weights
    directly in the training dtype."""
    source = args.pretrained_model_name_or_path
    kwargs = {"revision": args.revision, "cache_dir": getattr(args, "cache_dir", None), **kwargs}
    try:
        loaded = from_pretrained(source, subfolder=part, **kwargs)
    except Exception as error:
        raise InputError(f"--pretrained_model_name_or_path {source!r}: cannot load {part}/ "
                         f"({first_line(error)})") from None
    if isinstance(loaded, torch.nn.Module):
        folder = weights_folder(source, part, kwargs["revision"], kwargs["cache_dir"])
        remember_source(loaded, folder, kwargs.get("variant"))
    return loaded


def load_denoiser(args):
    """The family's frozen denoiser (`args.family.denoiser_part`: unet/, transformer/), loaded straight in the
    training dtype (never a whole fp32 copy in host memory: 48 GB for a 12B transformer); with
    --bnb_quantization_config_path, then quantized by bitsandbytes onto the training device (big_models.quantize),
    so that LoRA trains on a 4- or 8-bit frozen base."""
    from trainkit import big_models

    family, dtype = args.family, big_models.training_dtype(args)
    denoiser = load_part(args, family.denoiser_part, family.denoiser_class().from_pretrained, variant=args.variant,
                         torch_dtype=dtype)
    config = getattr(args, "bnb_config", None)
    if config is None:
        return denoiser
    from accelerate import PartialState

    return big_models.quantize(denoiser, config, dtype, PartialState().device)


def weights_folder(source, subfolder=None, revision=None, cache_dir=None):
    """The local folder a model's files were just loaded from: the folder itself, or the hub cache's snapshot of that
    revision (None when it cannot be found; the feature cache then reads the weights to key them)."""
    if os.path.isdir(source):
        return os.path.join(source, subfolder) if subfolder else source
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    try:
        cached = try_to_load_from_cache(source, filename, cache_dir=cache_dir, revision=revision)
    except Exception:  # an id that is not a repository name: the model loaded from elsewhere
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def load_vae(args, **kwargs):
    """The base pipeline's vae/, or the VAE folder or hub id --pretrained_vae_model_name_or_path names (its own
    repository: the base model's --revision and --variant do not apply to it). A load error is an InputError."""
    from diffusers import AutoencoderKL

    custom = getattr(args, "pretrained_vae_model_name_or_path", None)
    cache_dir = getattr(args, "cache_dir", None)
    if custom:
        flag, source, part = "--pretrained_vae_model_name_or_path", custom, "the VAE"
    else:
        flag, source, part = "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "vae/"
        kwargs = {"subfolder": "vae", "revision": args.revision, "variant": args.variant, **kwargs}
    try:
        vae = AutoencoderKL.from_pretrained(source, cache_dir=cache_dir, **kwargs)
    except Exception as error:
        raise InputError(f"{flag} {source!r}: cannot load {part} ({first_line(error)})") from None
    folder = weights_folder(source, kwargs.get("subfolder"), kwargs.get("revision"), cache_dir)
    return remember_source(vae, folder, kwargs.get("variant"))


def has_part(path, part):
    """Whether a local pipeline folder has `part/` (False for a hub id)."""
    return os.path.isdir(os.path.join(path, part))
