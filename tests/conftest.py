"""Fixtures: tiny models and datasets built locally (no network), shared by the test modules."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, write_json

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "demo"))


def pytest_configure(config):
    """Before any test (in the controller, not in xdist workers): remove a stale build lock of torch's extension
    cache. DeepSpeed compiles a small op on its first CPU run under that lock; a run killed mid-build leaves the lock
    behind, and every later DeepSpeed launch would then wait on it forever."""
    import glob
    import time

    if hasattr(config, "workerinput"):
        return
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    for lock in glob.glob(os.path.join(root, "*", "*", "lock")) + glob.glob(os.path.join(root, "*", "lock")):
        if time.time() - os.path.getmtime(lock) > 15 * 60:  # a real build of that op takes about a minute
            os.remove(lock)



@pytest.fixture(autouse=True)
def no_accelerate_state_between_tests():
    """accelerate keeps its process-wide state (PartialState, AcceleratorState) for the life of a test worker. An
    in-process test that loads a model the way a script does (onto PartialState().device) leaves it behind, and every
    later in-process error case in that worker would then look as if its script had created an Accelerator
    (helpers.fail_in_process asserts it did not): each test starts and ends without it."""
    yield
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)

@pytest.fixture(scope="session")
def tiny_unet_config(tmp_path_factory):
    """A 2-level UNet2DModel config at 16 px: milliseconds per step on CPU, attention included."""
    folder = tmp_path_factory.mktemp("unet_config")
    return write_json(
        os.path.join(folder, "config.json"),
        {
            "_class_name": "UNet2DModel",
            "sample_size": 16,
            "in_channels": 3,
            "out_channels": 3,
            "layers_per_block": 1,
            "block_out_channels": [16, 32],
            "norm_num_groups": 8,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": 8,
        },
    )


def _shape_images(count, seed=0):
    from make_shapes import draw_shape
    import random

    rng = random.Random(seed)
    # Non-square sizes so that random cropping has something to choose.
    return [draw_shape(rng, 24).resize((24, 20 + index % 3)) for index in range(count)]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """7 readable images in nested folders and one corrupt file; 7 images at batch 2 = 4 batches per epoch."""
    folder = tmp_path_factory.mktemp("images")
    os.makedirs(folder / "sub")
    for index, image in enumerate(_shape_images(7)):
        image.save(folder / ("sub" if index % 2 else ".") / f"img_{index}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return str(folder)


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory):
    """A local dataset folder in parquet form with the image in a column called `pixels`."""
    import datasets

    folder = tmp_path_factory.mktemp("parquet_dataset")
    dataset = datasets.Dataset.from_dict(
        {"pixels": _shape_images(5, seed=1), "label": list(range(5))},
        features=datasets.Features({"pixels": datasets.Image(), "label": datasets.Value("int64")}),
    )
    os.makedirs(folder / "data")
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return str(folder)


@pytest.fixture(scope="session")
def sixteen_bit_image():
    """A 16-bit greyscale gradient that 8-bit conversion would collapse to at most 256 levels."""
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    return Image.fromarray(values)  # uint16 -> mode I;16


@pytest.fixture
def yaml_file(tmp_path):
    def write(values, name="config.yaml"):
        import yaml

        path = tmp_path / name
        path.write_text(yaml.safe_dump(values) if not isinstance(values, str) else values)
        return str(path)

    return write


def read_json(path):
    with open(path) as file:
        return json.load(file)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL base pipeline (tests/tiny_sd.build_tiny_sdxl), built once per test module."""
    from tiny_sd import build_tiny_sdxl

    return build_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    """A tiny random FLUX.1-dev pipeline (tests/tiny_sd.build_tiny_flux), built once per test module."""
    from tiny_sd import build_tiny_flux

    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="module")
def tiny_qwen_image(tmp_path_factory):
    """A tiny random Qwen-Image pipeline (tests/tiny_sd.build_tiny_qwen_image), built once per test module."""
    from tiny_sd import build_tiny_qwen_image

    return build_tiny_qwen_image(str(tmp_path_factory.mktemp("tiny_qwen_image")))


@pytest.fixture(scope="module")
def tiny_flux2(tmp_path_factory):
    """A tiny random FLUX.2 [dev] pipeline (tests/tiny_flux2.build_tiny_flux2), built once per test module."""
    from tiny_flux2 import build_tiny_flux2

    return build_tiny_flux2(str(tmp_path_factory.mktemp("tiny_flux2")))


@pytest.fixture(scope="module")
def tiny_flux2_klein(tmp_path_factory):
    """A tiny random FLUX.2 [klein] base pipeline (tests/tiny_flux2_klein.build_tiny_flux2_klein), built once per test
    module."""
    from tiny_flux2_klein import build_tiny_flux2_klein

    return build_tiny_flux2_klein(str(tmp_path_factory.mktemp("tiny_flux2_klein")))

@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """A tiny random SD3 pipeline whose two CLIPs differ in width (tests/tiny_sd3.build_tiny_sd3), once per module."""
    from tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def tiny_sd35(tmp_path_factory):
    """Its SD3.5 variant: qk_norm "rms_norm" and a dual-attention block (build_tiny_sd3(sd35=True))."""
    from tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd35")), sd35=True)

@pytest.fixture(scope="module")
def tiny_z_image(tmp_path_factory):
    """A tiny random Z-Image pipeline (tests/tiny_z_image.build_tiny_z_image), built once per test module."""
    from tiny_z_image import build_tiny_z_image

    return build_tiny_z_image(str(tmp_path_factory.mktemp("tiny_z_image")))


@pytest.fixture(scope="module")
def instance_images(tmp_path_factory):
    """3 non-square images (24 x 20..22) of the transformer families' tests: at batch 1, 3 batches per epoch."""
    folder = tmp_path_factory.mktemp("instance")
    for index, image in enumerate(_shape_images(3)):
        image.save(folder / f"dog_{index}.png")
    return str(folder)


@pytest.fixture(scope="module")
def other_vae(tiny_sdxl, tmp_path_factory):
    """A VAE folder (as --pretrained_vae_model_name_or_path takes it) with other weights than the pipeline's."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    folder = str(tmp_path_factory.mktemp("other_vae"))
    AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_sdxl, subfolder="vae")).save_pretrained(folder)
    return folder


# Mixed-aspect images for aspect-ratio buckets (SPEC §9), as (name, width, height): two landscape, two portrait, one
# square, and one smaller than the tests' 64 px resolution (generated buckets must not upscale it).
MIXED_ASPECT_IMAGES = (("land_0", 96, 64), ("land_1", 112, 72), ("port_0", 64, 96), ("port_1", 72, 104),
                       ("square_0", 80, 80), ("small_0", 40, 40))
# An explicit bucket list that sends each of those to its own shape: landscape, portrait, square.
MIXED_ASPECT_BUCKETS = "64,96;96,64;64,64"


def _mixed_aspect_image(index, width, height):
    from make_shapes import draw_shape
    import random

    return draw_shape(random.Random(100 + index), max(width, height)).resize((width, height))


@pytest.fixture(scope="session")
def mixed_aspect_folder(tmp_path_factory):
    """A folder of landscape, portrait, square and small images with `name.txt` captions and a loss mask for each:
    `name.mask.png` (white left half) beside every image except square_0.png, whose mask is its own alpha channel
    (a transparent top half)."""
    folder = tmp_path_factory.mktemp("mixed_aspect")
    for index, (name, width, height) in enumerate(MIXED_ASPECT_IMAGES):
        image = _mixed_aspect_image(index, width, height)
        if name == "square_0":
            alpha = Image.new("L", (width, height), 255)
            alpha.paste(0, (0, 0, width, height // 2))
            image = image.convert("RGBA")
            image.putalpha(alpha)
        else:
            mask = Image.new("L", (width, height), 0)
            mask.paste(255, (0, 0, width // 2, height))
            mask.save(folder / f"{name}.mask.png")
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {'wide' if width > height else 'tall' if height > width else 'square'} "
                                            f"shape number {index}\n")
    return str(folder)
