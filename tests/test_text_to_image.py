"""train_text_to_image.py: launched as users launch it, plus in-process checks of the data and loss code."""

import argparse
import json
import os
import shutil
import signal

import pytest
import torch
from helpers import (
    assert_different_weights,
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

SCRIPT = "train_text_to_image.py"
PROMPTS = ["a photo of a cat", "a red circle", "a blue square"]


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: the tiny SD pipeline and small captioned datasets, built once per module
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


def _images(count, seed=0):
    from conftest import _shape_images

    return _shape_images(count, seed)


@pytest.fixture(scope="module")
def metadata_folder(tmp_path_factory):
    """An imagefolder: 7 readable images with list-valued captions in metadata.jsonl, plus one corrupt file.
    7 images at batch 2 = 4 batches per epoch; at batch 1, 7."""
    folder = tmp_path_factory.mktemp("metadata_folder")
    rows = []
    for index, image in enumerate(_images(7)):
        image.save(folder / f"img_{index}.png")
        rows.append({"file_name": f"img_{index}.png", "text": ["a red circle", "a blue square"][: 1 + index % 2]})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.append({"file_name": "corrupt.png", "text": ["broken"]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def txt_folder(tmp_path_factory):
    """A plain folder of images with `name.txt` captions beside them (one image has none)."""
    folder = tmp_path_factory.mktemp("txt_folder")
    for index, image in enumerate(_images(5, seed=2)):
        image.save(folder / f"shape_{index}.png")
        if index != 4:
            (folder / f"shape_{index}.txt").write_text(f"a photo of a {'cat' if index % 2 else 'dog'}\n")
    return str(folder)


def base_args(model, data, output_dir, **overrides):
    """Tiny, fast settings: 64 px (8x8 latents), batch 2, validation with 2 denoising steps."""
    args = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
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
        elif isinstance(value, list):
            flags += [f"--{key}"] + [str(item) for item in value]
        elif value is not None and value is not False:
            flags += [f"--{key}", str(value)]
    return flags


# --------------------------------------------------------------------------------------------------------------------
# Launched runs
# --------------------------------------------------------------------------------------------------------------------


def test_trains_writes_a_loadable_pipeline_checkpoints_and_validation(tiny_sd, metadata_folder, tmp_path, yaml_file):
    """A run with every training flag family on (Min-SNR, offset noise, input perturbation, DREAM, gradient
    checkpointing, 8-bit Adam, offloaded foreach EMA, bicubic resizing, scale_lr, a polynomial schedule, and the
    upstream SDXL flags that apply to SD: caption dropout, timestep bias, --validation_prompt next to
    --validation_prompts; most given in a YAML file) writes a pipeline, checkpoints and validation images that work.
    What each flag changes is shown in-process by test_each_loss_flag_changes_the_loss (and, for the SDXL flags, in
    test_text_to_image_sdxl.py)."""
    config = yaml_file({
        "snr_gamma": 5.0, "noise_offset": 0.1, "input_perturbation": 0.1, "dream_training": True,
        "dream_detail_preservation": 0.5, "prediction_type": "epsilon", "gradient_checkpointing": True,
        "use_8bit_adam": True, "offload_ema": True, "foreach_ema": True, "image_interpolation_mode": "bicubic",
        "scale_lr": True, "lr_scheduler": "polynomial", "allow_tf32": True, "proportion_empty_prompts": 0.2,
        "timestep_bias_strategy": "range", "timestep_bias_begin": 200, "timestep_bias_end": 600,
        "timestep_bias_multiplier": 2.0, "validation_prompt": "a dog", "num_validation_images": 1,
    })
    out = str(tmp_path / "out")
    result = launch(SCRIPT, ["--config", config] + base_args(
        tiny_sd, metadata_folder, out, use_ema=True, max_train_steps=6, checkpointing_steps=3, random_flip=True,
        validation_prompts=PROMPTS[:2], validation_epochs=1))

    # The corrupt file is skipped by name; the 7 good images make 4 batches of 2 per epoch.
    assert "Skipping unreadable image" in result.stderr and "corrupt.png" in result.stderr
    assert "7 examples, 2 epochs of 4 steps" in result.stderr
    assert checkpoints(out) == {"checkpoint-3", "checkpoint-6"}

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    # The output folder is a full pipeline that loads and generates.
    pipeline = StableDiffusionPipeline.from_pretrained(out)
    image = pipeline("a photo of a cat", num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    # The frozen parts are saved as loaded (fp32), not in a training dtype.
    assert all(t.dtype == torch.float32 for t in load_weights(os.path.join(out, "vae")).values())
    assert all(torch.isfinite(t).all() for t in load_weights(os.path.join(out, "unet")).values())

    # EMA: the pipeline holds the EMA weights, unet_raw/ the trained ones, and they differ; the checkpoint agrees.
    checkpoint = os.path.join(out, "checkpoint-6")
    assert_different_weights(os.path.join(out, "unet"), os.path.join(out, "unet_raw"))
    assert_same_weights(os.path.join(checkpoint, "unet_ema"), os.path.join(out, "unet"))
    assert_same_weights(os.path.join(checkpoint, "unet"), os.path.join(out, "unet_raw"))
    assert_different_weights(os.path.join(tiny_sd, "unet"), os.path.join(out, "unet_raw"))

    # checkpoint-N/unet is usable by itself in the base pipeline.
    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=unet)
    assert base("a dog", num_inference_steps=2, output_type="np").images[0].shape == (64, 64, 3)

    # Validation images after each epoch (validation_epochs 1) and after training, on disk and in TensorBoard.
    for name in ("epoch_0000", "epoch_0001", "final"):
        assert sorted(os.listdir(os.path.join(out, "validation", name))) == ["00.png", "01.png", "02.png"], name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs", "text2image-fine-tune"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2, 3, 4, 5, 6]
    assert len(events.Images("validation")) >= 2 and events.Images("test")

    with open(os.path.join(out, "README.md")) as file:
        card = file.read()
    assert "text-to-image" in card and PROMPTS[0] in card and "val_imgs_grid.png" in card
    assert "2. a dog" in card and "| timestep bias | range |" in card and "StableDiffusionPipeline" in card
    assert os.path.isfile(os.path.join(out, "val_imgs_grid.png"))


def test_exact_resume_with_rotation_before_and_after(tiny_sd, metadata_folder, tmp_path):
    """Batch 1 (7 steps per epoch), EMA, random crops/flips/captions: 12 steps straight == 9 steps (checkpoint-9,
    mid-epoch) + resume latest to 12, bit for bit. Rotation keeps the newest 2 checkpoints before and after resume."""
    settings = {"train_batch_size": 1, "use_ema": True, "random_flip": True, "checkpointing_steps": 3,
                    "checkpoints_total_limit": 2, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 4}
    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(tiny_sd, metadata_folder, straight, max_train_steps=12, **settings))
    assert checkpoints(straight) == {"checkpoint-9", "checkpoint-12"}

    resumed = str(tmp_path / "resumed")
    first = train(SCRIPT, base_args(tiny_sd, metadata_folder, resumed, max_train_steps=9,
                                    resume_from_checkpoint="latest", **settings))
    assert "no checkpoint" in first.stderr and "starting a new run" in first.stderr
    assert checkpoints(resumed) == {"checkpoint-6", "checkpoint-9"}
    second = train(SCRIPT, base_args(tiny_sd, metadata_folder, resumed, max_train_steps=12,
                                     resume_from_checkpoint="latest", **settings))
    assert f"Resuming from {os.path.join(resumed, 'checkpoint-9')}" in second.stderr
    assert checkpoints(resumed) == {"checkpoint-9", "checkpoint-12"}

    for folder in ("checkpoint-12/unet", "checkpoint-12/unet_ema", "unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))


def test_sigterm_with_accumulation_saves_and_latest_resumes_exactly(tiny_sd, metadata_folder, tmp_path):
    """Gradient accumulation 2 and EMA: SIGTERM -> checkpoint at the stop step, exit 143; resume latest == straight."""
    settings = {"train_batch_size": 1, "gradient_accumulation_steps": 2, "use_ema": True, "random_flip": True,
                    "max_train_steps": 40, "checkpointing_steps": 2, "lr_scheduler": "linear"}
    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, base_args(tiny_sd, metadata_folder, interrupted, **settings))
    wait_for_path(os.path.join(interrupted, "checkpoint-2"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)

    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(interrupted))
    assert 2 <= stop_step < 40, "the signal arrived after the run had finished: the test needs more steps"
    assert not os.path.exists(os.path.join(interrupted, "model_index.json"))

    train(SCRIPT, base_args(tiny_sd, metadata_folder, interrupted, resume_from_checkpoint="latest", **settings))
    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(tiny_sd, metadata_folder, straight, **settings))
    for folder in ("unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(interrupted, folder))


def test_two_processes(tiny_sd, txt_folder, tmp_path):
    """CPU DDP over gloo on a folder with .txt captions: trains, splits validation prompts across ranks, checkpoints,
    resumes exactly on 2 processes and exits cleanly."""
    settings = {"train_batch_size": 1, "max_train_steps": 4, "checkpointing_steps": 2, "use_ema": True,
                    "validation_prompts": PROMPTS}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, txt_folder, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert "1 of 5 images" in result.stderr and "no caption" in result.stderr
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {"random_states_0.pkl", "random_states_1.pkl"}
    assert sorted(os.listdir(os.path.join(straight, "validation", "final"))) == ["00.png", "01.png", "02.png"]

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    launch(SCRIPT, base_args(tiny_sd, txt_folder, resumed, resume_from_checkpoint="checkpoint-2", **settings),
           num_processes=2)
    for folder in ("checkpoint-4/unet", "checkpoint-4/unet_ema", "unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))


def test_buckets_with_masked_loss_resume_exactly_mid_epoch_on_two_processes_and_generate_non_square(
        tiny_sd, mixed_aspect_folder, tmp_path):
    """--aspect_ratio_buckets (landscape, portrait, square) with --masked_loss, random crops and flips, batch 1,
    accumulation 2, on 2 processes: 6 one-image batches per epoch, 3 per rank, 2 steps. 3 steps straight ==
    checkpoint-1 (mid-epoch) resumed to 3, bit for bit. Validation renders at --validation_height x
    --validation_width; the output pipeline generates at 64x96; the model card names the buckets and the mask."""
    from conftest import MIXED_ASPECT_BUCKETS

    settings = {"aspect_ratio_buckets": MIXED_ASPECT_BUCKETS, "masked_loss": True, "random_flip": True,
                "train_batch_size": 1, "gradient_accumulation_steps": 2, "max_train_steps": 3,
                "checkpointing_steps": 1, "validation_prompts": PROMPTS[:1], "validation_height": 64,
                "validation_width": 96}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, straight, **settings), num_processes=2)
    assert "6 examples, 2 epochs of 2 steps, 3 steps in all" in result.stderr
    assert checkpoints(straight) == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    from PIL import Image

    assert Image.open(os.path.join(straight, "validation", "final", "00.png")).size == (96, 64)
    card = open(os.path.join(straight, "README.md")).read()
    assert "| aspect-ratio buckets | 64,64;64,96;96,64 |" in card and "| masked loss |" in card

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    launch(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, resumed, resume_from_checkpoint="checkpoint-1",
                             **settings), num_processes=2)
    for folder in ("checkpoint-3/unet", "unet"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))
    assert_different_weights(os.path.join(tiny_sd, "unet"), os.path.join(straight, "unet"))

    from diffusers import StableDiffusionPipeline

    image = StableDiffusionPipeline.from_pretrained(straight)(
        "a wide shape", num_inference_steps=2, height=64, width=96, output_type="np",
        generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 96, 3) and torch.isfinite(torch.from_numpy(image)).all()


def _cache_entries(cache_dir, kind):
    """{entry path: mtime} of one kind of feature-cache entry."""
    entries = {}
    for root, _, files in os.walk(os.path.join(cache_dir, kind)):
        for name in files:
            if name.endswith(".safetensors"):
                entries[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
    return entries


def test_feature_cache_matches_fresh_encodings_is_reused_resumes_exactly_and_sees_edits(tiny_sd, txt_folder,
                                                                                          tmp_path):
    """--cache_latents --cache_text_embeddings with --random_flip:
    - training on the cache equals training on fresh encodings within fp32 rounding (the VAE and text encoder see
      other batch shapes when filling the cache, nothing else differs);
    - a second run, resuming the first's checkpoint-2 in another output folder with 2 data loader workers,
      computes nothing, rewrites no entry and ends bit for bit like the first;
    - editing one image recomputes that image's entry only."""
    data = str(tmp_path / "data")
    shutil.copytree(txt_folder, data)
    cache = str(tmp_path / "cache")
    settings = {"center_crop": True, "random_flip": True, "max_train_steps": 4, "checkpointing_steps": 2,
                "learning_rate": 1e-4}
    cached = {"cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": cache}

    fresh = str(tmp_path / "fresh")
    train(SCRIPT, base_args(tiny_sd, data, fresh, **settings))
    first = str(tmp_path / "first")
    result = launch(SCRIPT, base_args(tiny_sd, data, first, **settings, **cached))
    # 5 images; captions: 2 x cat, 2 x dog, 1 empty -> 3 distinct.
    assert "latents: 0 of 5 cached" in result.stderr and "computing 5" in result.stderr
    assert "text_embeddings: 0 of 3 cached" in result.stderr
    latents, texts = _cache_entries(cache, "latents"), _cache_entries(cache, "text_embeddings")
    assert len(latents) == 5 and len(texts) == 3
    # Adam divides by the root of the squared gradients: where a gradient is near zero, the rounding of other batch
    # shapes becomes a visible step. So: all but a handful of weights within 2e-6, none off by a quarter of one step.
    fresh_weights, cached_weights = load_weights(os.path.join(fresh, "unet")), load_weights(os.path.join(first, "unet"))
    differences = torch.cat([(cached_weights[name] - value).abs().flatten() for name, value in fresh_weights.items()])
    assert (differences > 2e-6).sum() <= 1e-4 * differences.numel() and differences.max() < 2.5e-5
    assert_different_weights(os.path.join(first, "unet"), os.path.join(tiny_sd, "unet"))

    second = str(tmp_path / "second")
    shutil.copytree(os.path.join(first, "checkpoint-2"), os.path.join(second, "checkpoint-2"))
    result = train(SCRIPT, base_args(tiny_sd, data, second, **settings, **cached, resume_from_checkpoint="latest",
                                     dataloader_num_workers=2))
    assert "latents: 5 of 5 cached" in result.stderr and "text_embeddings: 3 of 3 cached" in result.stderr
    assert _cache_entries(cache, "latents") == latents and _cache_entries(cache, "text_embeddings") == texts
    for folder in ("checkpoint-4/unet", "unet"):
        assert_same_weights(os.path.join(first, folder), os.path.join(second, folder))

    edited = os.path.join(data, "shape_0.png")
    from PIL import Image

    Image.open(os.path.join(data, "shape_1.png")).transpose(Image.FLIP_TOP_BOTTOM).save(edited)
    result = train(SCRIPT, base_args(tiny_sd, data, str(tmp_path / "third"), **{**settings, "max_train_steps": 1},
                                     **cached))
    assert "latents: 4 of 5 cached" in result.stderr and "computing 1" in result.stderr
    after = _cache_entries(cache, "latents")
    assert len(after) == 6 and all(after[path] == mtime for path, mtime in latents.items())


def test_diffusers_docs_command_runs_unchanged(tiny_sd, tmp_path):
    """The diffusers docs' command line with a local dataset, the tiny model and --mixed_precision=no (CPU): parses,
    loads, and trains at 512 px with EMA, accumulation 4 and gradient checkpointing; a SIGTERM right after start
    stops it after its first optimizer step (so --max_train_steps=15000 stays as in the docs)."""
    import datasets

    data = tmp_path / "dataset"
    datasets.Dataset.from_dict(
        {"image": _images(2), "text": ["a photo of a cat", "a photo of a dog"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    ).save_to_disk(str(data))
    out = str(tmp_path / "sd-naruto-model")
    process = start_python(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_sd}", f"--dataset_name={data}", "--use_ema", "--resolution=512",
        "--center_crop", "--random_flip", "--train_batch_size=1", "--gradient_accumulation_steps=4",
        "--gradient_checkpointing", "--max_train_steps=15000", "--learning_rate=1e-05", "--max_grad_norm=1",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--output_dir={out}", "--mixed_precision=no",
    ])
    wait_for_path(os.path.join(out, "logs"), process)
    status, _, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "15000 steps in all, batch 1 per device, total batch 4" in stderr
    assert checkpoints(out) == {"checkpoint-1"}
    assert {"unet", "unet_ema"} <= set(os.listdir(os.path.join(out, "checkpoint-1")))


# --------------------------------------------------------------------------------------------------------------------
# In-process: data, captions, augmentation and the loss of one step
# --------------------------------------------------------------------------------------------------------------------


def _script():
    import train_text_to_image

    return train_text_to_image


def _namespace(**values):
    """The script's arguments as parse_args leaves them for an SD model (`family=` another family's object)."""
    from trainkit import families

    defaults = {
        "family": families.FAMILIES["sd"],
        "dataset_name": None, "dataset_config_name": None, "train_data_dir": None, "cache_dir": None,
        "image_column": "image", "caption_column": "text", "max_train_samples": None, "resolution": 64,
        "center_crop": False, "random_flip": True, "image_interpolation_mode": "lanczos", "noise_offset": 0.0,
        "input_perturbation": 0.0, "dream_training": False, "dream_detail_preservation": 1.0, "snr_gamma": None,
        "proportion_empty_prompts": 0.0, "use_aspect_ratio_buckets": False, "aspect_ratio_buckets": None,
        "bucket_min_resolution": None, "bucket_divisibility": 64, "validation_height": None, "validation_width": None,
        "buckets": None, "masked_loss": False, "mask_column": None,
    }
    defaults.update(values)
    return argparse.Namespace(**defaults)


def _bucketed(**values):
    """_namespace with the bucket flags checked (args.buckets set), as validate_args leaves them."""
    from trainkit import bucketing

    args = _namespace(**values)
    bucketing.check_bucket_flags(args)
    return args


def test_data_sources_captions_and_augmentation_are_restorable(tiny_sd, metadata_folder, txt_folder):
    from transformers import CLIPTokenizer

    from trainkit.randomness import RunState

    script = _script()
    # A plain folder: captions from name.txt, an empty caption where there is none.
    folder = script.load_captioned_dataset(_namespace(train_data_dir=txt_folder))
    captions = dict(zip([os.path.basename(item["path"]) for item in
                         folder.cast_column("image", __import__("datasets").Image(decode=False))["image"]],
                        folder["text"]))
    assert captions["shape_1.png"] == "a photo of a cat" and captions["shape_4.png"] == ""

    # The imagefolder: list captions; each (seed, epoch, index) picks the same caption and crop every time, and
    # different epochs pick differently.
    dataset = script.load_captioned_dataset(_namespace(train_data_dir=metadata_folder))
    assert len(dataset) == 7
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    run_state = RunState(seed=3)
    train = script.CaptionedImages(dataset, [tokenizer], _namespace(), run_state)
    first, again = train[(0, 1)], train[(0, 1)]
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert first["pixel_values"].shape == (3, 64, 64) and first["input_ids"].shape == (77,)
    picked = {tokenizer.decode(train[(epoch, 1)]["input_ids"], skip_special_tokens=True) for epoch in range(20)}
    assert picked == {"a red circle", "a blue square"}
    pixels = {train[(epoch, 1)]["pixel_values"].sum().item() for epoch in range(6)}
    assert len(pixels) > 1, "random crops/flips never changed"

    # --max_train_samples: a subset drawn from the run seed (a resumed run gets its seed from the checkpoint later).
    subset = script.CaptionedImages(dataset, [tokenizer], _namespace(max_train_samples=3), run_state)
    rows = [subset._row(i) for i in range(len(subset))]
    assert len(subset) == 3 and len(set(rows)) == 3 and set(rows) <= set(range(7))
    assert rows == [script.CaptionedImages(dataset, [tokenizer], _namespace(max_train_samples=3), RunState(3))._row(i)
                    for i in range(3)]
    subsets = set()
    for seed in range(5):  # the subset follows the run seed, even when it changes after construction (resume)
        run_state.seed = seed
        subsets.add(tuple(subset._row(i) for i in range(3)))
    assert len(subsets) > 1

    # --image_interpolation_mode changes the resize filter.
    image = _images(1)[0]
    resized = {mode: script.preprocess_image(image, 64, script.INTERPOLATION_MODES[mode], True, False,
                                             torch.Generator().manual_seed(0))[0]
               for mode in ("lanczos", "nearest")}
    assert not torch.equal(resized["lanczos"], resized["nearest"])


def test_wrong_columns_list_the_real_columns(metadata_folder, tmp_path):
    import datasets

    from trainkit.cli import InputError

    script = _script()
    with pytest.raises(InputError, match=r"--image_column 'picture' is not a column .*columns: image, text"):
        script.load_captioned_dataset(_namespace(train_data_dir=metadata_folder, image_column="picture"))
    with pytest.raises(InputError, match=r"--caption_column 'caption' is not a column .*columns: image, text"):
        script.load_captioned_dataset(_namespace(train_data_dir=metadata_folder, caption_column="caption"))
    # A caption column that holds numbers, not text: rejected before training, naming the column.
    numbers = str(tmp_path / "numbers")
    datasets.Dataset.from_dict({"image": _images(2), "text": [1, 2]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "text": datasets.Value("int64")})).save_to_disk(numbers)
    with pytest.raises(InputError, match=r"--caption_column 'text' .* expected text or lists of text"):
        script.load_captioned_dataset(_namespace(dataset_name=numbers))
    # A local dataset folder (save_to_disk) with text captions loads.
    texts = str(tmp_path / "texts")
    datasets.Dataset.from_dict({"image": _images(2), "text": ["a cat", "a dog"], "extra": [0, 1]},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                                           "extra": datasets.Value("int64")})).save_to_disk(texts)
    assert script.load_captioned_dataset(_namespace(dataset_name=texts)).column_names == ["image", "text"]


@pytest.fixture(scope="module")
def loss_inputs(tiny_sd):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    batch = {
        "pixel_values": torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1,
        "input_ids": tokenizer(["a photo of a cat", "a dog"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids,
    }
    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"),
        "scheduler_config": DDPMScheduler.load_config(tiny_sd, subfolder="scheduler"),
        "batch": batch,
    }


def _loss(loss_inputs, prediction_type="epsilon", **flags):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(loss_inputs["scheduler_config"], prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(7)
    return _script().training_loss(loss_inputs["unet"], loss_inputs["vae"], [loss_inputs["text_encoder"]], scheduler,
                                   loss_inputs["batch"], generator, _namespace(**flags), torch.float32,
                                   loss_inputs["vae"].config.scaling_factor).item()


def test_each_loss_flag_changes_the_loss(loss_inputs):
    """Same batch, same generator: the loss is reproducible, and each flag family changes it."""
    baseline = _loss(loss_inputs)
    assert baseline == _loss(loss_inputs)
    # Min-SNR: gamma below every SNR changes the weights; a gamma above every SNR makes them all 1 (epsilon).
    assert _loss(loss_inputs, snr_gamma=1e-3) != pytest.approx(baseline)
    assert _loss(loss_inputs, snr_gamma=1e12) == pytest.approx(baseline, rel=1e-6)
    for flags in ({"noise_offset": 0.5}, {"input_perturbation": 0.5}, {"dream_training": True},
                  {"dream_training": True, "dream_detail_preservation": 3.0}):
        assert _loss(loss_inputs, **flags) != pytest.approx(baseline), flags
    assert _loss(loss_inputs, dream_training=True) != pytest.approx(
        _loss(loss_inputs, dream_training=True, dream_detail_preservation=3.0))
    assert _loss(loss_inputs, prediction_type="v_prediction") != pytest.approx(baseline)


def test_buckets_shape_every_image_batches_never_mix_and_masks_follow_the_crop(tiny_sd, mixed_aspect_folder):
    """--aspect_ratio_buckets: each image goes to the bucket of nearest aspect ratio (the small one upscaled to the
    square: an explicit list is obeyed), its tensor and latent-grid mask have that bucket's shape, and the bucketed
    sampler's batches never mix buckets and hold every image once per epoch. The masks (name.mask.png: a white left
    half; square_0's alpha: an opaque bottom half) follow the resize, crop and flip. Generated buckets never upscale."""
    from conftest import MIXED_ASPECT_BUCKETS
    from datasets import Image as ImageFeature
    from transformers import CLIPTokenizer

    from trainkit.randomness import RunState

    script = _script()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    args = _bucketed(train_data_dir=mixed_aspect_folder, aspect_ratio_buckets=MIXED_ASPECT_BUCKETS, masked_loss=True)
    dataset = script.load_captioned_dataset(args)
    layout = script.survey_images(dataset, args)
    cells = dataset.cast_column("image", ImageFeature(decode=False))["image"]
    names = [os.path.basename(cell["path"]) for cell in cells]
    assert dict(zip(names, layout["buckets"])) == {
        "land_0.png": (64, 96), "land_1.png": (64, 96), "port_0.png": (96, 64), "port_1.png": (96, 64),
        "square_0.png": (64, 64), "small_0.png": (64, 64)}
    assert [os.path.basename(source) if source != script.MASK_FROM_ALPHA else source for source in layout["masks"]] \
        == [script.MASK_FROM_ALPHA if name == "square_0.png" else name[:-4] + ".mask.png" for name in names]

    run_state = RunState(seed=3)
    train = script.CaptionedImages(dataset, [tokenizer], args, run_state, **layout)
    args.train_batch_size = 2
    sampler = script.batch_order(train, args, run_state)["batch_sampler"]
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        orders.append(batches)
        assert len(batches) == len(sampler) == 3
        assert sorted(index for batch in batches for _, index in batch) == list(range(6))
        for batch in batches:
            items = [train[key] for key in batch]
            bucket = layout["buckets"][batch[0][1]]
            assert all(layout["buckets"][index] == bucket for _, index in batch)
            for item in items:
                assert item["pixel_values"].shape == (3, *bucket) and item["target_size"].tolist() == list(bucket)
                assert item["loss_mask"].shape == (1, bucket[0] // 8, bucket[1] // 8)
                assert 0 <= item["loss_mask"].min() and item["loss_mask"].max() <= 1
    assert orders[0] != orders[1], "the bucketed order does not change with the epoch"
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler)
    assert {tuple(batch["loss_mask"].shape) for batch in loader} == {(2, 1, 8, 12), (2, 1, 12, 8), (2, 1, 8, 8)}

    # Centre crops without flips: land_0 (96x64, no resize) keeps its white left half; square_0 (80x80 -> 64x64)
    # its opaque bottom half.
    still = script.CaptionedImages(dataset, [tokenizer], _bucketed(**{**vars(args), "center_crop": True,
                                                                        "random_flip": False, "buckets": None}),
                                   run_state, **layout)
    land = still[(0, names.index("land_0.png"))]["loss_mask"][0]
    assert land[:, :6].eq(1).all() and land[:, 6:].eq(0).all()
    square = still[(0, names.index("square_0.png"))]["loss_mask"][0]
    assert square[:3].eq(0).all() and square[5:].eq(1).all()

    # Generated buckets (every 16 px from 64 down to 32): none larger than its image; the 40x40 image gets 32x32.
    generated = _bucketed(train_data_dir=mixed_aspect_folder, use_aspect_ratio_buckets=True, bucket_divisibility=16)
    buckets = script.survey_images(dataset, generated)["buckets"]
    sizes = [(image.height, image.width) for image in dataset["image"]]
    assert all(bh <= h and bw <= w for (bh, bw), (h, w) in zip(buckets, sizes))
    assert buckets[names.index("small_0.png")] == (32, 32) and len(set(buckets)) >= 3


def test_mask_column_weights_each_row_and_a_mask_of_another_size_is_named(tiny_sd, tmp_path):
    """--mask_column: each row's mask cell follows its image's resize and crop to the latent grid; a mask of another
    size than its image is an InputError naming the row; a missing column lists the real ones."""
    import datasets
    from PIL import Image
    from transformers import CLIPTokenizer

    from trainkit.cli import InputError
    from trainkit.randomness import RunState

    script = _script()
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 80), "blue")]
    masks = [Image.new("L", (64, 64), 0), Image.new("L", (64, 80), 255)]
    masks[0].paste(255, (0, 0, 32, 64))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "mask": datasets.Image()})
    data = str(tmp_path / "masked")
    datasets.Dataset.from_dict({"image": images, "text": ["a", "b"], "mask": masks},
                               features=features).save_to_disk(data)
    args = _bucketed(dataset_name=data, masked_loss=True, mask_column="mask", center_crop=True, random_flip=False)
    dataset = script.load_captioned_dataset(args)
    layout = script.survey_images(dataset, args)
    assert layout == {"buckets": None, "masks": [script.MASK_FROM_COLUMN] * 2}
    train = script.CaptionedImages(dataset, [CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")], args,
                                   RunState(0), **layout)
    left_half = train[(0, 0)]["loss_mask"][0]
    assert left_half.shape == (8, 8) and left_half[:, :4].eq(1).all() and left_half[:, 4:].eq(0).all()
    assert train[(0, 1)]["loss_mask"].eq(1).all()

    wrong = str(tmp_path / "wrong")
    datasets.Dataset.from_dict({"image": images, "text": ["a", "b"], "mask": masks[::-1]},
                               features=features).save_to_disk(wrong)
    wrong_args = _bucketed(**{**vars(args), "dataset_name": wrong, "buckets": None})
    with pytest.raises(InputError, match=r"--masked_loss: the --mask_column cell of row 0 .* is 64x80 but"):
        script.survey_images(script.load_captioned_dataset(wrong_args), wrong_args)
    with pytest.raises(InputError, match=r"--mask_column 'alpha' is not a column .*columns: image, text, mask"):
        script.load_captioned_dataset(_bucketed(**{**vars(args), "mask_column": "alpha", "buckets": None}))


def test_cached_latents_stay_paired_with_their_captions_masks_and_buckets(tiny_sd, mixed_aspect_folder, tmp_path):
    """With buckets, masks and --random_flip, each (epoch, index) of a cached dataset holds the latents of exactly the
    image, flip, crop and mask the uncached dataset gives it, with its own caption. Changing the bucket list
    recomputes exactly the entries whose bucket changed."""
    import types

    from conftest import MIXED_ASPECT_BUCKETS
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from trainkit import feature_cache
    from trainkit.randomness import RunState

    script = _script()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    accelerator = types.SimpleNamespace(wait_for_everyone=lambda: None, is_main_process=True, process_index=0,
                                        num_processes=1, device=torch.device("cpu"))
    args = _bucketed(train_data_dir=mixed_aspect_folder, aspect_ratio_buckets=MIXED_ASPECT_BUCKETS, masked_loss=True,
                     center_crop=True, feature_cache_dir=str(tmp_path / "cache"), train_batch_size=4)
    dataset = script.load_captioned_dataset(args)
    layout = script.survey_images(dataset, args)
    fresh = script.CaptionedImages(dataset, [tokenizer], args, RunState(5), **layout)
    cached = script.CaptionedImages(dataset, [tokenizer], args, RunState(5), **layout)
    script.cache_latents(accelerator, cached, vae, args, torch.float32)  # batches of 4 hold several buckets
    flips = set()
    for epoch in range(4):
        for index in range(len(fresh)):
            plain, stored = fresh[(epoch, index)], cached[(epoch, index)]
            for key in ("input_ids", "original_size", "crop_top_left", "target_size", "loss_mask"):
                assert torch.equal(plain[key], stored[key]), (epoch, index, key)
            with torch.no_grad():
                expected = vae.encode(plain["pixel_values"][None]).latent_dist.parameters[0]
            assert stored["latent_dist"].shape == (8, *(side // 8 for side in plain["target_size"].tolist()))
            torch.testing.assert_close(stored["latent_dist"], expected, atol=1e-5, rtol=1e-5)
            flips.add(plain["crop_top_left"].tolist()[1])
    assert len(flips) > 1, "no image was ever flipped"

    # Another bucket for the squares only: their 2 entries are missing, the 4 others are reused.
    changed = _bucketed(**{**vars(args), "aspect_ratio_buckets": "64,96;96,64;48,48", "buckets": None})
    again = script.CaptionedImages(dataset, [tokenizer], changed, RunState(5), **script.survey_images(dataset, changed))
    cache = feature_cache.FeatureCache(changed.feature_cache_dir, "latents",
                                script.latent_cache_settings(vae, torch.float32, changed))
    image_keys = {row: key for row, key in cached.image_keys.items()}
    assert cache.folder == cached.latent_cache.folder
    fingerprints = dict(zip(range(6), map(feature_cache.image_fingerprint, dataset.cast_column(
        "image", __import__("datasets").Image(decode=False))["image"])))
    keys = script.latent_entry_keys(again, fingerprints, changed)
    assert sorted(row for row in range(6) if keys[row] != image_keys[row]) == \
        sorted(row for row in range(6) if again.target_size(row) == (48, 48))
    assert len(cache.missing(keys.values())) == 2


def test_masked_loss_with_an_all_ones_mask_is_the_unmasked_loss(loss_inputs):
    """diffusion_loss normalises by the mask's mean: an all-ones mask gives the unmasked loss exactly (also with
    Min-SNR weights); masking out half of the latent pixels changes it."""
    ones = {**loss_inputs, "batch": {**loss_inputs["batch"], "loss_mask": torch.ones(2, 1, 8, 8)}}
    assert _loss(ones) == _loss(loss_inputs)
    assert _loss(ones, snr_gamma=1.0) == _loss(loss_inputs, snr_gamma=1.0)
    half = torch.ones(2, 1, 8, 8)
    half[..., 4:] = 0
    assert _loss({**loss_inputs, "batch": {**loss_inputs["batch"], "loss_mask": half}}) != \
        pytest.approx(_loss(loss_inputs))


def test_optimizer_choice():
    script = _script()
    params = [torch.nn.Parameter(torch.zeros(4))]
    args = argparse.Namespace(use_8bit_adam=True, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999,
                              adam_weight_decay=1e-2, adam_epsilon=1e-8)
    assert type(script.build_optimizer(args, params)).__name__ == "AdamW8bit"
    args.use_8bit_adam = False
    assert isinstance(script.build_optimizer(args, params), torch.optim.AdamW)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, non-zero exit, no traceback, output_dir untouched (SPEC §7)
# --------------------------------------------------------------------------------------------------------------------

# Checked in-process through the script's own entry point (run_main -> exit status 2): all fail before any model,
# dataset or Accelerator is created.
BAD_ARGUMENTS = {
    "missing model": ({"pretrained_model_name_or_path": "/nonexistent/sd"}, "--pretrained_model_name_or_path"),
    "model folder without unet": ({"pretrained_model_name_or_path": "{empty_dir}"}, "missing tokenizer/"),
    "missing dataset": ({"train_data_dir": None, "dataset_name": "/nonexistent/dataset"}, "--dataset_name"),
    "missing train_data_dir": ({"train_data_dir": "/nonexistent/images"}, "--train_data_dir"),
    "no data at all": ({"train_data_dir": None}, "--train_data_dir"),
    "resolution not a multiple of 8": ({"resolution": 60}, "multiple of 8"),
    "resolution 0": ({"resolution": 0}, "--resolution"),
    "max_train_steps 0": ({"max_train_steps": 0}, "--max_train_steps"),
    "checkpointing_steps 0": ({"checkpointing_steps": 0}, "--checkpointing_steps"),
    "gradient_accumulation_steps 0": ({"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps"),
    "validation_epochs 0": ({"validation_epochs": 0}, "--validation_epochs"),
    "learning_rate -1": ({"learning_rate": -1}, "--learning_rate"),
    "checkpoints_total_limit 0": ({"checkpoints_total_limit": 0}, "--checkpoints_total_limit"),
    "max_train_samples 0": ({"max_train_samples": 0}, "--max_train_samples"),
    "missing checkpoint": ({"resume_from_checkpoint": "checkpoint-999"}, "--resume_from_checkpoint"),
    "wandb with hub token": ({"report_to": "wandb", "hub_token": "hf_secret"}, "--hub_token"),
    "unknown prediction type": ({"prediction_type": "sample"}, "--prediction_type"),
    "dream with v_prediction": ({"dream_training": True, "prediction_type": "v_prediction"}, "--dream_training"),
    "unknown lr scheduler": ({"lr_scheduler": "sometimes"}, "--lr_scheduler"),
    "unknown interpolation": ({"image_interpolation_mode": "fancy"}, "--image_interpolation_mode"),
    "resolution not an int": ({"resolution": "big"}, "--resolution"),
    "cache_latents with a random crop": ({"cache_latents": True}, "--cache_latents needs --center_crop"),
    "feature_cache_dir is a file": ({"cache_text_embeddings": True, "feature_cache_dir": "{a_file}"},
                                    "--feature_cache_dir"),
    # Real datasets (SPEC §9); the bucket flags' cases are in test_text_to_image_sdxl.py
    "proportion_empty_prompts > 1": ({"proportion_empty_prompts": 1.5}, "--proportion_empty_prompts must be in [0, 1]"),
    "masked_loss without any mask": ({"masked_loss": True}, "--masked_loss: none of the 8 images"),
    "malformed bucket list": ({"aspect_ratio_buckets": "64,96;96"}, "--aspect_ratio_buckets"),
}


def _existing_output(tmp_path):
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return str(out), snapshot(str(out))


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_gets_one_line_error(case, tiny_sd, metadata_folder, tmp_path, capsys):
    from trainkit.cli import run_main

    overrides, expected = BAD_ARGUMENTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    overrides = {k: v.format(empty_dir=str(tmp_path / "empty"), a_file=str(tmp_path / "a_file"))
                 if isinstance(v, str) else v for k, v in overrides.items()}
    out, before = _existing_output(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: _script().main(base_args(tiny_sd, metadata_folder, out, **overrides)))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and expected in lines[0], stderr
    assert snapshot(out) == before


def test_wrong_column_in_a_launched_run_gets_one_line_error(tiny_sd, metadata_folder, tmp_path):
    """A data error found after the Accelerator exists (the column checks, also covered in-process above) still
    ends the process with one line, exit status 2, no traceback, output_dir untouched."""
    out, before = _existing_output(tmp_path)
    result = run_python(SCRIPT, base_args(tiny_sd, metadata_folder, out, caption_column="caption"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: --caption_column 'caption'"), result.stderr[-3000:]
    assert "columns: image, text" in last
    assert sum("error:" in line for line in result.stderr.splitlines()) == 1
    assert snapshot(out) == before


def test_broken_model_part_is_named(tiny_sd, tmp_path):
    from trainkit.cli import InputError

    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_sd, broken)
    (broken / "unet" / "config.json").write_text("{ not json")
    args = _script().parse_args(["--pretrained_model_name_or_path", str(broken), "--train_data_dir", str(tmp_path)])
    with pytest.raises(InputError, match=r"--pretrained_model_name_or_path .*broken_model': cannot load unet/"):
        _script().load_models(args)
