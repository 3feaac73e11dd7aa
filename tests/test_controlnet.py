"""train_controlnet.py, launched as users launch it (plus in-process checks of the ControlNet initialisation and of
the paired image preprocessing)."""

import json
import os
import random
import shutil
import signal
from argparse import Namespace

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import MIXED_ASPECT_BUCKETS
from helpers import (
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

SCRIPT = "train_controlnet.py"
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "cyan": (0, 200, 200),
          "brown": (120, 70, 20), "yellow": (230, 210, 40)}


def fill_example(rng, width, height=None):
    """A fill50k-style example: a filled circle on a coloured background, its outline as the conditioning image,
    and a caption naming both colours."""
    height = height or width
    circle, background = rng.sample(sorted(COLORS), 2)
    radius = rng.randint(min(width, height) // 6, min(width, height) // 3)
    x, y = rng.randint(radius, width - radius), rng.randint(radius, height - radius)
    box = (x - radius, y - radius, x + radius, y + radius)
    image = Image.new("RGB", (width, height), COLORS[background])
    ImageDraw.Draw(image).ellipse(box, fill=COLORS[circle])
    conditioning = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(conditioning).ellipse(box, outline=(255, 255, 255), width=2)
    return image, conditioning, f"{circle} circle with {background} background"


def write_parquet_dataset(folder, count, seed, size=(28, 24), list_captions=False):
    import datasets

    examples = [fill_example(random.Random(seed * 1000 + i), *size) for i in range(count)]
    captions = [[text, "a picture of a circle"] if list_captions else text for _, _, text in examples]
    caption_feature = [datasets.Value("string")] if list_captions else datasets.Value("string")
    dataset = datasets.Dataset.from_dict(
        {"image": [e[0] for e in examples], "conditioning_image": [e[1] for e in examples], "text": captions},
        features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                    "text": caption_feature}),
    )
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    dataset.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    return examples


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="module")
def fill_folder(tmp_path_factory):
    """An imagefolder: metadata.jsonl names the target (file_name), the conditioning image by its path in the
    `conditioning_image` column, and the caption. 7 good examples and one whose target image is corrupt."""
    folder = tmp_path_factory.mktemp("fill_folder")
    os.makedirs(folder / "conditioning")
    rows = []
    for index in range(7):
        image, conditioning, text = fill_example(random.Random(index), 24)
        image.save(folder / f"{index}.png")
        conditioning.save(folder / "conditioning" / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "conditioning_image": f"conditioning/{index}.png", "text": text})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.append({"file_name": "corrupt.png", "conditioning_image": "conditioning/0.png", "text": "red circle"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


@pytest.fixture(scope="module")
def fill_parquet(tmp_path_factory):
    """A local dataset folder (parquet), 6 non-square examples with lists of captions: random crops, caption choice
    and prompt dropout all have something to choose."""
    folder = tmp_path_factory.mktemp("fill_parquet")
    write_parquet_dataset(str(folder), 6, seed=7, list_captions=True)
    return str(folder)


@pytest.fixture(scope="module")
def validation_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("validation")
    paths = []
    for index in range(2):
        path = str(folder / f"conditioning_{index}.png")
        fill_example(random.Random(100 + index), 32)[1].save(path)
        paths.append(path)
    return paths


def write_paired_folder(mixed_aspect_folder, folder):
    """An imagefolder of the mixed-aspect images (landscape, portrait, square with an alpha mask, small) with their
    masks beside them, each paired with a colour-inverted conditioning image of its size (conditioning/name.png) and
    its caption in metadata.jsonl. Returns {file_name: (height, width)}."""
    from PIL import ImageOps

    os.makedirs(os.path.join(folder, "conditioning"), exist_ok=True)
    rows, sizes = [], {}
    for name in sorted(os.listdir(mixed_aspect_folder)):
        if not name.endswith(".png") or name.endswith(".mask.png"):
            continue
        stem = name[:-len(".png")]
        shutil.copy(os.path.join(mixed_aspect_folder, name), os.path.join(folder, name))
        if os.path.isfile(os.path.join(mixed_aspect_folder, f"{stem}.mask.png")):
            shutil.copy(os.path.join(mixed_aspect_folder, f"{stem}.mask.png"), os.path.join(folder, f"{stem}.mask.png"))
        image = Image.open(os.path.join(folder, name))
        ImageOps.invert(image.convert("RGB")).save(os.path.join(folder, "conditioning", name))
        caption = open(os.path.join(mixed_aspect_folder, f"{stem}.txt")).read().strip()
        rows.append({"file_name": name, "conditioning_image": f"conditioning/{name}", "text": caption})
        sizes[name] = (image.height, image.width)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as file:
        file.write("".join(json.dumps(row) + "\n" for row in rows))
    return sizes


@pytest.fixture(scope="module")
def paired_folder(mixed_aspect_folder, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("paired_mixed"))
    write_paired_folder(mixed_aspect_folder, folder)
    return folder


def base_args(model, output_dir, data=None, parquet=None, **overrides):
    """Tiny, fast settings: 64 px (8x8 latents), batch 2, constant LR after 1 warmup step."""
    args = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "dataset_name": parquet,
        "resolution": 64,
        "output_dir": output_dir,
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 1,
        "seed": 0,
        "logging_steps": 1,
        "validation_inference_steps": 2,
    }
    args.update(overrides)
    flags = []
    for key, value in args.items():
        if value is True:
            flags.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            flags += [f"--{key}"] + [str(item) for item in value]
        elif value is not None and value is not False:
            flags += [f"--{key}", str(value)]
    return flags


def controlnet_weights(folder):
    return load_weights(folder)


def test_trains_and_output_drives_controlnet_pipeline(tiny_sd, fill_folder, validation_images, tmp_path):
    out = str(tmp_path / "out")
    result = launch(SCRIPT, base_args(
        tiny_sd, out, data=fill_folder, max_train_steps=4, checkpointing_steps=2, validation_steps=2,
        validation_prompt=["red circle with blue background", "green circle with yellow background"],
        validation_image=validation_images[:1], num_validation_images=2,
    ))

    # The corrupt target image is skipped by name; 7 examples remain (4 batches of 2 per epoch).
    assert "Skipping unreadable image" in result.stderr and "corrupt.png" in result.stderr
    assert "7 examples" in result.stderr
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "README.md", "images_0.png", "images_1.png",
                 "checkpoint-2/controlnet/config.json", "checkpoint-4/controlnet/diffusion_pytorch_model.safetensors"):
        assert os.path.isfile(os.path.join(out, name)), name
    card = open(os.path.join(out, "README.md")).read()
    assert "controlnet" in card and "ControlNetModel.from_pretrained" in card
    assert "red circle with blue background" in card

    # One image prompt for two prompts (N:1): a grid per pair (conditioning + 2 images) at steps 2, 4 and at the end.
    for name in ("step_000002", "step_000004", "final"):
        for pair in (0, 1):
            grid = Image.open(os.path.join(out, "validation", name, f"pair_{pair:02d}.png"))
            assert grid.size == (3 * 64, 64), (name, grid.size)

    # The final weights are the step-4 weights, and training moved the zero convolutions off zero.
    assert_same_weights(os.path.join(out, "checkpoint-4", "controlnet"), out)
    weights = controlnet_weights(out)
    zero_convs = [key for key in weights if key.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero_convs and any(weights[key].abs().sum() > 0 for key in zero_convs)

    # TensorBoard received the loss curve and the validation images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs", "train_controlnet"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    tags = events.Tags()["images"]
    assert any(tag.startswith("validation/0") for tag in tags) and any(tag.startswith("test/1") for tag in tags)

    # The output is a ControlNet that drives StableDiffusionControlNetPipeline, and it changes what the UNet makes.
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    controlnet = ControlNetModel.from_pretrained(out)
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd, controlnet=controlnet, safety_checker=None,
                                                                 requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    conditioning = Image.open(validation_images[0]).convert("RGB")
    images = pipeline("red circle", conditioning, num_inference_steps=2, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    without = plain("red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert not (images == without).all()


def test_controlnet_from_unet_starts_with_zero_convolutions(tiny_sd):
    """An untrained ControlNet initialised from the UNet copies its encoder, and its zero convolutions make the UNet's
    output exactly what it is without a ControlNet."""
    from diffusers import UNet2DConditionModel

    import train_controlnet

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    controlnet = train_controlnet.build_controlnet(Namespace(controlnet_model_name_or_path=None), unet)
    assert controlnet.dtype == torch.float32
    assert torch.equal(controlnet.conv_in.weight, unet.conv_in.weight)
    zero_convs = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]
    assert all(torch.count_nonzero(p) == 0 for conv in zero_convs for p in conv.parameters())

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    condition = torch.rand(2, 3, 64, 64, generator=generator)
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        down, mid = controlnet(latents, timesteps, text, controlnet_cond=condition, return_dict=False)
        controlled = unet(latents, timesteps, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        plain = unet(latents, timesteps, text).sample
    assert torch.equal(controlled, plain)


@pytest.mark.parametrize("flags, recomputed", [
    ((), set()),
    (("--gradient_checkpointing",), {"controlnet"}),  # upstream's flag, upstream's meaning
    (("--gradient_checkpointing", "--gradient_checkpointing_unet"), {"controlnet", "unet"}),
    (("--gradient_checkpointing_unet",), {"unet"}),
])
def test_gradient_checkpointing_recomputes_the_controlnet_and_the_frozen_unet_only_on_request(
        flags, recomputed, tiny_sd, tmp_path):
    """--gradient_checkpointing recomputes the ControlNet's activations in the backward pass, as upstream's does, and
    not the frozen UNet's; --gradient_checkpointing_unet adds the UNet's. A recomputed block runs its forward a second
    time during backward. The gradients are those of a run without checkpointing, bit for bit."""
    from diffusers import UNet2DConditionModel

    import train_controlnet

    def training_step(flags):
        args = train_controlnet.parse_args(base_args(tiny_sd, str(tmp_path / "out")) + list(flags))
        unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
        controlnet = train_controlnet.build_controlnet(args, unet)
        unet.requires_grad_(False)
        controlnet.train()
        train_controlnet.enable_gradient_checkpointing(args, controlnet, unet)
        # Calls counted as they start: a recomputation stops as soon as it has what backward needs.
        calls = {"controlnet": 0, "unet": 0}
        blocks = {"controlnet": controlnet.down_blocks[0].resnets[0], "unet": unet.up_blocks[-1].resnets[0]}
        for name, block in blocks.items():
            block.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        text = torch.randn(2, 77, 32, generator=generator)
        condition = torch.rand(2, 3, 64, 64, generator=generator)
        timesteps = torch.tensor([10, 500])
        down, mid = controlnet(latents, timesteps, text, controlnet_cond=condition, return_dict=False)
        prediction = unet(latents, timesteps, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        prediction.square().mean().backward()
        return {name for name, count in calls.items() if count == 2}, calls, \
            {name: p.grad for name, p in controlnet.named_parameters()}

    found, calls, gradients = training_step(flags)
    assert found == recomputed and set(calls.values()) <= {1, 2}, calls
    if flags:
        _, plain_calls, plain = training_step(())
        assert set(plain_calls.values()) == {1}
        assert gradients.keys() == plain.keys()
        assert all(torch.equal(gradients[name], plain[name]) for name in plain), "checkpointing changed the gradients"


def test_image_and_conditioning_image_get_the_same_crop_and_flip():
    """Target in [-1, 1], conditioning in [0, 1], cropped and flipped identically; the random choices are a function
    of the generator's seed alone (restorable)."""
    import train_controlnet

    image = Image.effect_noise((48, 32), 60).convert("RGB")
    for seed in range(6):
        target, conditioning = train_controlnet.preprocess_pair(
            image, image.copy(), 16, True, True, torch.Generator().manual_seed(seed))
        assert target.shape == conditioning.shape == (3, 16, 16)
        assert target.min() >= -1 and target.max() <= 1 and conditioning.min() >= 0 and conditioning.max() <= 1
        assert torch.allclose((target + 1) / 2, conditioning, atol=1e-6)
    crops = {train_controlnet.preprocess_pair(image, image, 16, True, True, torch.Generator().manual_seed(s))[1]
             .sum().item() for s in range(6)}
    assert len(crops) > 1, "random crops/flips never changed"
    again = train_controlnet.preprocess_pair(image, image, 16, True, True, torch.Generator().manual_seed(3))
    first = train_controlnet.preprocess_pair(image, image, 16, True, True, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], first[0])

    # --proportion_empty_prompts: 0 keeps every caption, 1 drops every caption, 0.5 drops about half, restorably.
    pick = train_controlnet.pick_caption
    assert all(pick("a cat", 0, torch.Generator().manual_seed(s)) == "a cat" for s in range(20))
    assert all(pick("a cat", 1, torch.Generator().manual_seed(s)) == "" for s in range(20))
    halves = [pick(["a", "b"], 0.5, torch.Generator().manual_seed(s)) for s in range(200)]
    assert 60 < halves.count("") < 140 and {"a", "b"} <= set(halves)
    assert halves == [pick(["a", "b"], 0.5, torch.Generator().manual_seed(s)) for s in range(200)]


class _OneProcess:
    """What FeatureCache.fill and the cache functions use of an Accelerator, for one CPU process."""

    device, process_index, num_processes, is_main_process = torch.device("cpu"), 0, 1, True

    def wait_for_everyone(self):
        pass


def test_cached_examples_equal_fresh_encodings(tiny_sd, fill_parquet, tmp_path):
    """In-process, on a random subset with list captions, random flips and prompt dropout: every cached example holds
    what the VAE and the text encoder make of the uncached example (the flipped latents exactly when the uncached
    example is flipped, the empty prompt's embedding when it is dropped) and the same conditioning pixels; the
    target image column is no longer read."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    import train_controlnet as script
    from trainkit import families
    from trainkit.randomness import RunState

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    args = Namespace(dataset_name=fill_parquet, train_data_dir=None, dataset_config_name=None, cache_dir=None,
                     image_column="image", conditioning_image_column="conditioning_image", caption_column="text",
                     resolution=64, random_crop=False, random_flip=True, proportion_empty_prompts=0.4,
                     image_interpolation_mode=None,
                     max_train_samples=5, feature_cache_dir=str(tmp_path / "cache"), train_batch_size=2,
                     family=families.FAMILIES["sd"])
    examples = script.load_controlnet_dataset(args)
    fresh = script.ControlNetExamples(examples, tokenizer, args, RunState(3))
    cached = script.ControlNetExamples(examples, tokenizer, args, RunState(3))
    script.cache_latents(_OneProcess(), cached, vae, args, torch.float32)
    script.cache_text_embeddings(_OneProcess(), cached, text_encoder, args, torch.float32)
    assert "image" not in cached.dataset.column_names

    flips, empty = set(), 0
    with torch.no_grad():
        for epoch in range(3):
            for index in range(len(fresh)):
                expected, example = fresh[(epoch, index)], cached[(epoch, index)]
                assert torch.equal(example["conditioning_pixel_values"], expected["conditioning_pixel_values"])
                latent_dist = vae.encode(expected["pixel_values"][None]).latent_dist.parameters[0]
                torch.testing.assert_close(example["latent_dist"], latent_dist, rtol=1e-5, atol=1e-5)
                hidden = text_encoder(expected["input_ids"][None], return_dict=False)[0][0]
                torch.testing.assert_close(example["encoder_hidden_states"], hidden, rtol=1e-5, atol=1e-5)
                entry = cached.latent_cache.load(cached.image_keys[cached._row(index)])
                flips.add(torch.equal(example["latent_dist"], entry["flipped"]))
                empty += tokenizer.decode(expected["input_ids"], skip_special_tokens=True) == ""
    assert flips == {False, True} and 0 < empty < 15, (flips, empty)


def test_resume_is_exact(tiny_sd, fill_parquet, validation_images, tmp_path):
    """N steps straight == resume from a mid-epoch checkpoint + the rest, bit for bit, with gradient accumulation,
    random crops and flips, list captions, prompt dropout, a random subset, Min-SNR, offset noise, v-prediction,
    gradient checkpointing and freed gradients, and validation images rendered in between (they must not disturb
    training)."""
    # A random subset of 5 samples at batch 2 -> 3 batches -> 2 steps per epoch with accumulation 2: 5 steps,
    # checkpoint 3 (mid epoch 2).
    total, half = 5, 3
    settings = dict(random_crop=True, random_flip=True, proportion_empty_prompts=0.5, max_train_samples=5,
                    snr_gamma=5.0, noise_offset=0.1, prediction_type="v_prediction", gradient_checkpointing=True,
                    set_grads_to_none=True, lr_scheduler="cosine", gradient_accumulation_steps=2,
                    max_train_steps=total, checkpointing_steps=half, validation_prompt=["red circle"],
                    validation_image=validation_images, num_validation_images=1, validation_steps=2)
    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(tiny_sd, straight, parquet=fill_parquet, **settings))
    assert f"checkpoint-{half}" in checkpoints(straight)
    assert os.path.isfile(os.path.join(straight, "validation", "step_000002", "pair_00.png"))

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, f"checkpoint-{half}"), os.path.join(resumed, f"checkpoint-{half}"))
    result = train(SCRIPT, base_args(tiny_sd, resumed, parquet=fill_parquet, resume_from_checkpoint="latest",
                                     **settings))
    assert f"Resuming from {os.path.join(resumed, f'checkpoint-{half}')}" in result.stderr
    assert os.path.isfile(os.path.join(resumed, "validation", "step_000004", "pair_00.png"))

    assert_same_weights(os.path.join(straight, f"checkpoint-{half}", "controlnet"),
                        os.path.join(resumed, f"checkpoint-{half}", "controlnet"))
    assert_same_weights(straight, resumed)
    # The run did train: the final weights differ from the halfway ones.
    halfway = load_weights(os.path.join(straight, f"checkpoint-{half}", "controlnet"))
    assert any(not torch.equal(a, b) for a, b in zip(load_weights(straight).values(), halfway.values()))


def test_sigterm_saves_a_checkpoint_and_latest_resumes_exactly(tiny_sd, fill_folder, tmp_path):
    settings = dict(train_batch_size=1, max_train_steps=30, checkpointing_steps=5, lr_scheduler="linear",
                    random_crop=True, proportion_empty_prompts=0.2)
    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, base_args(tiny_sd, interrupted, data=fill_folder, **settings))
    wait_for_path(os.path.join(interrupted, "checkpoint-5"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)

    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(interrupted))
    assert 5 <= stop_step < 30, "the signal arrived after the run had finished: the test needs more steps"
    assert not os.path.exists(os.path.join(interrupted, "diffusion_pytorch_model.safetensors"))

    train(SCRIPT, base_args(tiny_sd, interrupted, data=fill_folder, resume_from_checkpoint="latest", **settings))
    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(tiny_sd, straight, data=fill_folder, **settings))
    assert_same_weights(straight, interrupted)


def test_two_processes(tiny_sd, fill_parquet, validation_images, tmp_path):
    """CPU DDP over gloo: trains, validates on both ranks (N:N pairs), checkpoints, resumes exactly, exits cleanly."""
    settings = dict(max_train_steps=3, checkpointing_steps=1, train_batch_size=1, random_crop=True,
                    validation_prompt=["red circle", "blue circle"], validation_image=validation_images,
                    num_validation_images=1, validation_steps=3)
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, straight, parquet=fill_parquet, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert checkpoints(straight) == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {"random_states_0.pkl", "random_states_1.pkl"}
    for name in ("step_000003", "final"):
        for pair in (0, 1):
            assert os.path.isfile(os.path.join(straight, "validation", name, f"pair_{pair:02d}.png"))

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    settings.pop("validation_prompt"), settings.pop("validation_image")
    result = launch(SCRIPT, base_args(tiny_sd, resumed, parquet=fill_parquet, resume_from_checkpoint="checkpoint-1",
                                      **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert_same_weights(os.path.join(straight, "checkpoint-3", "controlnet"),
                        os.path.join(resumed, "checkpoint-3", "controlnet"))
    assert_same_weights(straight, resumed)


def _cache_entries(cache_dir, kind):
    """{entry path: mtime} of one kind of feature-cache entry."""
    entries = {}
    for root, _, files in os.walk(os.path.join(cache_dir, kind)):
        for name in files:
            if name.endswith(".safetensors"):
                entries[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
    return entries


def test_feature_cache_matches_fresh_encodings_is_reused_and_resumes_exactly(tiny_sd, fill_folder,
                                                                             validation_images, tmp_path):
    """--cache_latents --cache_text_embeddings with --random_flip and --proportion_empty_prompts:
    - training on the cache equals training on fresh encodings within fp32 rounding (the VAE and text encoder see
      other batch shapes when filling the cache, nothing else differs); the empty prompt is cached with the
      captions; the final validation loads the dropped VAE and text encoder again;
    - a second run, resuming the first's checkpoint-2 in another output folder with 2 data loader workers,
      computes nothing, rewrites no entry and ends bit for bit like the first.
    (That an edited image recomputes its entry only is shown by test_text_to_image and test_common.)"""
    data = str(tmp_path / "data")
    shutil.copytree(fill_folder, data)
    with open(os.path.join(data, "metadata.jsonl")) as file:
        rows = [json.loads(line) for line in file]
    captions = {row["text"] for row in rows if row["file_name"] != "corrupt.png"} | {""}
    cache = str(tmp_path / "cache")
    # 7 examples at batch 2: 4 batches per epoch, checkpoint-2 mid-epoch.
    settings = {"random_flip": True, "proportion_empty_prompts": 0.3, "max_train_steps": 4, "checkpointing_steps": 2,
                "learning_rate": 1e-4}
    cached = {"cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": cache}

    fresh = str(tmp_path / "fresh")
    train(SCRIPT, base_args(tiny_sd, fresh, data=data, **settings))
    first = str(tmp_path / "first")
    result = launch(SCRIPT, base_args(tiny_sd, first, data=data, **settings, **cached, validation_steps=100,
                                      validation_prompt=["red circle"], validation_image=validation_images[:1],
                                      num_validation_images=1))
    assert "latents: 0 of 7 cached" in result.stderr and "computing 7" in result.stderr
    assert f"text_embeddings: 0 of {len(captions)} cached" in result.stderr
    latents, texts = _cache_entries(cache, "latents"), _cache_entries(cache, "text_embeddings")
    assert len(latents) == 7 and len(texts) == len(captions)
    fresh_weights, cached_weights = load_weights(fresh), load_weights(first)
    assert fresh_weights.keys() == cached_weights.keys()
    for name, value in fresh_weights.items():
        torch.testing.assert_close(cached_weights[name], value, rtol=0, atol=2e-6)
    zero_convs = [key for key in fresh_weights if key.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert any(fresh_weights[key].abs().sum() > 0 for key in zero_convs)
    assert os.path.isfile(os.path.join(first, "validation", "final", "pair_00.png"))

    second = str(tmp_path / "second")
    shutil.copytree(os.path.join(first, "checkpoint-2"), os.path.join(second, "checkpoint-2"))
    result = train(SCRIPT, base_args(tiny_sd, second, data=data, **settings, **cached, resume_from_checkpoint="latest",
                                     dataloader_num_workers=2))
    assert "latents: 7 of 7 cached" in result.stderr
    assert f"text_embeddings: {len(captions)} of {len(captions)} cached" in result.stderr
    assert _cache_entries(cache, "latents") == latents and _cache_entries(cache, "text_embeddings") == texts
    for folder in ("checkpoint-4/controlnet", "."):
        assert_same_weights(os.path.join(first, folder), os.path.join(second, folder))


def test_diffusers_docs_command_runs_unchanged(tiny_sd, tmp_path):
    """The diffusers docs' command line, verbatim apart from $MODEL_DIR and $OUTPUT_DIR. `fusing/fill50k` is a local
    fill-style dataset folder of that name in the working directory (datasets looks there before the hub). At 512 px
    one optimizer step (4 accumulated batches) takes ~20 s on one CPU core and the final validation several minutes,
    so a SIGTERM during the first step keeps the test short: the run checkpoints that step and exits 143."""
    write_parquet_dataset(str(tmp_path / "fusing" / "fill50k"), 8, seed=3, size=(64, 64))
    for index in (1, 2):
        fill_example(random.Random(index), 64)[1].save(tmp_path / f"conditioning_image_{index}.png")
    out = str(tmp_path / "controlnet-out")
    process = start_python(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_sd}",
        f"--output_dir={out}",
        "--dataset_name=fusing/fill50k",
        "--resolution=512",
        "--learning_rate=1e-5",
        "--validation_image", "./conditioning_image_1.png", "./conditioning_image_2.png",
        "--validation_prompt", "red circle with blue background", "cyan circle with brown floral background",
        "--train_batch_size=1",
        "--gradient_accumulation_steps=4",
    ], cwd=str(tmp_path))
    wait_for_path(os.path.join(out, "logs"), process)
    status, _, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "8 examples, 1 epochs of 2 steps" in stderr
    assert checkpoints(out) == {"checkpoint-1"}
    from diffusers import ControlNetModel

    ControlNetModel.from_pretrained(os.path.join(out, "checkpoint-1", "controlnet"))


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, non-zero exit, no traceback, output_dir untouched (SPEC §7)
# --------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "image column missing": ({"image_column": "target"},
                             ["--image_column", "columns: image, conditioning_image, text"]),
    "conditioning column missing": ({"conditioning_image_column": "edges"}, [
        "--conditioning_image_column", "'edges'", "columns: image, conditioning_image, text"]),
    "validation prompt/image count mismatch": (
        {"validation_prompt": ["a", "b"], "validation_image": ["{val}", "{val}", "{val}"]},
        ["--validation_prompt", "--validation_image"]),
    "validation prompt without image": ({"validation_prompt": ["a"]}, ["--validation_image"]),
    "missing validation image": ({"validation_prompt": ["a"], "validation_image": ["/nonexistent/c.png"]},
                                 ["--validation_image", "/nonexistent/c.png"]),
    "proportion above 1": ({"proportion_empty_prompts": 1.5}, ["--proportion_empty_prompts"]),
    "resolution not a multiple of 8": ({"resolution": 60}, ["--resolution", "multiple of 8"]),
    "missing model": ({"pretrained_model_name_or_path": "/nonexistent/sd"}, ["--pretrained_model_name_or_path"]),
    "model folder that is not a pipeline": ({"pretrained_model_name_or_path": "{empty_dir}"}, ["unet/"]),
    "missing controlnet": ({"controlnet_model_name_or_path": "/nonexistent/cn"}, ["--controlnet_model_name_or_path"]),
    "missing dataset": ({"train_data_dir": None, "dataset_name": "/nonexistent/data"}, ["--dataset_name"]),
    "missing train_data_dir": ({"train_data_dir": "/nonexistent/images"}, ["--train_data_dir"]),
    "both data sources": ({"dataset_name": "{parquet}"}, ["--dataset_name", "--train_data_dir"]),
    "max_train_steps 0": ({"max_train_steps": 0}, ["--max_train_steps"]),
    "checkpointing_steps 0": ({"checkpointing_steps": 0}, ["--checkpointing_steps"]),
    "validation_steps 0": ({"validation_steps": 0}, ["--validation_steps"]),
    "learning_rate 0": ({"learning_rate": 0}, ["--learning_rate"]),
    "checkpoints_total_limit 0": ({"checkpoints_total_limit": 0}, ["--checkpoints_total_limit"]),
    "missing checkpoint": ({"resume_from_checkpoint": "checkpoint-999"}, ["--resume_from_checkpoint"]),
    "cache_latents with a random crop": ({"cache_latents": True, "random_crop": True},
                                         ["--cache_latents cannot be used with --random_crop"]),
    "feature_cache_dir is a file": ({"cache_text_embeddings": True, "feature_cache_dir": "{a_file}"},
                                    ["--feature_cache_dir", "is a file"]),
    # Real datasets (SPEC §9)
    "malformed bucket list": ({"aspect_ratio_buckets": "64x96"}, ["--aspect_ratio_buckets", "'64x96'"]),
    "bucket side not a multiple of 8": ({"aspect_ratio_buckets": "64,96;60,64"},
                                        ["--aspect_ratio_buckets", "multiple of 8"]),
    "bucket minimum above resolution": ({"use_aspect_ratio_buckets": True, "bucket_min_resolution": 128},
                                        ["--bucket_min_resolution", "--resolution"]),
    "bucket list with a bucket minimum": ({"aspect_ratio_buckets": "64,64", "bucket_min_resolution": 32},
                                          ["--bucket_min_resolution", "--aspect_ratio_buckets"]),
    "validation height not a multiple of 8": ({"validation_height": 60}, ["--validation_height", "multiple of 8"]),
    "proportion below 0": ({"proportion_empty_prompts": -0.1}, ["--proportion_empty_prompts"]),
    "mask column without masked loss": ({"mask_column": "mask"}, ["--mask_column", "--masked_loss"]),
    "masked loss without any mask": ({"masked_loss": True}, ["--masked_loss", "no image of", "looked for",
                                                            "name.mask.png", "alpha channel"]),
    "mask of another size": ({"masked_loss": True, "train_data_dir": "{bad_mask}"},
                             ["--masked_loss", "0.mask.png", "10x10", "24x24"]),
    "mask column missing": ({"masked_loss": True, "mask_column": "mask"}, ["--mask_column", "'mask'", "columns"]),
}


# Found once the dataset is read (after the Accelerator exists in main): these run in-process through the function
# main reads the data with (load_training_rows), as main would report them; the rest fail while the arguments are
# checked and run in-process through the script's entry point.
FOUND_IN_DATASET = {"image column missing", "conditioning column missing", "masked loss without any mask",
                    "mask of another size", "mask column missing"}


def fail_loading_data(args, capsys):
    import train_controlnet as script
    from trainkit.cli import run_main

    def load():
        parsed = script.parse_args([str(arg) for arg in args])
        script.validate_args(parsed)
        script.load_training_rows(parsed)

    with pytest.raises(SystemExit) as exit_info:
        run_main(load)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_error(case, tiny_sd, fill_folder, fill_parquet, validation_images, tmp_path,
                                       capsys):
    overrides, expected = BAD_INPUTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    values = {"empty_dir": str(tmp_path / "empty"), "parquet": fill_parquet, "val": validation_images[0],
              "a_file": str(tmp_path / "a_file"), "bad_mask": str(tmp_path / "bad_mask")}
    if "{bad_mask}" in overrides.values():
        shutil.copytree(fill_folder, tmp_path / "bad_mask")
        Image.new("L", (10, 10), 255).save(tmp_path / "bad_mask" / "0.mask.png")

    def fill(value):
        if isinstance(value, list):
            return [fill(item) for item in value]
        return value.format(**values) if isinstance(value, str) else value

    overrides = {key: fill(value) for key, value in overrides.items()}
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    args = base_args(tiny_sd, str(out), data=fill_folder, **overrides)
    if case in FOUND_IN_DATASET:
        status, stderr = fail_loading_data(args, capsys)
    else:
        status, stderr = fail_in_process("train_controlnet", args, capsys)
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before


# --------------------------------------------------------------------------------------------------------------------
# Real datasets (SPEC §9): aspect-ratio buckets, paired crops, loss masks
# --------------------------------------------------------------------------------------------------------------------

def bucket_args(model, data, output_dir, *extra):
    """Parsed and validated in-process, as main does before loading anything."""
    import train_controlnet as script

    args = script.parse_args(base_args(model, output_dir, data=data) + list(extra))
    script.validate_args(args)
    return args


def test_buckets_pair_crops_and_masks_in_the_dataset(tiny_sd, paired_folder, tmp_path):
    """With an explicit bucket list, random crops and flips and --masked_loss: every image trains at its bucket's
    shape (nearest aspect ratio), its conditioning image gets the same resize, crop box and flip (it is the inverted
    image, pixel for pixel), its mask follows at the latent grid; the batch sampler never mixes buckets and serves
    every sample once per epoch. Generated buckets never upscale the small image."""
    import datasets
    from transformers import CLIPTokenizer

    import train_controlnet as script
    from trainkit.randomness import RunState

    args = bucket_args(tiny_sd, paired_folder, tmp_path / "out", "--aspect_ratio_buckets", MIXED_ASPECT_BUCKETS,
                       "--random_crop", "--random_flip", "--masked_loss")
    examples, plan = script.load_training_rows(args)
    names = [os.path.basename(cell["path"]) for cell in examples.cast_column(
        "image", datasets.Image(decode=False))["image"]]
    expected = {"land_0.png": (64, 96), "land_1.png": (64, 96), "port_0.png": (96, 64), "port_1.png": (96, 64),
                "square_0.png": (64, 64), "small_0.png": (64, 64)}
    assert {name: plan.target(row) for row, name in enumerate(names)} == expected
    assert plan.mask(names.index("square_0.png")) == ("alpha", "alpha")
    assert plan.mask(names.index("land_0.png"))[0] == "file"
    sizes = [examples[row]["image"].size[::-1] for row in range(len(examples))]

    dataset = script.ControlNetExamples(examples, CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer"),
                                        args, RunState(0), plan)
    flipped_masks = set()
    for epoch in range(3):
        for index in range(len(dataset)):
            item = dataset[(epoch, index)]
            height, width = plan.target(index)
            assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, height, width)
            assert item["target_size"].tolist() == [height, width]
            # The conditioning image is the inverted target: the same box and flip, within uint8 rounding.
            torch.testing.assert_close(item["conditioning_pixel_values"], 1 - (item["pixel_values"] + 1) / 2,
                                       rtol=0, atol=1.5 / 255)
            mask = item["loss_mask"]
            assert mask.shape == (1, height // 8, width // 8) and mask.min() >= 0 and mask.max() <= 1
            if names[index] == "square_0.png":  # alpha: the transparent top half
                assert mask[0, 0].max() < 0.5 < mask[0, -1].min()
            elif names[index] != "small_0.png":  # name.mask.png: the white left half, mirrored when flipped
                left, right = mask[0, :, 0].min().item(), mask[0, :, -1].max().item()
                assert {left, right} == {0.0, 1.0}, (left, right)
                flipped_masks.add(mask[0, 0, 0].item() == 0)
    assert flipped_masks == {True, False}

    loader, sampler = script.build_dataloader(dataset, args, RunState(0), pin_memory=False)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for batch in loader:  # default_collate stacks: a batch that mixed shapes would raise
            assert len(set(map(tuple, batch["target_size"].tolist()))) == 1
            seen += map(tuple, batch["original_size"].tolist())
        assert sorted(seen) == sorted(size for size in sizes) and len(loader) == 3  # square and small share one

    generated = bucket_args(tiny_sd, paired_folder, tmp_path / "out", "--use_aspect_ratio_buckets",
                            "--bucket_divisibility", "16")
    plan = script.load_training_rows(generated)[1]
    assert all(target[0] <= sizes[row][0] and target[1] <= sizes[row][1] and target[0] % 16 == target[1] % 16 == 0
               for row, target in enumerate(plan.targets)), plan.targets
    assert plan.target(names.index("small_0.png")) == (32, 32)


def test_bucketed_cache_pairs_each_latent_with_its_image_and_masks_weight_the_loss(tiny_sd, paired_folder,
                                                                                   tmp_path):
    """--cache_latents with buckets, --masked_loss and random flips: every cached example holds the VAE encoding of
    its own image at its bucket's size (so it stays paired with its caption and conditioning image in any order),
    and the same mask as the uncached one; new bucket settings recompute exactly the entries whose bucket changed.
    The loss with an all-ones mask is the unmasked loss exactly; the real mask changes it."""
    import train_controlnet as script
    from trainkit.randomness import RunState

    cache = str(tmp_path / "cache")
    flags = ["--random_flip", "--masked_loss", "--cache_latents", "--feature_cache_dir", cache,
             "--proportion_empty_prompts", "0.3"]
    args = bucket_args(tiny_sd, paired_folder, tmp_path / "out", "--aspect_ratio_buckets", MIXED_ASPECT_BUCKETS,
                       *flags)
    noise_scheduler, tokenizers, text_encoders, vae, unet = script.load_models(args)
    examples, plan = script.load_training_rows(args)
    fresh = script.ControlNetExamples(examples, tokenizers, args, RunState(5), plan)
    cached = script.ControlNetExamples(examples, tokenizers, args, RunState(5), plan)
    script.cache_latents(_OneProcess(), cached, vae, args, torch.float32)
    entries = _cache_entries(cache, "latents")
    assert len(entries) == 6
    for row in range(len(examples)):
        height, width = plan.target(row)
        entry = cached.latent_cache.load(cached.image_keys[row])
        assert entry["latent_dist"].shape == entry["flipped"].shape == (8, height // 8, width // 8)
        assert entry["mask"].shape == entry["flipped_mask"].shape == (1, height // 8, width // 8)

    with torch.no_grad():
        for epoch in range(3):
            for index in range(len(fresh)):
                expected, example = fresh[(epoch, index)], cached[(epoch, index)]
                latent_dist = vae.encode(expected["pixel_values"][None]).latent_dist.parameters[0]
                torch.testing.assert_close(example["latent_dist"], latent_dist, rtol=1e-5, atol=1e-5)
                for key in ("loss_mask", "input_ids", "conditioning_pixel_values", "original_size", "crop_top_left",
                            "target_size"):
                    assert torch.equal(example[key], expected[key]), key

    # Another bucket for the square images only: their two entries are computed, the other four are kept.
    other = bucket_args(tiny_sd, paired_folder, tmp_path / "out", "--aspect_ratio_buckets", "64,96;96,64;32,32",
                        *flags)
    other_examples, other_plan = script.load_training_rows(other)
    rebucketed = script.ControlNetExamples(other_examples, tokenizers, other, RunState(5), other_plan)
    script.cache_latents(_OneProcess(), rebucketed, vae, other, torch.float32)
    after = _cache_entries(cache, "latents")
    assert len(after) == 8 and all(after[path] == mtime for path, mtime in entries.items())

    # Masked loss: an all-ones mask is the plain loss bit for bit; the images' masks weight it.
    controlnet = script.build_controlnet(args, unet)
    landscape = [index for index in range(len(fresh)) if plan.target(index) == (64, 96)]
    batch = torch.utils.data.default_collate([fresh[(0, index)] for index in landscape])
    plain = {key: value for key, value in batch.items() if key != "loss_mask"}
    ones = {**plain, "loss_mask": torch.ones_like(batch["loss_mask"])}

    def loss(batch):
        return script.training_loss(controlnet, unet, vae, text_encoders, noise_scheduler, batch,
                                    torch.Generator().manual_seed(0), args, torch.float32, vae.config.scaling_factor)

    assert torch.equal(loss(ones), loss(plain))
    assert not torch.equal(loss(batch), loss(plain))


def test_buckets_with_masked_loss_resume_exactly_on_two_processes(tiny_sd, paired_folder, validation_images,
                                                                   tmp_path):
    """Mixed landscape/portrait/square images in three buckets with --masked_loss, random crops and flips, on 2
    processes (CPU DDP) with accumulation 2: 6 batches of 1 -> 3 per rank -> 2 steps per epoch; resumed from the
    mid-epoch checkpoint-3 it ends bit for bit like the straight run. Validation renders at 64x96, the model card
    names the buckets, and the ControlNet drives the pipeline at a non-square size."""
    settings = dict(aspect_ratio_buckets=MIXED_ASPECT_BUCKETS, masked_loss=True, random_crop=True, random_flip=True,
                    train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=4, checkpointing_steps=3,
                    proportion_empty_prompts=0.3)
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, straight, data=paired_folder, validation_prompt=["a wide shape"],
                                      validation_image=validation_images[:1], num_validation_images=1,
                                      validation_steps=100, validation_height=64, validation_width=96, **settings),
                    num_processes=2)
    assert "6 examples, 2 epochs of 2 steps" in result.stderr
    assert Image.open(os.path.join(straight, "validation", "final", "pair_00.png")).size == (2 * 96, 64)
    card = open(os.path.join(straight, "README.md")).read()
    assert "64,64;64,96;96,64" in card and "masked loss" in card

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(straight, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    result = launch(SCRIPT, base_args(tiny_sd, resumed, data=paired_folder, resume_from_checkpoint="latest",
                                      **settings), num_processes=2)
    assert "Resuming from" in result.stderr
    assert_same_weights(straight, resumed)

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd, controlnet=ControlNetModel.from_pretrained(straight), safety_checker=None,
        requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    conditioning = Image.open(validation_images[0]).convert("RGB").resize((96, 64))
    images = pipeline("a wide shape", conditioning, num_inference_steps=2, height=64, width=96, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 96, 3)
