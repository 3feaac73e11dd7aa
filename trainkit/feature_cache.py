"""The feature cache (`--cache_latents`, `--cache_text_embeddings`): tensors a frozen model computes once per input,
kept on disk and keyed so that a change of data, model or transforms is a miss (SPEC §8).
"""

import gc
import os

import torch

from trainkit.checkpointing import _main_log

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


# What a model loaded through the family loaders remembers of where its weights came from (see `remember_source`).
SOURCE_ATTRIBUTE = "_feature_cache_source"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".index.json")


def remember_source(model, folder, variant=None):
    """Note the folder `model`'s weights were just loaded from (and which `variant` of them), so that
    `model_fingerprint` can key the cache on the weight files instead of reading every weight. Only for a model used
    as loaded (frozen)."""
    if folder and os.path.isdir(folder):
        setattr(model, SOURCE_ATTRIBUTE, (os.path.abspath(folder), variant))
    return model


def model_fingerprint(model):
    """A digest that changes whenever the model's weights do, so that a cache made with other weights is never read.

    A model loaded through the family loaders (which `remember_source`) is keyed on its config, its parameters' dtypes
    and the identity of its weight files (resolved path, size, modification time: a hub snapshot's files resolve to
    blobs named by their content hash), without reading the weights: starting a run costs nothing even for a 9.5 GB
    T5. Any other model is keyed on every weight (one pass over them, about 0.5 s for Stable Diffusion's VAE)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})  # transformers / diffusers
    digest.update(fingerprint(type(model).__name__, config).encode())
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    if source is not None:
        folder, variant = source
        files = []
        for name in sorted(os.listdir(folder)):
            if name.endswith(WEIGHT_SUFFIXES):
                info = os.stat(os.path.join(folder, name))
                files.append((name, os.path.realpath(os.path.join(folder, name)), info.st_size, info.st_mtime_ns))
        dtypes = sorted({str(parameter.dtype) for parameter in model.parameters()})
        digest.update(fingerprint("files", variant, files, dtypes).encode())
        return digest.hexdigest()
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
