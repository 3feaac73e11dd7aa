"""The command line's shared rules: one-line errors (`InputError`, `ArgumentParser`, `run_main`), `--config FILE.yaml`,
and the checks every script applies to paths, packages and image folders (SPEC §7).
"""

import argparse
import gc
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)


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
