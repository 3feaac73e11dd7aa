"""train_text_to_image.py on an SDXL base model: what differs from SD (two text encoders, pooled embedding, time ids
from each image's real size and crop, the VAE rule, the SDXL flags), launched as users launch it, plus in-process
checks of the data, the loss and the bad-input contract. The SD behaviour itself is tested in test_text_to_image.py.
"""

import os
import shutil
import signal

import pytest
import torch
from trainkit import bucketing, families, objectives
from helpers import (
    assert_different_weights,
    assert_one_line_error,
    assert_same_weights,
    checkpoints,
    fail_in_process,
    launch,
    load_weights,
    send_signal_and_wait,
    snapshot,
    start_python,
    train,
    wait_for_path,
)
from test_text_to_image import (  # noqa: F401
    _bucketed,
    _images,
    _namespace,
    base_args,
    metadata_folder,
    tiny_sd,
    txt_folder,
)

SCRIPT = "train_text_to_image.py"
SDXL = families.FAMILIES["sdxl"]


def _script():
    import train_text_to_image

    return train_text_to_image


def _tokenizers(model):
    from transformers import CLIPTokenizer

    return [CLIPTokenizer.from_pretrained(model, subfolder=name) for name in ("tokenizer", "tokenizer_2")]


# --------------------------------------------------------------------------------------------------------------------
# Launched runs
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_sdxl_command_line_runs_unchanged(tiny_sdxl, other_vae, tmp_path):
    """train_text_to_image_sdxl.py's documented command line, only the script name changed (and, on a CPU, no
    fp16/xformers/hub; steps, resolution and checkpoint interval scaled down), with 8-bit Adam and wandb offline:
    trains, checkpoints, logs validation images, and writes a StableDiffusionXLPipeline holding the given VAE that
    loads and generates."""
    import datasets

    data = str(tmp_path / "dataset")
    datasets.Dataset.from_dict(
        {"image": _images(4), "text": ["a photo of a cat", "a red circle", "a blue square", "a photo of a dog"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    ).save_to_disk(data)
    out = str(tmp_path / "sdxl-naruto-model")
    result = train(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_sdxl}", f"--pretrained_vae_model_name_or_path={other_vae}",
        f"--dataset_name={data}", "--resolution=64", "--center_crop", "--random_flip",
        "--proportion_empty_prompts=0.2", "--train_batch_size=1", "--gradient_accumulation_steps=4",
        "--gradient_checkpointing", "--max_train_steps=2", "--use_8bit_adam", "--learning_rate=1e-06",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--report_to=wandb", '--validation_prompt=a cute creature',
        "--validation_epochs", "5", "--checkpointing_steps=1", f"--output_dir={out}",
        # Additions: a seed and 2 denoising steps per validation image, to keep the test fast.
        "--seed=0", "--validation_inference_steps=2",
    ], cwd=str(tmp_path))
    assert "4 examples, 2 epochs of 1 steps, 2 steps in all, batch 1 per device, total batch 4" in result.stderr
    assert "Saved the StableDiffusionXLPipeline" in result.stderr
    assert checkpoints(out) == {"checkpoint-1", "checkpoint-2"}
    # --num_validation_images 4 (upstream default) after epoch 0 and after training; wandb ran offline in cwd.
    for name in ("epoch_0000", "final"):
        assert sorted(os.listdir(os.path.join(out, "validation", name))) == [f"0{i}.png" for i in range(4)]
    assert os.listdir(tmp_path / "wandb")

    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipeline("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()
    # The saved pipeline holds the VAE trained with, not the base pipeline's.
    assert_same_weights(other_vae, os.path.join(out, "vae"))
    assert_different_weights(os.path.join(tiny_sdxl, "unet"), os.path.join(out, "unet"))
    for part in ("text_encoder", "text_encoder_2"):
        base, saved = load_file_of(tiny_sdxl, part), load_file_of(out, part)
        assert all(torch.equal(base[key], saved[key]) for key in base), part
    card = open(os.path.join(out, "README.md")).read()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "stable-diffusion-xl" in card
    assert "a cute creature" in card and other_vae in card


def load_file_of(model, part):
    from safetensors.torch import load_file

    return load_file(os.path.join(model, part, "model.safetensors"))


def sdxl_args(model, data, out, **overrides):
    """SDXL runs at 64 px (8x8 latents), batch 1, random crops and flips, with the SDXL-only flag families on."""
    settings = {"train_batch_size": 1, "random_flip": True, "proportion_empty_prompts": 0.3,
                "timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0, "learning_rate": 1e-4}
    return base_args(model, data, out, **{**settings, **overrides})


def test_exact_resume_with_ema_rotation_and_feature_cache(tiny_sdxl, txt_folder, tmp_path):
    """Accumulation 1, EMA, caption dropout, timestep bias, 5 images at batch 1: 6 steps straight == 4 steps
    (`latest` finds none: a new run) + resume latest to 6, bit for bit; rotation keeps the newest 2 checkpoints
    before and after the resume. The same 6 steps on --cache_latents --cache_text_embeddings (both encoders'
    hidden states and the pooled embedding, each image's size and crop in both orientations) end within fp32
    rounding of the uncached run."""
    settings = {"center_crop": True, "use_ema": True, "checkpointing_steps": 2, "checkpoints_total_limit": 2}
    straight = str(tmp_path / "straight")
    train(SCRIPT, sdxl_args(tiny_sdxl, txt_folder, straight, max_train_steps=6, **settings))
    assert checkpoints(straight) == {"checkpoint-4", "checkpoint-6"}

    resumed = str(tmp_path / "resumed")
    first = train(SCRIPT, sdxl_args(tiny_sdxl, txt_folder, resumed, max_train_steps=4,
                                    resume_from_checkpoint="latest", **settings))
    assert "starting a new run" in first.stderr
    assert checkpoints(resumed) == {"checkpoint-2", "checkpoint-4"}
    second = train(SCRIPT, sdxl_args(tiny_sdxl, txt_folder, resumed, max_train_steps=6,
                                     resume_from_checkpoint="latest", **settings))
    assert f"Resuming from {os.path.join(resumed, 'checkpoint-4')}" in second.stderr
    assert checkpoints(resumed) == {"checkpoint-4", "checkpoint-6"}
    for folder in ("checkpoint-6/unet", "checkpoint-6/unet_ema", "unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))

    cached = str(tmp_path / "cached")
    result = train(SCRIPT, sdxl_args(tiny_sdxl, txt_folder, cached, max_train_steps=6, cache_latents=True,
                                     cache_text_embeddings=True, feature_cache_dir=str(tmp_path / "cache"),
                                     **settings))
    # 5 images; captions: cat, dog, an uncaptioned image's "" (also the dropped caption) -> 3 distinct.
    assert "latents: 0 of 5 cached" in result.stderr and "text_embeddings: 0 of 3 cached" in result.stderr
    # The VAE and text encoders see other batch shapes when filling the cache (latents differ by ~2e-6), and Adam
    # divides by the root of the squared gradients: where a gradient is near zero, that rounding becomes a visible
    # step. So: all but a handful of weights within 2e-6, and none off by a quarter of one step (lr 1e-4).
    for folder in ("unet", "unet_raw"):
        expected, got = load_weights(os.path.join(straight, folder)), load_weights(os.path.join(cached, folder))
        differences = torch.cat([(got[name] - value).abs().flatten() for name, value in expected.items()])
        assert (differences > 2e-6).sum() <= 1e-4 * differences.numel() and differences.max() < 2.5e-5, folder
    assert_different_weights(os.path.join(cached, "unet_raw"), os.path.join(tiny_sdxl, "unet"))


def test_sigterm_with_accumulation_saves_and_latest_resumes_exactly(tiny_sdxl, metadata_folder, tmp_path):
    """Accumulation 2, EMA, random crops (each sample's own crop in its time ids): SIGTERM -> a checkpoint at the
    stop step and exit 143; resume latest == straight, bit for bit."""
    settings = {"gradient_accumulation_steps": 2, "use_ema": True, "max_train_steps": 30, "checkpointing_steps": 2,
                "lr_scheduler": "linear"}
    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, sdxl_args(tiny_sdxl, metadata_folder, interrupted, **settings))
    wait_for_path(os.path.join(interrupted, "checkpoint-2"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(interrupted))
    assert 2 <= stop_step < 30, "the signal arrived after the run had finished: the test needs more steps"

    train(SCRIPT, sdxl_args(tiny_sdxl, metadata_folder, interrupted, resume_from_checkpoint="latest", **settings))
    straight = str(tmp_path / "straight")
    train(SCRIPT, sdxl_args(tiny_sdxl, metadata_folder, straight, **settings))
    for folder in ("unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(interrupted, folder))


def test_two_processes_fill_the_cache_together_and_resume_exactly_from_it(tiny_sdxl, other_vae, txt_folder,
                                                                           tmp_path):
    """CPU DDP over gloo: the two ranks split the cache filling (latents of --pretrained_vae_model_name_or_path's
    VAE, which validation then loads again); validation images of --validation_prompt split across the ranks; a run
    resuming checkpoint-2 in another folder reuses every entry, rewrites none, and ends bit for bit like the first."""
    cache = str(tmp_path / "cache")
    settings = {"center_crop": True, "max_train_steps": 4, "checkpointing_steps": 2, "use_ema": True,
                "cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": cache,
                "validation_prompt": "a red circle", "num_validation_images": 3,
                "pretrained_vae_model_name_or_path": other_vae}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, sdxl_args(tiny_sdxl, txt_folder, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    cache_lines = [line for line in result.stderr.splitlines() if " cached in " in line]
    assert "latents: 0 of 5 cached" in result.stderr and "text_embeddings: 0 of 3 cached" in result.stderr, cache_lines
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert sorted(os.listdir(os.path.join(straight, "validation", "final"))) == ["00.png", "01.png", "02.png"]
    entries = {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
               for root, _, files in os.walk(cache) for name in files if name.endswith(".safetensors")}
    assert len(entries) == 5 + 3

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch(SCRIPT, sdxl_args(tiny_sdxl, txt_folder, resumed, resume_from_checkpoint="checkpoint-2",
                                      **settings), num_processes=2)
    assert "latents: 5 of 5 cached" in result.stderr and "text_embeddings: 3 of 3 cached" in result.stderr
    assert {path: os.stat(path).st_mtime_ns for path in entries} == entries
    for folder in ("checkpoint-4/unet", "checkpoint-4/unet_ema", "unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))
    assert_same_weights(other_vae, os.path.join(straight, "vae"))


def test_buckets_with_masks_and_feature_cache_resume_exactly_and_generate_non_square(tiny_sdxl, mixed_aspect_folder,
                                                                                      tmp_path):
    """--use_aspect_ratio_buckets --bucket_divisibility 16 at 64 px (buckets 48x80, 80x48, 64x64 and, for the
    40x40 image, 32x32: 4 batches of up to 2 per epoch) with --masked_loss, --cache_latents --cache_text_embeddings,
    centre crops and flips, accumulation 1: the cache holds each image at its bucket size, both orientations and the
    latent-grid masks; 6 steps straight == checkpoint-3 (mid-epoch) resumed to 6 on the cache, bit for bit; the
    output StableDiffusionXLPipeline generates at 64x96."""
    cache = str(tmp_path / "cache")
    settings = {"use_aspect_ratio_buckets": True, "bucket_divisibility": 16, "masked_loss": True, "center_crop": True,
                "cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": cache,
                "train_batch_size": 2, "max_train_steps": 6, "checkpointing_steps": 3}
    straight = str(tmp_path / "straight")
    result = train(SCRIPT, sdxl_args(tiny_sdxl, mixed_aspect_folder, straight, **settings))
    assert "6 examples, 2 epochs of 4 steps, 6 steps in all" in result.stderr
    assert "latents: 0 of 6 cached" in result.stderr
    from safetensors.torch import load_file

    entries = [load_file(os.path.join(root, name)) for root, _, files in os.walk(os.path.join(cache, "latents"))
               for name in files if name.endswith(".safetensors")]
    assert sorted(tuple(entry["latent_dist"].shape) for entry in entries) == [
        (8, 4, 4), (8, 6, 10), (8, 6, 10), (8, 8, 8), (8, 10, 6), (8, 10, 6)]
    for entry in entries:
        grid = entry["latent_dist"].shape[1:]
        assert entry["flipped"].shape == entry["latent_dist"].shape
        assert entry["loss_mask"].shape == entry["flipped_loss_mask"].shape == (1, *grid)
        assert torch.equal(entry["flipped_loss_mask"], entry["loss_mask"].flip(-1))

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(straight, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    result = train(SCRIPT, sdxl_args(tiny_sdxl, mixed_aspect_folder, resumed, resume_from_checkpoint="latest",
                                     **settings))
    assert "latents: 6 of 6 cached" in result.stderr
    for folder in ("checkpoint-6/unet", "unet"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))
    assert_different_weights(os.path.join(tiny_sdxl, "unet"), os.path.join(straight, "unet"))

    from diffusers import StableDiffusionXLPipeline

    image = StableDiffusionXLPipeline.from_pretrained(straight)(
        "a wide shape", num_inference_steps=2, height=64, width=96, output_type="np",
        generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 96, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_deepspeed_zero2_trains_checkpoints_and_resumes_exactly(tiny_sdxl, metadata_folder, tmp_path):
    from test_distributed import assert_deepspeed_run_resumes_exactly

    straight = assert_deepspeed_run_resumes_exactly(
        SCRIPT, lambda out, **flags: sdxl_args(tiny_sdxl, metadata_folder, out, **flags), "unet", "unet", tmp_path,
        "7 examples, 2 epochs of 2 steps, 4 steps in all, batch 1 per device, total batch 4")
    assert os.path.isfile(os.path.join(straight, "text_encoder_2", "model.safetensors"))


# --------------------------------------------------------------------------------------------------------------------
# In-process: defaults, data, loss
# --------------------------------------------------------------------------------------------------------------------


def test_an_sdxl_model_switches_the_script_and_its_upstream_defaults(tiny_sdxl, tiny_sd):
    script = _script()
    sdxl = script.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", "x"])
    assert sdxl.family is SDXL
    assert (sdxl.resolution, sdxl.output_dir, sdxl.validation_epochs, sdxl.tracker_project_name) == (
        1024, "sdxl-model-finetuned", 1, "text2image-fine-tune-sdxl")
    sd = script.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", "x"])
    assert sd.family is families.FAMILIES["sd"]
    assert (sd.resolution, sd.output_dir, sd.validation_epochs, sd.tracker_project_name) == (
        512, "sd-model-finetuned", 5, "text2image-fine-tune")
    given = script.parse_args(["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", "x",
                               "--resolution", "64", "--validation_epochs", "3"])
    assert (given.resolution, given.validation_epochs) == (64, 3)
    # --validation_prompts (SD) and --validation_prompt x --num_validation_images (SDXL) both render.
    assert script.validation_prompts(_namespace(validation_prompts=["a", "b"], validation_prompt="c",
                                                num_validation_images=2)) == ["a", "b", "c", "c"]
    assert script.validation_prompts(_namespace(validation_prompts=None, validation_prompt=None,
                                                num_validation_images=4)) == []


def test_time_ids_come_from_each_images_real_size_and_crop(tiny_sdxl, metadata_folder):
    """Each example holds its image's original (height, width) and the (top, left) of its random crop in the resized
    image (seen in the mirror when flipped): the pixels are exactly that crop, and both vary from image to image and
    epoch to epoch."""
    from PIL import Image

    from trainkit.randomness import RunState

    script = _script()
    dataset = script.load_captioned_dataset(_namespace(train_data_dir=metadata_folder))
    train_set = script.CaptionedImages(dataset, _tokenizers(tiny_sdxl), _namespace(family=SDXL), RunState(seed=3))
    sizes, crops = set(), set()
    for epoch in range(4):
        for index in range(len(train_set)):
            item = train_set[(epoch, index)]
            image = dataset[index]["image"].convert("RGB")
            assert item["original_size"].tolist() == [image.height, image.width]
            resized = image.resize(script.resized_size(image.width, image.height, 64), resample=Image.LANCZOS)
            top, left = item["crop_top_left"].tolist()
            views = [resized, resized.transpose(Image.FLIP_LEFT_RIGHT)]
            pixels = [script.preprocess_image(view.crop((left, top, left + 64, top + 64)), 64, Image.LANCZOS, True,
                                              False, None)[0] for view in views]
            assert any(torch.equal(item["pixel_values"], candidate) for candidate in pixels), (epoch, index)
            sizes.add(tuple(item["original_size"].tolist()))
            crops.add((top, left))
    assert len(sizes) == 3 and len(crops) > 5
    assert len(item["input_ids"]) == len(item["input_ids_2"]) == 77


def test_bucketed_time_ids_carry_the_true_size_the_real_crop_and_the_bucket(tiny_sdxl, mixed_aspect_folder):
    """With generated buckets, random crops and flips: each example is its bucket's shape, holds its image's true
    (height, width), the (top, left) of its crop in the resized image (the pixels are exactly that crop, maybe
    mirrored) and its bucket as the target size; the UNet's time ids are those rows."""
    from PIL import Image
    from torch.utils.data import default_collate

    from trainkit.randomness import RunState

    script = _script()
    args = _bucketed(train_data_dir=mixed_aspect_folder, use_aspect_ratio_buckets=True, bucket_divisibility=16,
                     family=SDXL)
    dataset = script.load_captioned_dataset(args)
    layout = script.survey_images(dataset, args)
    train_set = script.CaptionedImages(dataset, _tokenizers(tiny_sdxl), args, RunState(seed=3), **layout)
    crops = set()
    for epoch in range(3):
        for index in range(len(train_set)):
            item = train_set[(epoch, index)]
            image = dataset[index]["image"].convert("RGB")
            bucket = layout["buckets"][index]
            assert item["original_size"].tolist() == [image.height, image.width]
            assert item["target_size"].tolist() == list(bucket) and item["pixel_values"].shape == (3, *bucket)
            resized = image.resize(bucketing.cover_size(image.width, image.height, *bucket), resample=Image.LANCZOS)
            top, left = item["crop_top_left"].tolist()
            views = [resized, resized.transpose(Image.FLIP_LEFT_RIGHT)]
            pixels = [script.preprocess_image(view.crop((left, top, left + bucket[1], top + bucket[0])), bucket,
                                              Image.LANCZOS, True, False, None).pixels for view in views]
            assert any(torch.equal(item["pixel_values"], candidate) for candidate in pixels), (epoch, index)
            crops.add((top, left))
    assert len(crops) > 3
    batch = default_collate([train_set[(0, index)] for index in range(len(train_set))
                             if layout["buckets"][index] == (48, 80)])
    time_ids = script.added_conditions(batch, torch.zeros(2, 32), args)["time_ids"]
    assert time_ids.tolist() == torch.cat([batch["original_size"], batch["crop_top_left"],
                                           torch.tensor([[48, 80], [48, 80]])], dim=1).tolist()


def test_proportion_empty_prompts_drops_captions_from_restorable_randomness(tiny_sdxl, metadata_folder):
    """--proportion_empty_prompts p: each (seed, epoch, index) trains with an empty caption with probability p, the
    same on every call (resume, workers), while the crops and flips stay those of a run without it."""
    from trainkit.randomness import RunState

    script = _script()
    dataset = script.load_captioned_dataset(_namespace(train_data_dir=metadata_folder))
    tokenizers = _tokenizers(tiny_sdxl)
    empty = [ids[0] for ids in SDXL.tokenize(tokenizers, "")]
    keys = [(epoch, index) for epoch in range(20) for index in range(7)]

    def dropped(proportion):
        train_set = script.CaptionedImages(dataset, tokenizers,
                                           _namespace(family=SDXL, proportion_empty_prompts=proportion),
                                           RunState(seed=3))
        items = [train_set[key] for key in keys]
        return [torch.equal(item["input_ids"], empty[0]) and torch.equal(item["input_ids_2"], empty[1])
                for item in items], items

    never, plain = dropped(0.0)
    always, _ = dropped(1.0)
    half, items = dropped(0.5)
    assert not any(never) and all(always)
    assert 0.35 < sum(half) / len(half) < 0.65
    assert dropped(0.5)[0] == half
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(plain, items))


@pytest.fixture(scope="module")
def sdxl_loss_inputs(tiny_sdxl):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    input_ids = SDXL.tokenize(_tokenizers(tiny_sdxl), ["a photo of a cat", "a dog"])
    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae"),
        "text_encoders": [CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
                          CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")],
        "scheduler_config": DDPMScheduler.load_config(tiny_sdxl, subfolder="scheduler"),
        "batch": {
            "pixel_values": torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1,
            "input_ids": input_ids[0], "input_ids_2": input_ids[1],
            "original_size": torch.tensor([[20, 24], [64, 80]]), "crop_top_left": torch.tensor([[0, 0], [0, 8]]),
        },
    }


def _sdxl_loss(inputs, batch=None, weights=None, **flags):
    from diffusers import DDPMScheduler

    return _script().training_loss(
        inputs["unet"], inputs["vae"], inputs["text_encoders"], DDPMScheduler.from_config(inputs["scheduler_config"]),
        batch or inputs["batch"], torch.Generator().manual_seed(7), _namespace(family=SDXL, **flags), torch.float32,
        inputs["vae"].config.scaling_factor, weights).item()


def test_sdxl_loss_uses_every_samples_time_ids_and_the_sd_flag_families(sdxl_loss_inputs):
    baseline = _sdxl_loss(sdxl_loss_inputs)
    assert baseline == _sdxl_loss(sdxl_loss_inputs)
    # Another original size or crop for one sample changes its time ids, and so the loss.
    for key, value in (("original_size", [[20, 24], [64, 81]]), ("crop_top_left", [[0, 0], [0, 7]])):
        batch = {**sdxl_loss_inputs["batch"], key: torch.tensor(value)}
        assert _sdxl_loss(sdxl_loss_inputs, batch) != pytest.approx(baseline), key
    # DREAM's extra forward pass gets the added conditions too; Min-SNR and the timestep bias apply.
    for flags in ({"dream_training": True}, {"snr_gamma": 1e-3}, {"noise_offset": 0.5}):
        assert _sdxl_loss(sdxl_loss_inputs, **flags) != pytest.approx(baseline), flags
    later = objectives.timestep_bias_weights("later", 1000, multiplier=10.0, portion=0.1)
    assert _sdxl_loss(sdxl_loss_inputs, weights=later) != pytest.approx(baseline)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, output_dir untouched, before any model loads (SPEC §7)
# --------------------------------------------------------------------------------------------------------------------

BAD_ARGUMENTS = {
    "bias range begin >= end": ({"timestep_bias_strategy": "range", "timestep_bias_begin": 600,
                                 "timestep_bias_end": 400}, ["--timestep_bias_begin < --timestep_bias_end"]),
    "bias portion 0": ({"timestep_bias_portion": 0}, ["--timestep_bias_portion must be in (0, 1]"]),
    "bias portion > 1": ({"timestep_bias_strategy": "later", "timestep_bias_portion": 1.5},
                         ["--timestep_bias_portion", "1.5"]),
    "bias multiplier 0": ({"timestep_bias_strategy": "earlier", "timestep_bias_multiplier": 0},
                          ["--timestep_bias_multiplier must be > 0"]),
    "unknown bias strategy": ({"timestep_bias_strategy": "middle"}, ["--timestep_bias_strategy", "middle"]),
    "empty prompts > 1": ({"proportion_empty_prompts": 1.5}, ["--proportion_empty_prompts must be in [0, 1]"]),
    "empty prompts < 0": ({"proportion_empty_prompts": -0.1}, ["--proportion_empty_prompts", "-0.1"]),
    "missing VAE": ({"pretrained_vae_model_name_or_path": "/nonexistent/vae"},
                    ["--pretrained_vae_model_name_or_path", "/nonexistent/vae", "does not exist"]),
    "VAE folder without config": ({"pretrained_vae_model_name_or_path": "{empty_dir}"},
                                  ["--pretrained_vae_model_name_or_path", "not a VAE folder"]),
    "empty validation prompt": ({"validation_prompt": " "}, ["--validation_prompt is empty"]),
    "NPU flash attention without torch_npu": ({"enable_npu_flash_attention": True},
                                              ["--enable_npu_flash_attention", "torch_npu"]),
    "negative num_validation_images": ({"num_validation_images": -1}, ["--num_validation_images must be >= 0"]),
    "SDXL folder without text_encoder_2": ({"pretrained_model_name_or_path": "{broken_sdxl}"},
                                           ["--pretrained_model_name_or_path", "missing text_encoder_2/"]),
    # Real datasets (SPEC §9)
    "malformed bucket list": ({"aspect_ratio_buckets": "64x96"}, ["--aspect_ratio_buckets", "64x96"]),
    "bucket side not a multiple of 8": ({"aspect_ratio_buckets": "64,96;60,64"}, ["60,64", "multiple of 8"]),
    "bucket_min_resolution > resolution": ({"use_aspect_ratio_buckets": True, "bucket_min_resolution": 128},
                                           ["--bucket_min_resolution (128) must be <= --resolution (64)"]),
    "bucket list with bucket_min_resolution": ({"aspect_ratio_buckets": "64,64", "bucket_min_resolution": 32},
                                               ["--bucket_min_resolution", "--aspect_ratio_buckets"]),
    "bucket_divisibility without buckets": ({"bucket_divisibility": 32}, ["--bucket_divisibility applies only"]),
    "validation_width not a multiple of 8": ({"validation_width": 90}, ["--validation_width", "multiple of 8"]),
    "masked_loss without any mask": ({"masked_loss": True},
                                     ["--masked_loss: none of the 5 images", "txt_folder", "name.mask.png",
                                      "alpha channels"]),
    "mask of the wrong size": ({"masked_loss": True, "train_data_dir": "{wrong_mask}"},
                               ["--masked_loss:", "land_0.mask.png is 48x32 but its image", "96x64"]),
    "mask_column without masked_loss": ({"mask_column": "mask"}, ["--mask_column applies only with --masked_loss"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_gets_one_line_error_before_loading(case, tiny_sdxl, txt_folder, tmp_path, capsys, request):
    from PIL import Image

    overrides, expected = BAD_ARGUMENTS[case]
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken_sdxl"  # an SDXL model_index.json, every part but text_encoder_2/
    broken.mkdir()
    shutil.copy(os.path.join(tiny_sdxl, "model_index.json"), broken)
    for part in set(SDXL.parts) - {"text_encoder_2"}:
        (broken / part).mkdir()
    if "{wrong_mask}" in overrides.values():
        wrong_mask = tmp_path / "wrong_mask"  # the mixed-aspect images, one mask at half its image's size
        shutil.copytree(request.getfixturevalue("mixed_aspect_folder"), wrong_mask)
        mask = wrong_mask / "land_0.mask.png"
        Image.open(mask).resize((48, 32)).save(mask)
    overrides = {key: value.format(empty_dir=tmp_path / "empty", broken_sdxl=broken, wrong_mask=tmp_path / "wrong_mask")
                 if isinstance(value, str) else value for key, value in overrides.items()}
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    status, stderr = fail_in_process("train_text_to_image", sdxl_args(tiny_sdxl, txt_folder, str(out), **overrides),
                                     capsys)
    assert status == 2
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before
