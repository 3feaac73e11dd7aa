"""train_instruct_pix2pix.py: launched as users launch it, plus in-process checks of the widened UNet, the paired
image preprocessing, conditioning dropout and the loss."""

import json
import os
import random
import shutil
import signal
from argparse import Namespace

import pytest
import torch
from conftest import MIXED_ASPECT_BUCKETS, MIXED_ASPECT_IMAGES
from PIL import Image, ImageDraw, ImageOps

from trainkit.families import FAMILIES

from helpers import (
    assert_different_weights,
    assert_one_line_error,
    assert_same_weights,
    checkpoints,
    launch,
    load_weights,
    run_python,
    send_signal_and_wait,
    snapshot,
    start_python,
    train,
    wait_for_path,
)

SCRIPT = "train_instruct_pix2pix.py"
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
COLUMNS = "columns: input_image, edited_image, edit_prompt"
SD = FAMILIES["sd"]


def edit_example(rng, width, height=None):
    """A circle of one colour and the same circle recoloured, with the instruction that turns one into the other."""
    height = height or width
    before, after = rng.sample(sorted(COLORS), 2)
    radius = rng.randint(min(width, height) // 5, min(width, height) // 3)
    x, y = rng.randint(radius, width - radius), rng.randint(radius, height - radius)
    images = []
    for colour in (before, after):
        image = Image.new("RGB", (width, height), (240, 240, 235))
        ImageDraw.Draw(image).ellipse((x - radius, y - radius, x + radius, y + radius), fill=COLORS[colour])
        images.append(image)
    return images[0], images[1], f"make it {after}"


def write_parquet_dataset(folder, count, seed, size=(28, 24)):
    """A local dataset folder in parquet form with upstream's column names."""
    import datasets

    examples = [edit_example(random.Random(seed * 1000 + i), *size) for i in range(count)]
    dataset = datasets.Dataset.from_dict(
        {"input_image": [e[0] for e in examples], "edited_image": [e[1] for e in examples],
         "edit_prompt": [e[2] for e in examples]},
        features=datasets.Features({"input_image": datasets.Image(), "edited_image": datasets.Image(),
                                    "edit_prompt": datasets.Value("string")}),
    )
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    dataset.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory):
    """An imagefolder whose metadata.jsonl names both images (`*_file_name`) and the instruction: 7 good examples and
    one whose original image is corrupt. 7 examples at batch 2 = 4 batches per epoch; at batch 1, 7."""
    folder = tmp_path_factory.mktemp("pairs_folder")
    rows = []
    for index in range(7):
        original, edited, prompt = edit_example(random.Random(index), 24)
        original.save(folder / f"original_{index}.png")
        edited.save(folder / f"edited_{index}.png")
        rows.append({"input_image_file_name": f"original_{index}.png", "edited_image_file_name": f"edited_{index}.png",
                     "edit_prompt": prompt})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.append({"input_image_file_name": "corrupt.png", "edited_image_file_name": "edited_0.png",
                 "edit_prompt": "make it red"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


@pytest.fixture(scope="module")
def pairs_parquet(tmp_path_factory):
    """A local dataset folder (parquet) of 6 non-square examples: random crops have something to choose."""
    return write_parquet_dataset(str(tmp_path_factory.mktemp("pairs_parquet")), 6, seed=7)


@pytest.fixture(scope="module")
def mixed_aspect_pairs(mixed_aspect_folder, tmp_path_factory):
    """An imagefolder of 6 edit pairs made from conftest's mixed-aspect images: each image as the original, its
    colours inverted as the edited image (same size), the image's mask beside the edited image
    (`edited_<name>.mask.png`, white left half; square_0's mask is the edited image's own alpha channel, a transparent
    top half), and the caption as the edit prompt. MIXED_ASPECT_BUCKETS sends them to 3 buckets of 2 pairs each."""
    folder = tmp_path_factory.mktemp("mixed_aspect_pairs")
    rows = []
    for name, _, _ in MIXED_ASPECT_IMAGES:
        image = Image.open(os.path.join(mixed_aspect_folder, f"{name}.png"))
        image.convert("RGB").save(folder / f"original_{name}.png")
        edited = ImageOps.invert(image.convert("RGB"))
        if image.mode == "RGBA":
            edited.putalpha(image.getchannel("A"))
        edited.save(folder / f"edited_{name}.png")
        mask = os.path.join(mixed_aspect_folder, f"{name}.mask.png")
        if os.path.isfile(mask):
            shutil.copy(mask, folder / f"edited_{name}.mask.png")
        with open(os.path.join(mixed_aspect_folder, f"{name}.txt")) as file:
            rows.append({"input_image_file_name": f"original_{name}.png",
                         "edited_image_file_name": f"edited_{name}.png", "edit_prompt": file.read().strip()})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


@pytest.fixture(scope="module")
def validation_image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("validation") / "to_edit.png")
    edit_example(random.Random(100), 32)[0].save(path)
    return path


def base_args(model, output_dir, data=None, parquet=None, **overrides):
    """Tiny, fast settings: 64 px (8x8 latents), batch 2, validation with 2 denoising steps."""
    args = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "dataset_name": parquet,
        "resolution": 64,
        "output_dir": output_dir,
        "train_batch_size": 2,
        "num_train_epochs": 1,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "validation_inference_steps": 2,
        "seed": 0,
        "logging_steps": 1,
    }
    args.update(overrides)
    flags = []
    for key, value in args.items():
        if value is True:
            flags.append(f"--{key}")
        elif value is not None and value is not False:
            flags += [f"--{key}", str(value)]
    return flags


def run_seed(checkpoint):
    """The run seed a checkpoint stores (RunState, registered for checkpointing)."""
    return torch.load(os.path.join(checkpoint, "custom_checkpoint_0.pkl"), weights_only=False)["seed"]


# --------------------------------------------------------------------------------------------------------------------
# Launched runs
# --------------------------------------------------------------------------------------------------------------------


def test_trains_an_editing_pipeline_with_checkpoints_and_validation(tiny_sd, pairs_folder, validation_image,
                                                                    tmp_path, yaml_file):
    """Every training flag family on (EMA offloaded with foreach, Min-SNR, offset noise, conditioning dropout,
    gradient checkpointing, 8-bit Adam, scale_lr, a cosine schedule; most given in a YAML file): the output is an
    InstructPix2Pix pipeline that edits images, checkpoints load by themselves, validation images are written."""
    config = yaml_file({
        "snr_gamma": 5.0, "noise_offset": 0.1, "conditioning_dropout_prob": 0.1, "gradient_checkpointing": True,
        "use_8bit_adam": True, "offload_ema": True, "foreach_ema": True, "scale_lr": True, "lr_scheduler": "cosine",
        "allow_tf32": True,
    })
    out = str(tmp_path / "out")
    result = launch(SCRIPT, ["--config", config] + base_args(
        tiny_sd, out, data=pairs_folder, use_ema=True, max_train_steps=6, checkpointing_steps=3, random_flip=True,
        val_image_url=validation_image, validation_prompt="make it green", num_validation_images=2))

    # The corrupt original is skipped by name; the 7 good pairs make 4 batches of 2 per epoch.
    assert "Skipping unreadable image" in result.stderr and "corrupt.png" in result.stderr
    assert "7 examples, 2 epochs of 4 steps" in result.stderr
    assert checkpoints(out) == {"checkpoint-3", "checkpoint-6"}

    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    # The output folder is an InstructPix2Pix pipeline that loads and edits an image.
    with open(os.path.join(out, "model_index.json")) as file:
        assert json.load(file)["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    pipeline = StableDiffusionInstructPix2PixPipeline.from_pretrained(out)
    assert pipeline.unet.config.in_channels == 8
    to_edit = Image.open(validation_image).resize((64, 64))
    edited = pipeline("make it green", image=to_edit, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images[0]
    assert edited.shape == (64, 64, 3)

    # Training used the original image: the new input channels, zero at the start, have learnt something.
    raw = load_weights(os.path.join(out, "unet_raw"))
    assert raw["conv_in.weight"].shape[1] == 8 and torch.count_nonzero(raw["conv_in.weight"][:, 4:]) > 0
    # EMA: the pipeline holds the EMA weights, unet_raw/ the trained ones; the last checkpoint agrees.
    checkpoint = os.path.join(out, "checkpoint-6")
    assert_different_weights(os.path.join(out, "unet"), os.path.join(out, "unet_raw"))
    assert_same_weights(os.path.join(checkpoint, "unet_ema"), os.path.join(out, "unet"))
    assert_same_weights(os.path.join(checkpoint, "unet"), os.path.join(out, "unet_raw"))
    # The frozen parts are saved as loaded (fp32), not in a training dtype.
    assert all(t.dtype == torch.float32 for t in load_weights(os.path.join(out, "vae")).values())

    # checkpoint-N/unet is usable by itself with the base model's other parts.
    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    base = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_sd, unet=unet)
    assert base("make it red", image=to_edit, num_inference_steps=2, output_type="np").images[0].shape == (64, 64, 3)

    # Validation after each epoch and from the saved pipeline, on disk and in TensorBoard.
    for name in ("epoch_0000", "epoch_0001", "final"):
        assert sorted(os.listdir(os.path.join(out, "validation", name))) == ["00.png", "01.png", "original.png"], name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs", "instruct-pix2pix"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2, 3, 4, 5, 6]
    assert len(events.Images("validation")) >= 2 and events.Images("test")

    with open(os.path.join(out, "README.md")) as file:
        card = file.read()
    assert "instruct-pix2pix" in card and "make it green" in card and "val_imgs_grid.png" in card
    assert os.path.isfile(os.path.join(out, "val_imgs_grid.png"))


def test_exact_resume_without_seed_and_rotation(tiny_sd, pairs_parquet, tmp_path):
    """GA 1, EMA, random crops and flips, conditioning dropout, a random subset and no --seed: 4 steps + resume latest
    to 8 == 8 steps straight with the seed the first run drew, bit for bit (5 samples at batch 2 = 3 steps per epoch,
    so checkpoint-4 is mid-epoch). Rotation keeps the newest 2 checkpoints before and after resume. (Resuming at
    --max_train_steps is shown by test_unconditional's kill test.)"""
    settings = {"use_ema": True, "random_flip": True, "conditioning_dropout_prob": 0.3, "max_train_samples": 5,
                "checkpointing_steps": 2, "checkpoints_total_limit": 2, "lr_scheduler": "constant_with_warmup",
                "lr_warmup_steps": 3, "snr_gamma": 5.0}
    resumed = str(tmp_path / "resumed")
    first = train(SCRIPT, base_args(tiny_sd, resumed, parquet=pairs_parquet, seed=None, max_train_steps=4,
                                    resume_from_checkpoint="latest", **settings))
    assert "no checkpoint" in first.stderr and "starting a new run" in first.stderr
    assert checkpoints(resumed) == {"checkpoint-2", "checkpoint-4"}
    seed = run_seed(os.path.join(resumed, "checkpoint-4"))
    second = train(SCRIPT, base_args(tiny_sd, resumed, parquet=pairs_parquet, seed=None, max_train_steps=8,
                                     resume_from_checkpoint="latest", **settings))
    assert f"Resuming from {os.path.join(resumed, 'checkpoint-4')}" in second.stderr
    assert checkpoints(resumed) == {"checkpoint-6", "checkpoint-8"}

    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(tiny_sd, straight, parquet=pairs_parquet, seed=seed, max_train_steps=8, **settings))
    for folder in ("checkpoint-8/unet", "checkpoint-8/unet_ema", "unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))
    assert_different_weights(os.path.join(straight, "checkpoint-6", "unet"), os.path.join(straight, "unet_raw"))



def test_sigterm_with_accumulation_saves_and_latest_resumes_exactly(tiny_sd, pairs_folder, tmp_path):
    """GA 2 and EMA: SIGTERM -> checkpoint at the stop step, exit 143, no final pipeline; resume latest == straight."""
    settings = {"train_batch_size": 1, "gradient_accumulation_steps": 2, "use_ema": True, "random_flip": True,
                "conditioning_dropout_prob": 0.2, "max_train_steps": 16, "checkpointing_steps": 4,
                "lr_scheduler": "linear"}
    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, base_args(tiny_sd, interrupted, data=pairs_folder, **settings))
    wait_for_path(os.path.join(interrupted, "checkpoint-4"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)

    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(interrupted))
    assert 4 <= stop_step < 16, "the signal arrived after the run had finished: the test needs more steps"
    assert not os.path.exists(os.path.join(interrupted, "model_index.json"))

    train(SCRIPT, base_args(tiny_sd, interrupted, data=pairs_folder, resume_from_checkpoint="latest", **settings))
    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(tiny_sd, straight, data=pairs_folder, **settings))
    for folder in ("unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(interrupted, folder))


def test_two_processes(tiny_sd, pairs_parquet, validation_image, tmp_path):
    """CPU DDP over gloo: trains, splits the validation images across ranks, checkpoints, resumes exactly on 2
    processes and exits cleanly."""
    settings = {"train_batch_size": 1, "max_train_steps": 4, "checkpointing_steps": 2, "use_ema": True,
                "random_flip": True, "conditioning_dropout_prob": 0.2}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, straight, parquet=pairs_parquet, val_image_url=validation_image,
                                      validation_prompt="make it blue", num_validation_images=3,
                                      validation_epochs=10, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    # 6 samples, 1 per rank per batch: 3 steps per epoch.
    assert "6 examples, 2 epochs of 3 steps" in result.stderr
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {"random_states_0.pkl", "random_states_1.pkl"}
    assert sorted(os.listdir(os.path.join(straight, "validation", "final"))) == [
        "00.png", "01.png", "02.png", "original.png"]

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch(SCRIPT, base_args(tiny_sd, resumed, parquet=pairs_parquet, resume_from_checkpoint="checkpoint-2",
                                      **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    for folder in ("checkpoint-4/unet", "checkpoint-4/unet_ema", "unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))


def test_buckets_with_masked_loss_ema_and_accumulation_resume_exactly(tiny_sd, mixed_aspect_pairs, validation_image,
                                                                     tmp_path):
    """Aspect-ratio buckets (MIXED_ASPECT_BUCKETS: 3 buckets of 2 pairs, 3 batches of 2 per epoch, 2 steps at GA 2),
    --masked_loss from mask files and an alpha channel, random crops and flips, EMA, both dropouts: 5 steps straight
    == its checkpoint-3 (mid-epoch 1) resumed to 5, bit for bit. The pipeline loads and edits a 64x96 image;
    validation renders at --validation_height x --validation_width; the model card names the buckets."""
    settings = {"aspect_ratio_buckets": MIXED_ASPECT_BUCKETS, "masked_loss": True, "random_flip": True,
                "use_ema": True, "gradient_accumulation_steps": 2, "conditioning_dropout_prob": 0.2,
                "proportion_empty_prompts": 0.3, "max_train_steps": 5, "checkpointing_steps": 3}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, straight, data=mixed_aspect_pairs, val_image_url=validation_image,
                                      validation_prompt="make it green", num_validation_images=1,
                                      validation_epochs=100, validation_height=64, validation_width=96, **settings))
    assert "6 examples, 3 epochs of 2 steps" in result.stderr
    assert checkpoints(straight) == {"checkpoint-3"}
    assert Image.open(os.path.join(straight, "validation", "final", "00.png")).size == (96, 64)
    with open(os.path.join(straight, "README.md")) as file:
        card = file.read()
    assert "64,64;64,96;96,64" in card and "masked loss | on" in card

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(straight, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    train(SCRIPT, base_args(tiny_sd, resumed, data=mixed_aspect_pairs, resume_from_checkpoint="latest", **settings))
    for folder in ("unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))
    assert_different_weights(os.path.join(straight, "unet_raw"), os.path.join(straight, "checkpoint-3", "unet"))

    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipeline = StableDiffusionInstructPix2PixPipeline.from_pretrained(straight)
    wide = Image.open(validation_image).convert("RGB").resize((96, 64))
    edited = pipeline("make it green", image=wide, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images[0]
    assert edited.shape == (64, 96, 3)


def _cache_entries(cache_dir, kind):
    """{entry path: mtime} of one kind of feature-cache entry."""
    entries = {}
    for root, _, files in os.walk(os.path.join(cache_dir, kind)):
        for name in files:
            if name.endswith(".safetensors"):
                entries[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
    return entries


def test_feature_cache_matches_fresh_encodings_is_reused_and_resumes_exactly(tiny_sd, pairs_folder,
                                                                             validation_image, tmp_path):
    """--cache_latents --cache_text_embeddings with --random_flip and conditioning dropout (the empty prompt's
    embedding comes from the cache too):
    - training on the cache equals training on fresh encodings within fp32 rounding (the VAE and text encoder see
      other batch shapes when filling the cache, nothing else differs); validation reloads the dropped models;
    - a second run, resuming the first's checkpoint-2 in another output folder with 2 data loader workers,
      computes nothing, rewrites no entry and ends bit for bit like the first.
    (That an edited image recomputes its entry only is shown by test_text_to_image and test_common.)
    Latent entries are per image: 7 examples x (original, edited) = 14."""
    data = str(tmp_path / "data")
    shutil.copytree(pairs_folder, data)
    cache = str(tmp_path / "cache")
    settings = {"center_crop": True, "random_flip": True, "conditioning_dropout_prob": 0.3, "max_train_steps": 4,
                "checkpointing_steps": 2, "learning_rate": 1e-4}
    cached = {"cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": cache}
    with open(os.path.join(data, "metadata.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    prompts = {row["edit_prompt"] for row in rows if row["input_image_file_name"] != "corrupt.png"} | {""}

    fresh = str(tmp_path / "fresh")
    train(SCRIPT, base_args(tiny_sd, fresh, data=data, **settings))
    first = str(tmp_path / "first")
    result = launch(SCRIPT, base_args(tiny_sd, first, data=data, **settings, **cached, val_image_url=validation_image,
                                      validation_prompt="make it green", num_validation_images=1))
    assert "latents: 0 of 14 cached" in result.stderr and "computing 14" in result.stderr
    assert f"text_embeddings: 0 of {len(prompts)} cached" in result.stderr
    latents, texts = _cache_entries(cache, "latents"), _cache_entries(cache, "text_embeddings")
    assert len(latents) == 14 and len(texts) == len(prompts)
    # The VAE's output differs by ~1e-6 between a batch of 1 and a batch of several (the pixels are identical), and
    # Adam divides each gradient by its own running scale, so on the few weights whose gradient is near zero that
    # rounding becomes up to a few percent of one step (lr 1e-4): measured 4.8e-6 on 1 of 200k weights, 1e-9 on
    # average. A real mismatch (a wrong flip, the sample instead of the mode, another prompt) moves every weight.
    fresh_weights, cached_weights = load_weights(os.path.join(fresh, "unet")), load_weights(os.path.join(first, "unet"))
    for name, value in fresh_weights.items():
        torch.testing.assert_close(cached_weights[name], value, rtol=0, atol=2e-5)
    differences = torch.cat([(cached_weights[name] - value).abs().flatten() for name, value in fresh_weights.items()])
    assert differences.mean() < 1e-8 and (differences > 2e-6).sum() <= 10, differences.topk(10)
    assert_different_weights(os.path.join(first, "unet"), os.path.join(tiny_sd, "unet"))
    for name in ("epoch_0000", "final"):
        assert sorted(os.listdir(os.path.join(first, "validation", name))) == ["00.png", "original.png"], name

    second = str(tmp_path / "second")
    shutil.copytree(os.path.join(first, "checkpoint-2"), os.path.join(second, "checkpoint-2"))
    result = train(SCRIPT, base_args(tiny_sd, second, data=data, **settings, **cached, resume_from_checkpoint="latest",
                                     dataloader_num_workers=2))
    assert "latents: 14 of 14 cached" in result.stderr
    assert f"text_embeddings: {len(prompts)} of {len(prompts)} cached" in result.stderr
    assert _cache_entries(cache, "latents") == latents and _cache_entries(cache, "text_embeddings") == texts
    for folder in ("checkpoint-4/unet", "unet"):
        assert_same_weights(os.path.join(first, folder), os.path.join(second, folder))


def test_diffusers_docs_command_runs_unchanged(tiny_sd, tmp_path):
    """The diffusers docs' command line. `fusing/instructpix2pix-1000-samples` is a local dataset folder of that name
    in the working directory (datasets looks there before the hub) and $MODEL_NAME the tiny model. On CPU, fp16 and
    xformers cannot run, so the run uses --mixed_precision=no (also for accelerate launch) without the xformers flag,
    --resolution=64 and --max_train_steps=2 to stay short; every other flag is as in the docs, and the output goes to
    the default --output_dir. With the xformers flag kept, the script must stop at once with one line saying that
    xformers is not installed, before loading anything or writing the output folder."""
    write_parquet_dataset(str(tmp_path / "fusing" / "instructpix2pix-1000-samples"), 8, seed=3, size=(64, 64))
    docs_flags = [
        f"--pretrained_model_name_or_path={tiny_sd}", "--dataset_name=fusing/instructpix2pix-1000-samples",
        "--resolution=64", "--random_flip", "--train_batch_size=4", "--gradient_accumulation_steps=4",
        "--gradient_checkpointing", "--max_train_steps=2", "--checkpointing_steps=5000", "--checkpoints_total_limit=1",
        "--learning_rate=5e-05", "--max_grad_norm=1", "--lr_warmup_steps=0", "--conditioning_dropout_prob=0.05",
        "--mixed_precision=no", "--seed=42", "--report_to=wandb",
    ]
    out = tmp_path / "instruct-pix2pix-model"

    xformers = run_python(SCRIPT, docs_flags + ["--enable_xformers_memory_efficient_attention"], cwd=str(tmp_path))
    assert xformers.returncode != 0 and "Traceback" not in xformers.stderr
    assert xformers.stderr.strip().splitlines() == [
        "error: --enable_xformers_memory_efficient_attention: xformers is not installed "
        "(pip install -r requirements-xformers.txt)"]
    assert not out.exists()

    result = launch(SCRIPT, docs_flags, cwd=str(tmp_path))
    # 8 examples at batch 4: 2 batches per epoch, accumulated into 1 optimizer step.
    assert "8 examples, 2 epochs of 1 steps, 2 steps in all, batch 4 per device, total batch 16" in result.stderr
    assert (out / "model_index.json").is_file() and checkpoints(str(out)) == set()
    assert load_weights(str(out / "unet"))["conv_in.weight"].shape[1] == 8
    assert (tmp_path / "wandb").is_dir()


# --------------------------------------------------------------------------------------------------------------------
# In-process: the widened UNet, paired preprocessing, conditioning dropout, the loss
# --------------------------------------------------------------------------------------------------------------------


def _script():
    import train_instruct_pix2pix

    return train_instruct_pix2pix


def test_conv_in_widened_with_zero_new_channels(tiny_sd):
    """conv_in takes 8 channels: the first 4 and the bias are the original's, the new 4 are zero, so the untrained
    model ignores the original image and predicts exactly what the base UNet predicts. An 8-channel UNet (training
    an InstructPix2Pix model further) is left as it is; other channel counts are refused."""
    from diffusers import UNet2DConditionModel

    from trainkit.cli import InputError

    script = _script()
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet = script.widen_conv_in(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"))
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8
    assert unet.conv_in.weight.shape == (base.conv_in.out_channels, 8, 3, 3)
    assert torch.equal(unet.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    assert torch.equal(unet.conv_in.bias, base.conv_in.bias)

    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=generator)
    original = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        widened = unet(torch.cat([noisy, original], dim=1), timesteps, text).sample
        plain = base(noisy, timesteps, text).sample
    assert torch.equal(widened, plain)

    weight = unet.conv_in.weight.clone()
    assert script.widen_conv_in(unet) is unet and torch.equal(unet.conv_in.weight, weight)
    unet.register_to_config(in_channels=9)
    with pytest.raises(InputError, match="9 input channels"):
        script.widen_conv_in(unet)


def _pairs_namespace(**values):
    defaults = {"original_image_column": "input_image", "edited_image_column": "edited_image",
                "edit_prompt_column": "edit_prompt", "resolution": 16, "center_crop": False, "random_flip": True,
                "max_train_samples": None, "dataset_name": None, "dataset_config_name": None, "cache_dir": None,
                "train_data_dir": None, "family": SD}
    defaults.update(values)
    return Namespace(**defaults)


def test_original_and_edited_images_get_the_same_crop_and_flip(tiny_sd):
    """The same image fed as original and edited comes out identical for every sample, with random crops and flips
    that differ between samples and repeat exactly for the same (seed, epoch, index)."""
    import datasets
    from transformers import CLIPTokenizer

    from trainkit.randomness import RunState

    script = _script()
    image = Image.effect_noise((48, 32), 60).convert("RGB")
    for seed in range(8):
        original, edited = script.preprocess_pair(image, image.copy(), 16,
                                                  *script.draw_augmentation(False, True,
                                                                            torch.Generator().manual_seed(seed)))
        assert original.shape == (3, 16, 16) and original.min() >= -1 and original.max() <= 1
        assert torch.equal(original, edited)
    # An edited image twice the size (same aspect ratio) gets the same relative crop and the same flip.
    big = image.resize((96, 64), Image.BICUBIC)
    for seed in range(4):
        original, edited = script.preprocess_pair(
            image, big, 16, *script.draw_augmentation(False, True, torch.Generator().manual_seed(seed)))
        assert (original - edited).abs().mean() < 0.1

    # Through the dataset, as training reads it: identical pairs, crops that change with the sample, repeatable.
    dataset = datasets.Dataset.from_dict(
        {"input_image": [image] * 3, "edited_image": [image] * 3, "edit_prompt": ["make it red"] * 3},
        features=datasets.Features({"input_image": datasets.Image(), "edited_image": datasets.Image(),
                                    "edit_prompt": datasets.Value("string")}))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    examples = script.EditExamples(dataset, [tokenizer], _pairs_namespace(), RunState(seed=5))
    crops = set()
    for epoch in range(4):
        for index in range(3):
            item = examples[(epoch, index)]
            assert torch.equal(item["original_pixel_values"], item["edited_pixel_values"])
            crops.add(item["original_pixel_values"].sum().item())
    assert len(crops) > 3, "random crops/flips never changed"
    assert torch.equal(examples[(2, 1)]["original_pixel_values"], examples[(2, 1)]["original_pixel_values"])
    assert tokenizer.decode(examples[(0, 0)]["input_ids"], skip_special_tokens=True) == "make it red"
    # Centre crop without flip: the same for every sample.
    centred = script.EditExamples(dataset, [tokenizer], _pairs_namespace(center_crop=True, random_flip=False),
                                  RunState(seed=5))
    assert len({centred[(epoch, 0)]["edited_pixel_values"].sum().item() for epoch in range(4)}) == 1


class _CpuAccelerator(Namespace):
    """What build_dataloader and FeatureCache.fill need of an Accelerator, for one process."""

    def __init__(self):
        super().__init__(device=torch.device("cpu"), is_main_process=True, process_index=0, num_processes=1)

    def wait_for_everyone(self):
        pass


def _bucket_args(model, data, output_dir, *extra):
    script = _script()
    args = script.parse_args([f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}",
                              f"--output_dir={output_dir}", "--resolution=64", *extra])
    script.validate_args(args)
    return args


BUCKET_OF = {"land": (64, 96), "port": (96, 64), "square": (64, 64), "small": (64, 64)}


def test_bucketed_pairs_share_their_bucket_crop_flip_and_mask_and_prompts_drop_at_their_rate(
        tiny_sd, mixed_aspect_pairs, tmp_path):
    """With MIXED_ASPECT_BUCKETS, random crops and flips, --masked_loss and --proportion_empty_prompts: every batch
    of two epochs holds one bucket, each sample at its bucket's shape (chosen from the original image), the edited
    image (the inverted original) cropped and flipped exactly like the original, its latent-grid mask (white left
    half, or square_0's alpha: transparent top half) following the flip; about half of the prompts are empty."""
    import datasets
    from transformers import CLIPTokenizer

    from trainkit.randomness import RunState, make_generator

    script = _script()
    args = _bucket_args(tiny_sd, mixed_aspect_pairs, str(tmp_path), f"--aspect_ratio_buckets={MIXED_ASPECT_BUCKETS}",
                        "--random_flip", "--masked_loss", "--proportion_empty_prompts=0.5")
    dataset = script.load_edit_dataset(args)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    run_state = RunState(seed=3)
    examples = script.EditExamples(dataset, [tokenizer], args, run_state)
    paths = dataset.cast_column("input_image", datasets.Image(decode=False))["input_image"]
    names = [os.path.basename(cell["path"]).split("_")[1] for cell in paths]  # original_<kind>_<n>.png
    assert examples.sample_buckets() == [BUCKET_OF[name] for name in names]
    loader, sampler = script.build_dataloader(examples, args, run_state, _CpuAccelerator())
    assert len(loader) == 3
    prompts = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for batch_keys in sampler:
            batch = [examples[key] for key in batch_keys]
            (bucket,) = {examples.target(index) for _, index in batch_keys}
            for (_, index), item in zip(batch_keys, batch):
                seen.append(index)
                original, edited, mask = item["original_pixel_values"], item["edited_pixel_values"], item["loss_mask"]
                assert original.shape == (3, *bucket) and mask.shape == (1, bucket[0] // 8, bucket[1] // 8)
                assert (edited + original).abs().max() < 0.02, "the edited image was cropped or flipped differently"
                generator = make_generator("cpu", 3, script.AUGMENT_STREAM, epoch, index)
                _, flipped = script.draw_augmentation(False, True, generator)
                if names[index] == "square":  # alpha: the top half is masked out
                    assert mask[0, :3].max() == 0 and mask[0, 5:].min() == 1
                else:  # the left half trains (the right one once flipped)
                    left, right = mask[0, :, :2], mask[0, :, -2:]
                    assert (left.min(), right.max()) == ((0, 1) if flipped else (1, 0)), (names[index], flipped)
                prompts.append(tokenizer.decode(item["input_ids"], skip_special_tokens=True))
        assert sorted(seen) == list(range(6))
    assert 2 <= prompts.count("") <= 10 and len(set(prompts)) > 3
    assert [examples[(0, i)]["input_ids"].tolist() for i in range(6)] == [
        examples[(0, i)]["input_ids"].tolist() for i in range(6)]


def test_conditioning_dropout_rates_and_masks():
    """p = 0.1 over 4000 samples: ~20% lose the prompt (u < 2p), ~20% the original image (p <= u < 3p), ~10% both;
    the draws repeat for the same (seed, epoch, index). Dropped prompts become the empty prompt's encoding, dropped
    images zero latents; the rest is untouched."""
    from trainkit.randomness import RunState

    script = _script()
    examples = script.EditExamples([], None, _pairs_namespace(), RunState(seed=11))
    draws = torch.stack([examples.dropout_draw(epoch, index) for epoch in range(4) for index in range(1000)])
    assert torch.equal(draws[:50], torch.stack([examples.dropout_draw(0, index) for index in range(50)]))
    drop_prompt, drop_image = script.conditioning_dropout_masks(draws, 0.1)
    assert abs(drop_prompt.float().mean().item() - 0.2) < 0.025
    assert abs(drop_image.float().mean().item() - 0.2) < 0.025
    assert abs((drop_prompt & drop_image).float().mean().item() - 0.1) < 0.02
    assert not any(mask.any() for mask in script.conditioning_dropout_masks(draws, 0.0))

    generator = torch.Generator().manual_seed(0)
    states, latents, empty = (torch.randn(4, 77, 32, generator=generator), torch.randn(4, 4, 8, 8, generator=generator),
                              torch.randn(1, 77, 32, generator=generator))
    u = torch.tensor([0.05, 0.15, 0.25, 0.9])  # p = 0.1: prompt only, both, image only, none
    new_states, new_latents, pooled = script.apply_conditioning_dropout(states, latents, u, 0.1, (empty, None))
    assert pooled is None
    for row, (prompt_dropped, image_dropped) in enumerate([(True, False), (True, True), (False, True),
                                                           (False, False)]):
        assert torch.equal(new_states[row], empty[0] if prompt_dropped else states[row]), row
        assert torch.equal(new_latents[row], torch.zeros_like(latents[row]) if image_dropped else latents[row]), row


def test_empty_prompts_at_their_rate_from_their_own_stream():
    """--proportion_empty_prompts 0.3 over 4000 samples: within 4 binomial standard deviations of 30%, the same for
    the same (seed, epoch, index), and without effect on the conditioning dropout draws (their own stream)."""
    from trainkit.randomness import RunState

    script = _script()
    examples = script.EditExamples([], None, _pairs_namespace(proportion_empty_prompts=0.3), RunState(seed=11))
    keys = [(epoch, index) for epoch in range(4) for index in range(1000)]
    drops = torch.tensor([examples.drops_prompt(*key) for key in keys])
    assert abs(drops.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / len(keys)) ** 0.5
    assert drops[:100].tolist() == [examples.drops_prompt(*key) for key in keys[:100]]
    plain = script.EditExamples([], None, _pairs_namespace(), RunState(seed=11))
    assert not any(plain.drops_prompt(*key) for key in keys[:100])
    assert all(torch.equal(plain.dropout_draw(*key), examples.dropout_draw(*key)) for key in keys[:100])


def tokenize(tokenizer, prompts):
    return SD.tokenize([tokenizer], prompts)[0]


@pytest.fixture(scope="module")
def loss_inputs(tiny_sd):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    script = _script()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    unet = script.widen_conv_in(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"))
    with torch.no_grad():  # as after some training: the original image's channels matter
        unet.conv_in.weight[:, 4:].normal_(generator=torch.Generator().manual_seed(1))
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    pixels = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {
        "unet": unet, "vae": AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"), "text_encoder": text_encoder,
        "scheduler": DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler"), "tokenizer": tokenizer,
        "empty": (text_encoder(tokenize(tokenizer, [""]))[0].detach(), None),
        "batch": {"edited_pixel_values": pixels, "original_pixel_values": pixels.flip(-1),
                  "input_ids": tokenize(tokenizer, ["make it green", "make it blue"]),
                  "dropout_draw": torch.tensor([0.5, 0.9])},
    }


def _loss(inputs, batch_changes=None, **flags):
    args = Namespace(**{"conditioning_dropout_prob": None, "noise_offset": 0.0, "snr_gamma": None, "family": SD,
                        "resolution": 64, **flags})
    batch = {**inputs["batch"], **(batch_changes or {})}
    with torch.no_grad():
        return _script().training_loss(inputs["unet"], inputs["vae"], [inputs["text_encoder"]], inputs["scheduler"],
                                       batch, torch.Generator().manual_seed(7), args, torch.float32,
                                       inputs["empty"], inputs["vae"].config.scaling_factor).item()


def test_loss_uses_both_conditions_and_each_flag(loss_inputs):
    """Same batch, same generator: the loss is reproducible; the original image and the prompt both feed the UNet
    unless conditioning dropout removes them; Min-SNR and offset noise change the loss."""
    baseline = _loss(loss_inputs)
    assert baseline == _loss(loss_inputs)
    other_original = {"original_pixel_values": -loss_inputs["batch"]["original_pixel_values"]}
    other_prompt = {"input_ids": tokenize(loss_inputs["tokenizer"], ["make it red", "make it red"])}
    assert _loss(loss_inputs, other_original) != pytest.approx(baseline)
    assert _loss(loss_inputs, other_prompt) != pytest.approx(baseline)
    # Draws in [p, 2p) drop both conditions, so neither changes the loss any more.
    both_dropped = {"dropout_draw": torch.tensor([0.12, 0.15])}
    dropped = _loss(loss_inputs, both_dropped, conditioning_dropout_prob=0.1)
    assert dropped != pytest.approx(baseline)
    assert _loss(loss_inputs, {**both_dropped, **other_original}, conditioning_dropout_prob=0.1) == dropped
    assert _loss(loss_inputs, {**both_dropped, **other_prompt}, conditioning_dropout_prob=0.1) == dropped
    # Draws above 3p drop nothing.
    assert _loss(loss_inputs, conditioning_dropout_prob=0.1) == baseline
    assert _loss(loss_inputs, snr_gamma=1e-3) != pytest.approx(baseline)
    assert _loss(loss_inputs, noise_offset=0.5) != pytest.approx(baseline)


class _PredictionUNet(torch.nn.Module):
    """Stands in for the UNet: its prediction is a trained tensor, so the loss's gradient on each latent pixel shows."""

    def __init__(self, shape):
        super().__init__()
        self.prediction = torch.nn.Parameter(torch.zeros(shape))

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        return (self.prediction,)


def test_masked_loss_equals_the_unmasked_loss_for_an_all_ones_mask_and_ignores_masked_out_pixels(loss_inputs):
    """The batch's loss_mask (B, 1, h, w) weights the loss: all ones gives exactly the unmasked loss (with Min-SNR
    too); a masked-out right half gets no gradient at all while the left half trains."""
    ones = {"loss_mask": torch.ones(2, 1, 8, 8)}
    assert _loss(loss_inputs, ones) == _loss(loss_inputs)
    assert _loss(loss_inputs, ones, snr_gamma=5.0) == _loss(loss_inputs, snr_gamma=5.0)
    half = torch.ones(2, 1, 8, 8)
    half[..., 4:] = 0
    assert _loss(loss_inputs, {"loss_mask": half}) != pytest.approx(_loss(loss_inputs))

    unet = _PredictionUNet((2, 4, 8, 8))
    args = Namespace(conditioning_dropout_prob=None, noise_offset=0.0, snr_gamma=None, family=SD, resolution=64)
    loss = _script().training_loss(unet, loss_inputs["vae"], [loss_inputs["text_encoder"]], loss_inputs["scheduler"],
                                   {**loss_inputs["batch"], "loss_mask": half}, torch.Generator().manual_seed(7), args,
                                   torch.float32, loss_inputs["empty"], loss_inputs["vae"].config.scaling_factor)
    loss.backward()
    gradient = unet.prediction.grad
    assert torch.count_nonzero(gradient[..., 4:]) == 0 and torch.count_nonzero(gradient[..., :4]) > 0


def test_wrong_columns_list_the_real_columns(pairs_parquet, tmp_path):
    """Checked in-process on the loader; a launched run with a wrong column is among the bad-input cases below."""
    import datasets

    from trainkit.cli import InputError

    script = _script()
    for flag, name in (("original_image_column", "before"), ("edited_image_column", "after"),
                       ("edit_prompt_column", "instruction")):
        with pytest.raises(InputError, match=rf"--{flag} '{name}' is not a column .*{COLUMNS}"):
            script.load_edit_dataset(_pairs_namespace(dataset_name=pairs_parquet, **{flag: name}))
    numbers = str(tmp_path / "numbers")
    image = Image.new("RGB", (8, 8))
    datasets.Dataset.from_dict(
        {"input_image": [image], "edited_image": [image], "edit_prompt": [3]},
        features=datasets.Features({"input_image": datasets.Image(), "edited_image": datasets.Image(),
                                    "edit_prompt": datasets.Value("int64")})).save_to_disk(numbers)
    with pytest.raises(InputError, match=r"--edit_prompt_column 'edit_prompt' .* expected text"):
        script.load_edit_dataset(_pairs_namespace(dataset_name=numbers))
    assert len(script.load_edit_dataset(_pairs_namespace(dataset_name=pairs_parquet))) == 6


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, non-zero exit, no traceback, output_dir untouched (SPEC §7)
# --------------------------------------------------------------------------------------------------------------------

# Checked in-process through the script's own argument checks and run_main (exit status 2): all of these fail before
# any model, dataset or Accelerator is created.
BAD_ARGUMENTS = {
    "missing dataset": ({"dataset_name": "/nonexistent/data"}, ["--dataset_name", "/nonexistent/data"]),
    "missing model": ({"pretrained_model_name_or_path": "/nonexistent/sd"}, ["--pretrained_model_name_or_path"]),
    "model folder that is not a pipeline": ({"pretrained_model_name_or_path": "{empty_dir}"}, ["missing tokenizer/"]),
    "max_train_steps 0": ({"max_train_steps": 0}, ["--max_train_steps"]),
    "learning_rate 0": ({"learning_rate": 0}, ["--learning_rate"]),
    "checkpointing_steps -1": ({"checkpointing_steps": -1}, ["--checkpointing_steps"]),
    "checkpoints_total_limit 0": ({"checkpoints_total_limit": 0}, ["--checkpoints_total_limit"]),
    "missing checkpoint": ({"resume_from_checkpoint": "checkpoint-999"}, ["--resume_from_checkpoint"]),
    "missing validation image": ({"val_image_url": "/nonexistent/to_edit.png", "validation_prompt": "make it red"},
                                 ["--val_image_url", "/nonexistent/to_edit.png", "does not exist"]),
    "validation prompt without image": ({"validation_prompt": "make it red"}, ["--validation_prompt",
                                                                               "--val_image_url"]),
    "resolution not a multiple of 8": ({"resolution": 60}, ["--resolution", "multiple of 8"]),
    "conditioning_dropout_prob above 1": ({"conditioning_dropout_prob": 1.5}, ["--conditioning_dropout_prob"]),
    "conditioning_dropout_prob negative": ({"conditioning_dropout_prob": -0.1}, ["--conditioning_dropout_prob"]),
    "num_validation_images 0": ({"num_validation_images": 0}, ["--num_validation_images"]),
    "cache_latents with a random crop": ({"cache_latents": True}, ["--cache_latents needs --center_crop"]),
    "feature_cache_dir is a file": ({"cache_text_embeddings": True, "feature_cache_dir": "{a_file}"},
                                    ["--feature_cache_dir", "is a file"]),
    # Real datasets (SPEC §9)
    "malformed aspect_ratio_buckets": ({"aspect_ratio_buckets": "64,96;96"}, ["--aspect_ratio_buckets",
                                                                             "height,width"]),
    "bucket side not a multiple of 8": ({"aspect_ratio_buckets": "64,100"}, ["--aspect_ratio_buckets", "64,100",
                                                                            "multiple of 8"]),
    "bucket_min_resolution above resolution": ({"use_aspect_ratio_buckets": True, "bucket_min_resolution": 128},
                                               ["--bucket_min_resolution", "<= --resolution"]),
    "aspect_ratio_buckets with bucket_min_resolution": ({"aspect_ratio_buckets": "64,64", "bucket_min_resolution": 32},
                                                        ["--bucket_min_resolution", "--aspect_ratio_buckets"]),
    "validation_width not a multiple of 8": ({"validation_width": 100}, ["--validation_width", "multiple of 8"]),
    "proportion_empty_prompts above 1": ({"proportion_empty_prompts": 1.5}, ["--proportion_empty_prompts", "1.5"]),
    "proportion_empty_prompts negative": ({"proportion_empty_prompts": -0.1}, ["--proportion_empty_prompts",
                                                                               "-0.1"]),
    "mask_column without masked_loss": ({"mask_column": "mask"}, ["--mask_column", "--masked_loss"]),
}


def _existing_output(tmp_path):
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return str(out), snapshot(str(out))


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_gets_one_line_error(case, tiny_sd, pairs_parquet, tmp_path, capsys):
    from trainkit.cli import run_main

    overrides, expected = BAD_ARGUMENTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    overrides = {key: value.format(empty_dir=tmp_path / "empty", a_file=tmp_path / "a_file")
                 if isinstance(value, str) else value for key, value in overrides.items()}
    out, before = _existing_output(tmp_path)
    argv = base_args(tiny_sd, out, **{"parquet": pairs_parquet, **overrides})
    script = _script()
    with pytest.raises(SystemExit) as exit_info:
        # The checks main() runs first; a case that passed them would exit 0 here instead of training in pytest.
        run_main(lambda: script.validate_args(script.parse_args(argv)))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(text in lines[0] for text in expected), lines[0]
    assert snapshot(out) == before


def test_masked_loss_without_any_mask_or_with_a_mask_of_another_size_gets_one_line_error(
        tiny_sd, pairs_parquet, mixed_aspect_pairs, tmp_path, capsys):
    """Found from the image headers when the data is read, before any model loads (after the Accelerator: checked
    here through the data functions and run_main): no mask anywhere names where it looked; a mask file of the wrong
    size is named; a --mask_column that is not a column lists the columns."""
    from trainkit.cli import run_main
    from trainkit.randomness import RunState

    script = _script()

    def error(args):
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: script.EditExamples(script.load_edit_dataset(args), None, args,
                                                 RunState(seed=0)).check_masks())
        stderr = capsys.readouterr().err
        assert_one_line_error(exit_info.value.code, stderr, ["error: "])
        return stderr.strip().splitlines()[-1]

    args = script.parse_args(base_args(tiny_sd, str(tmp_path / "out"), parquet=pairs_parquet, masked_loss=True))
    line = error(args)
    assert all(text in line for text in ("--masked_loss", "none of the 6 edited images", pairs_parquet,
                                         "alpha channel", "name.mask.png")), line
    args.mask_column = "mask"
    assert "--mask_column 'mask' is not a column" in error(args)

    data = str(tmp_path / "pairs")
    shutil.copytree(mixed_aspect_pairs, data)
    wrong = os.path.join(data, "edited_port_0.mask.png")
    Image.open(wrong).resize((10, 10)).save(wrong)
    line = error(script.parse_args(base_args(tiny_sd, str(tmp_path / "out"), data=data, masked_loss=True)))
    assert all(text in line for text in (wrong, "10x10", "64x96", "its image's size")), line


def test_wrong_column_in_a_launched_run_gets_one_line_error(tiny_sd, pairs_parquet, tmp_path):
    """A data error found after the Accelerator exists (the column checks, also covered in-process above) still ends
    the process with one line listing the real columns, exit status 2, no traceback, output_dir untouched."""
    out, before = _existing_output(tmp_path)
    result = run_python(SCRIPT, base_args(tiny_sd, out, parquet=pairs_parquet, original_image_column="before"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert error_lines == [f"error: --original_image_column 'before' is not a column of {pairs_parquet!r}; {COLUMNS}"]
    assert result.stderr.rstrip().splitlines()[-1] == error_lines[0]
    assert snapshot(out) == before


def test_validation_image_from_a_path_or_an_unreachable_url(validation_image):
    """A local image is fitted to --resolution (short side, multiples of 8, the size the pipeline edits at); a URL
    that cannot be fetched is a one-line InputError naming --val_image_url (port 9 on localhost refuses at once)."""
    from trainkit.cli import InputError

    script = _script()
    accelerator = Namespace(is_main_process=True, num_processes=1)
    wide = Image.new("RGB", (50, 30))
    assert script.fit_for_validation(wide, 64).size == (104, 64)
    image = script.load_validation_image(accelerator, Namespace(val_image_url=validation_image, resolution=64))
    assert image.size == (64, 64) and image.mode == "RGB"
    assert script.load_validation_image(accelerator, Namespace(val_image_url=None, resolution=64)) is None
    with pytest.raises(InputError, match=r"^--val_image_url 'http://127.0.0.1:9/to_edit.png': cannot load the image"):
        script.load_validation_image(accelerator, Namespace(val_image_url="http://127.0.0.1:9/to_edit.png",
                                                            resolution=64))
