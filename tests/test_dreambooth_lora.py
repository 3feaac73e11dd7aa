"""train_dreambooth_lora.py: launched as users launch it, plus in-process checks of the data, prompt and loss code."""

import argparse
import os
import shutil
import signal

import pytest
import torch
from helpers import (
    checkpoints,
    launch,
    run_python,
    send_signal_and_wait,
    snapshot,
    start_python,
    train,
    wait_for_path,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from trainkit.families import FAMILIES

SCRIPT = "train_dreambooth_lora.py"
LORA = "pytorch_lora_weights.safetensors"
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: the tiny SD pipeline and small image folders, built once per module
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


def _images(count, seed=0):
    from conftest import _shape_images

    return _shape_images(count, seed)


@pytest.fixture(scope="module")
def instance_folder(tmp_path_factory):
    """3 readable, non-square images (random crops have a choice), one with its own prompt in a .txt, and one corrupt
    file. At batch 1: 3 batches per epoch."""
    folder = tmp_path_factory.mktemp("instance")
    for index, image in enumerate(_images(3)):
        image.save(folder / f"dog_{index}.png")
    (folder / "dog_1.txt").write_text("a photo of sks dog in the style of a painting\n")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return str(folder)


def base_args(model, data, output_dir, **overrides):
    """Tiny, fast settings: 64 px (8x8 latents), batch 1, validation with 2 denoising steps."""
    args = {
        "pretrained_model_name_or_path": model,
        "instance_data_dir": data,
        "instance_prompt": INSTANCE_PROMPT,
        "resolution": 64,
        "output_dir": output_dir,
        "train_batch_size": 1,
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


def lora(folder):
    return load_file(os.path.join(folder, LORA))


def assert_same_lora(folder_a, folder_b):
    a, b = lora(folder_a), lora(folder_b)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)}/{len(a)} tensors differ: {folder_a} vs {folder_b}: {different[:3]}"


def file_times(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def render(pipeline):
    return pipeline("a photo of sks dog", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


# --------------------------------------------------------------------------------------------------------------------
# Launched runs
# --------------------------------------------------------------------------------------------------------------------

# Prior preservation with text-encoder LoRA, batch 1 (3 steps per epoch), 8 steps, checkpoints every 2 of which the
# newest 2 are kept: the straight run of the resume test below. (The schedule must not depend on --max_train_steps,
# which the first half of that test lowers.)
PRIOR_SETTINGS = {"with_prior_preservation": True, "class_prompt": CLASS_PROMPT, "num_class_images": 3,
                  "sample_batch_size": 2, "train_text_encoder": True, "max_train_steps": 8, "checkpointing_steps": 2,
                  "checkpoints_total_limit": 2, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 3}


@pytest.fixture(scope="module")
def prior_run(tiny_sd, instance_folder, tmp_path_factory):
    """One user class image and one corrupt file in the class folder: 2 class images are generated."""
    root = tmp_path_factory.mktemp("prior_run")
    class_dir = root / "class"
    class_dir.mkdir()
    _images(1, seed=5)[0].save(class_dir / "user_dog.png")
    (class_dir / "broken.jpg").write_bytes(b"not a jpeg")
    out = str(root / "out")
    result = launch(SCRIPT, base_args(tiny_sd, instance_folder, out, class_data_dir=class_dir, **PRIOR_SETTINGS,
                                      validation_prompt="a photo of sks dog in a bucket", num_validation_images=2,
                                      validation_epochs=2))
    return {"out": out, "class_dir": str(class_dir), "result": result}


def test_prior_preservation_generates_class_images_and_writes_loadable_lora(tiny_sd, prior_run):
    out, class_dir, result = prior_run["out"], prior_run["class_dir"], prior_run["result"]
    # The unreadable files are skipped by name; the missing class images (3 wanted, 1 readable) are generated.
    assert "corrupt.png" in result.stderr and "broken.jpg" in result.stderr
    generated = sorted(name for name in os.listdir(class_dir) if name.endswith(".jpg") and name != "broken.jpg")
    assert [name.split("-")[0] for name in generated] == ["1", "2"], generated
    assert "3 class images (2 generated this run)" in result.stderr
    assert "3 instance images, 3 examples, 3 epochs of 3 steps, 8 steps in all" in result.stderr

    # Checkpoints hold the LoRA file (usable by itself) and rotate to the newest 2.
    assert checkpoints(out) == {"checkpoint-6", "checkpoint-8"}
    assert_same_lora(os.path.join(out, "checkpoint-8"), out)
    weights = lora(out)
    assert {key.split(".")[0] for key in weights} == {"unet", "text_encoder"}
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())

    # The LoRA loads into the base pipeline and changes what it renders.
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    tuned = render(pipeline)
    assert tuned.shape == (64, 64, 3) and not (base == tuned).all()
    pipeline.unload_lora_weights()
    pipeline.load_lora_weights(os.path.join(out, "checkpoint-8"))
    assert (render(pipeline) == tuned).all()

    # Validation images at epochs 0 and 2 and from the saved file, on disk and in TensorBoard; the model card.
    for name in ("epoch_0000", "epoch_0002", "final"):
        assert sorted(os.listdir(os.path.join(out, "validation", name))) == ["00.png", "01.png"], name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs", "dreambooth-lora"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == list(range(1, 9))
    assert len(events.Images("validation")) == 2 and events.Images("test")
    with open(os.path.join(out, "README.md")) as file:
        card = file.read()
    assert "lora" in card and INSTANCE_PROMPT in card and "validation/final/00.png" in card


def test_exact_resume_with_text_encoder_rotation_class_reuse_and_resume_at_end(tiny_sd, instance_folder, prior_run,
                                                                              tmp_path):
    """4 steps (checkpoint-4 is mid-epoch) + resume latest to 8 == the 8 straight steps of prior_run (with
    validation, which must not disturb training), bit for bit. The class folder is reused: nothing is generated or
    rewritten. A last resume at --max_train_steps trains nothing and writes the final outputs again."""
    class_dir = prior_run["class_dir"]
    before = file_times(class_dir)
    resumed = str(tmp_path / "resumed")
    settings = dict(PRIOR_SETTINGS, class_data_dir=class_dir, resume_from_checkpoint="latest")

    # Plain `python` for the halves (the launcher is exercised by prior_run): fewer processes to start.
    first = run_python(SCRIPT, base_args(tiny_sd, instance_folder, resumed, **dict(settings, max_train_steps=4)),
                       check=True)
    assert "no checkpoint" in first.stderr and "starting a new run" in first.stderr
    assert "3 class images (0 generated this run)" in first.stderr
    assert checkpoints(resumed) == {"checkpoint-2", "checkpoint-4"}
    second = run_python(SCRIPT, base_args(tiny_sd, instance_folder, resumed, **settings), check=True)
    assert f"Resuming from {os.path.join(resumed, 'checkpoint-4')}" in second.stderr
    assert checkpoints(resumed) == {"checkpoint-6", "checkpoint-8"}
    assert file_times(class_dir) == before

    straight = prior_run["out"]
    for folder in ("checkpoint-8", "."):
        assert_same_lora(os.path.join(straight, folder), os.path.join(resumed, folder))

    os.remove(os.path.join(resumed, LORA))
    os.remove(os.path.join(resumed, "README.md"))
    third = run_python(SCRIPT, base_args(tiny_sd, instance_folder, resumed, **settings), check=True)
    assert "Checkpoint step 8 >= --max_train_steps 8: nothing to train" in third.stderr
    assert_same_lora(straight, resumed)
    assert os.path.isfile(os.path.join(resumed, "README.md"))
    assert checkpoints(resumed) == {"checkpoint-6", "checkpoint-8"}


def test_sigterm_with_accumulation_dropout_and_precomputed_embeddings_resumes_exactly(tiny_sd, instance_folder,
                                                                                     tmp_path):
    """UNet-only LoRA with dropout (drawn from the global RNG), accumulation 2, random crops, bf16 mixed precision
    (frozen weights in bf16, the LoRA weights in fp32), and prompts encoded once with an attention mask and a shorter
    max length (the text encoder is freed; validation uses the embeddings): SIGTERM -> checkpoint at the stop step,
    exit 143; resume latest == straight."""
    settings = {"gradient_accumulation_steps": 2, "lora_dropout": 0.1, "rank": 2, "max_train_steps": 40,
                "checkpointing_steps": 2, "lr_scheduler": "linear", "mixed_precision": "bf16",
                "pre_compute_text_embeddings": True,
                "text_encoder_use_attention_mask": True, "tokenizer_max_length": 16,
                "validation_prompt": "a photo of sks dog", "num_validation_images": 1, "validation_epochs": 100}
    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, base_args(tiny_sd, instance_folder, interrupted, **settings))
    wait_for_path(os.path.join(interrupted, "checkpoint-2"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)

    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(interrupted))
    assert 2 <= stop_step < 40, "the signal arrived after the run had finished: the test needs more steps"
    assert not os.path.exists(os.path.join(interrupted, LORA))

    run_python(SCRIPT, base_args(tiny_sd, instance_folder, interrupted, resume_from_checkpoint="latest", **settings),
               check=True)
    straight = str(tmp_path / "straight")
    run_python(SCRIPT, base_args(tiny_sd, instance_folder, straight, **settings), check=True)
    assert_same_lora(straight, interrupted)
    assert {key.split(".")[0] for key in lora(straight)} == {"unet"}
    assert {tensor.dtype for tensor in lora(straight).values()} == {torch.float32}
    assert os.listdir(os.path.join(straight, "validation", "final")) == ["00.png"]


def test_two_processes_with_accumulation_text_encoder_and_class_generation(tiny_sd, instance_folder, tmp_path):
    """CPU DDP over gloo: the 4 missing class images are generated by both ranks (each its share, none twice),
    validation images are split across ranks, accumulation 2 with both models trained, and a resume on 2 processes
    from checkpoint-2 is exact; the processes exit cleanly."""
    class_dir = str(tmp_path / "class")
    settings = {"with_prior_preservation": True, "class_data_dir": class_dir, "class_prompt": CLASS_PROMPT,
                "num_class_images": 4, "sample_batch_size": 1, "train_text_encoder": True,
                "gradient_accumulation_steps": 2, "max_train_steps": 4, "checkpointing_steps": 2,
                "validation_prompt": "a photo of sks dog", "num_validation_images": 3, "validation_epochs": 100}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, instance_folder, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert sorted(name.split("-")[0] for name in os.listdir(class_dir)) == ["0", "1", "2", "3"]
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {"random_states_0.pkl", "random_states_1.pkl"}
    assert sorted(os.listdir(os.path.join(straight, "validation", "final"))) == ["00.png", "01.png", "02.png"]

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    second = launch(SCRIPT, base_args(tiny_sd, instance_folder, resumed, resume_from_checkpoint="checkpoint-2",
                                      **dict(settings, validation_prompt=None)), num_processes=2)
    assert "(0 generated this run)" in second.stderr
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(straight, folder), os.path.join(resumed, folder))


def _cache_entries(cache_dir, kind):
    """{entry path: mtime} of one kind of feature-cache entry."""
    entries = {}
    for root, _, files in os.walk(os.path.join(cache_dir, kind)):
        for name in files:
            if name.endswith(".safetensors"):
                entries[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
    return entries


def test_feature_cache_matches_fresh_encodings_is_reused_and_resumes_exactly(tiny_sd, instance_folder,
                                                                             tmp_path):
    """--cache_latents --cache_text_embeddings with prior preservation (2 class images in the folder, none generated)
    and LoRA dropout (the global RNG, reseeded per batch):
    - training on the cache equals training on fresh encodings within fp32 rounding (the VAE and text encoder see
      other batch shapes when filling the cache, nothing else differs); instance and class images are cached, and
      the instance, class, name.txt, validation and negative prompts; validation loads the dropped VAE again;
    - a second run (with --pre_compute_text_embeddings too), resuming the first's checkpoint-2 in another output
      folder with 2 data loader workers, computes nothing, rewrites no entry and ends bit for bit like the first.
    (That an edited image recomputes its entry only is shown by test_text_to_image and test_common.)"""
    data = str(tmp_path / "instance")
    shutil.copytree(instance_folder, data)
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for index, image in enumerate(_images(2, seed=5)):
        image.save(class_dir / f"dog_{index}.png")
    cache = str(tmp_path / "cache")
    settings = {"center_crop": True, "with_prior_preservation": True, "class_data_dir": str(class_dir),
                "class_prompt": CLASS_PROMPT, "num_class_images": 2, "max_train_steps": 4, "checkpointing_steps": 2,
                "learning_rate": 1e-4, "lora_dropout": 0.1}
    cached = {"cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": cache}

    fresh = str(tmp_path / "fresh")
    train(SCRIPT, base_args(tiny_sd, data, fresh, **settings))
    first = str(tmp_path / "first")
    result = launch(SCRIPT, base_args(tiny_sd, data, first, **settings, **cached, num_validation_images=1,
                                      validation_prompt="a photo of sks dog in a bucket", validation_epochs=100))
    # 3 instance + 2 class images; prompts: instance, dog_1.txt, class, validation and "" (negative) -> 5.
    assert "(0 generated this run)" in result.stderr
    assert "latents: 0 of 5 cached" in result.stderr and "computing 5" in result.stderr
    assert "text_embeddings: 0 of 5 cached" in result.stderr
    latents, texts = _cache_entries(cache, "latents"), _cache_entries(cache, "text_embeddings")
    assert len(latents) == 5 and len(texts) == 5
    fresh_weights, cached_weights = lora(fresh), lora(first)
    assert fresh_weights.keys() == cached_weights.keys()
    for name, value in fresh_weights.items():
        torch.testing.assert_close(cached_weights[name], value, rtol=0, atol=2e-6)
    # B (up) starts at zero: training moved it.
    up = [value for name, value in fresh_weights.items() if ".lora.up." in name or ".lora_B." in name]
    assert up and any(value.abs().sum() > 0 for value in up)
    for name in ("epoch_0000", "final"):
        assert os.listdir(os.path.join(first, "validation", name)) == ["00.png"]

    second = str(tmp_path / "second")
    shutil.copytree(os.path.join(first, "checkpoint-2"), os.path.join(second, "checkpoint-2"))
    result = train(SCRIPT, base_args(tiny_sd, data, second, **settings, **cached, pre_compute_text_embeddings=True,
                                     resume_from_checkpoint="latest", dataloader_num_workers=2))
    assert "latents: 5 of 5 cached" in result.stderr and "text_embeddings: 3 of 3 cached" in result.stderr
    assert _cache_entries(cache, "latents") == latents and _cache_entries(cache, "text_embeddings") == texts
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(first, folder), os.path.join(second, folder))


def test_diffusers_docs_command_runs_unchanged(tiny_sd, instance_folder, tmp_path):
    """The diffusers docs' command line with the tiny model and --mixed_precision=no (CPU). Only --max_train_steps
    (500 -> 3) and --resolution (512 -> 64) are shrunk, so that the run, its 4 + 4 validation images included, ends
    in seconds and its final outputs can be checked; wandb runs offline."""
    out = str(tmp_path / "lora-dreambooth-model")
    result = launch(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_sd}", f"--instance_data_dir={instance_folder}",
        f"--output_dir={out}", f"--instance_prompt={INSTANCE_PROMPT}", "--resolution=64", "--train_batch_size=1",
        "--gradient_accumulation_steps=1", "--checkpointing_steps=100", "--learning_rate=1e-4", "--report_to=wandb",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=3",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=50", "--seed=0",
    ], cwd=str(tmp_path))
    assert "3 steps in all, batch 1 per device, total batch 1" in result.stderr
    assert {key.split(".")[0] for key in lora(out)} == {"unet"}
    for name in ("epoch_0000", "final"):  # --num_validation_images defaults to 4
        assert len(os.listdir(os.path.join(out, "validation", name))) == 4
    assert os.path.isdir(tmp_path / "wandb")
    assert not checkpoints(out)


# --------------------------------------------------------------------------------------------------------------------
# In-process: data, prompts and the loss of one step
# --------------------------------------------------------------------------------------------------------------------


def _script():
    import train_dreambooth_lora

    return train_dreambooth_lora


def _namespace(**values):
    defaults = {"resolution": 64, "center_crop": False, "image_interpolation_mode": "lanczos",
                "tokenizer_max_length": None, "text_encoder_use_attention_mask": False,
                "with_prior_preservation": False, "prior_loss_weight": 1.0, "class_labels_conditioning": None,
                "random_flip": False, "snr_gamma": None, "family": FAMILIES["sd"], "buckets": None}
    defaults.update(values)
    return argparse.Namespace(**defaults)


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")


def test_folder_prompts_crops_exif_and_collate(instance_folder, tokenizer, tmp_path):
    from trainkit.randomness import RunState

    script = _script()
    items, skipped = script.read_image_folder(instance_folder, INSTANCE_PROMPT)
    prompts = {os.path.basename(path): prompt for path, prompt in items}
    assert prompts == {"dog_0.png": INSTANCE_PROMPT, "dog_1.png": "a photo of sks dog in the style of a painting",
                       "dog_2.png": INSTANCE_PROMPT}
    assert len(skipped) == 1 and "corrupt.png" in skipped[0]

    # Crops depend only on (seed, epoch, index): the same every time, different across epochs.
    class_items = [(path, CLASS_PROMPT) for path, _ in items[:2]]
    dataset = script.DreamBoothDataset(items, class_items, script.PromptInputs([tokenizer], None), _namespace(),
                                       RunState(seed=3))
    assert len(dataset) == 3
    first, again = dataset[(0, 1)], dataset[(0, 1)]
    assert torch.equal(first["instance"]["pixel_values"], again["instance"]["pixel_values"])
    assert first["instance"]["pixel_values"].shape == (3, 64, 64)
    crops = {dataset[(epoch, 1)]["instance"]["pixel_values"].sum().item() for epoch in range(6)}
    assert len(crops) > 1, "random crops never changed"
    # The batch holds the instance halves first, then the class halves (the loss splits it in two).
    batch = script.collate_examples([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["input_ids"].shape == (4, 77)
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
    assert decoded == [INSTANCE_PROMPT, "a photo of sks dog in the style of a painting", CLASS_PROMPT, CLASS_PROMPT]

    # EXIF orientation is applied: a 30x20 image tagged "rotate 90" is seen as 20x30.
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 20), "red").save(rotated, exif=exif)
    assert script.load_rgb(str(rotated)).size == (20, 30)


def test_precomputed_embeddings_follow_mask_and_max_length(tiny_sd, tokenizer):
    from transformers import CLIPTextModel

    script = _script()
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    prompts = [INSTANCE_PROMPT, INSTANCE_PROMPT, CLASS_PROMPT]
    plain = script.precompute_prompt_embeddings([text_encoder], [tokenizer], prompts, _namespace())
    masked = script.precompute_prompt_embeddings([text_encoder], [tokenizer], prompts,
                                                 _namespace(text_encoder_use_attention_mask=True))
    short = script.precompute_prompt_embeddings([text_encoder], [tokenizer], prompts,
                                                _namespace(tokenizer_max_length=12))
    assert set(plain) == {INSTANCE_PROMPT, CLASS_PROMPT}
    assert plain[INSTANCE_PROMPT].shape == (77, 32) and short[INSTANCE_PROMPT].shape == (12, 32)
    assert not torch.equal(plain[INSTANCE_PROMPT], masked[INSTANCE_PROMPT])
    # The dataset hands the precomputed embeddings instead of token ids.
    inputs = script.PromptInputs([tokenizer], None, plain)(CLASS_PROMPT)
    assert list(inputs) == ["prompt_embeds"] and torch.equal(inputs["prompt_embeds"], plain[CLASS_PROMPT])
    assert script.PromptInputs([tokenizer], (12,))(CLASS_PROMPT)["input_ids"].shape == (12,)


class _OneProcess:
    """What FeatureCache.fill and the cache functions use of an Accelerator, for one CPU process."""

    device, process_index, num_processes, is_main_process = torch.device("cpu"), 0, 1, True

    def wait_for_everyone(self):
        pass


def test_cached_latents_and_prompts_equal_fresh_encodings(tiny_sd, instance_folder, tokenizer, tmp_path,
                                                          monkeypatch):
    """In-process: every example of the cached dataset (instance and class halves) holds what the VAE and the text
    encoder make of the uncached example, with EXIF orientation applied, an attention mask and a short max length;
    no image is read once the latents are cached; the cached embeddings equal --pre_compute_text_embeddings' ones."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from trainkit.randomness import RunState

    script = _script()
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    items, _ = script.read_image_folder(instance_folder, INSTANCE_PROMPT)
    rotated = str(tmp_path / "rotated.jpg")  # 40x24, seen as 24x40 once its EXIF orientation is applied
    exif = Image.Exif()
    exif[0x0112] = 6
    _images(1, seed=9)[0].resize((40, 24)).save(rotated, exif=exif)
    class_items = [(rotated, CLASS_PROMPT), (items[0][0], CLASS_PROMPT)]
    args = _namespace(center_crop=True, tokenizer_max_length=16, text_encoder_use_attention_mask=True,
                      feature_cache_dir=str(tmp_path / "cache"), train_batch_size=2)
    prompts = [prompt for _, prompt in items + class_items]

    latent_cache = script.cache_latents(_OneProcess(), vae, [path for path, _ in items + class_items], args,
                                        torch.float32)
    embeddings = script.cache_text_embeddings(_OneProcess(), [text_encoder], [tokenizer], prompts, args, torch.float32)
    fresh = script.DreamBoothDataset(items, class_items, script.PromptInputs([tokenizer], (16,)), args, RunState(0))
    cached = script.DreamBoothDataset(items, class_items, script.PromptInputs([tokenizer], (16,), embeddings), args,
                                      RunState(0))
    cached.use_latent_cache(*latent_cache)
    precomputed = script.precompute_prompt_embeddings([text_encoder], [tokenizer], prompts, args)
    expected_examples = [fresh[(0, index)] for index in range(len(fresh))]

    def unreadable(path):
        raise AssertionError(f"{path} was read although its latents are cached")

    monkeypatch.setattr(script, "load_rgb", unreadable)
    with torch.no_grad():
        for index, expected in enumerate(expected_examples):
            example = cached[(0, index)]
            for half in ("instance", "class"):
                pixels = expected[half]["pixel_values"][None]
                latent_dist = vae.encode(pixels).latent_dist.parameters[0]
                torch.testing.assert_close(example[half]["latent_dist"], latent_dist, rtol=1e-5, atol=1e-5)
                hidden = FAMILIES["sd"].encode_prompt([text_encoder], [expected[half]["input_ids"][None]],
                                                      attention_mask=expected[half]["attention_mask"][None])[0][0]
                torch.testing.assert_close(example[half]["prompt_embeds"], hidden, rtol=1e-5, atol=1e-5)
    for prompt in prompts:
        torch.testing.assert_close(embeddings[prompt], precomputed[prompt], rtol=1e-5, atol=1e-5)
    # The EXIF orientation mattered: the stored (unrotated) pixels encode to other latents.
    interpolation = script.INTERPOLATION_MODES["lanczos"]
    stored = script.preprocess_image(Image.open(rotated).convert("RGB"), 64, interpolation, True, None)
    with torch.no_grad():
        unrotated = vae.encode(stored[None]).latent_dist.parameters[0]
    assert not torch.allclose(cached[(0, 0)]["class"]["latent_dist"], unrotated, atol=1e-3)


@pytest.fixture(scope="module")
def loss_inputs(tiny_sd, tokenizer):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokens = tokenizer([INSTANCE_PROMPT, CLASS_PROMPT], padding="max_length", max_length=77, return_tensors="pt")
    batch = {
        "pixel_values": torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1,
        "input_ids": tokens.input_ids,
        "attention_mask": tokens.attention_mask,
    }
    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"),
        "scheduler": DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler"),
        "batch": batch,
    }


def _loss(inputs, **flags):
    return _script().training_loss(inputs["unet"], inputs["vae"], [inputs["text_encoder"]], inputs["scheduler"],
                                   inputs["batch"], torch.Generator().manual_seed(7), _namespace(**flags),
                                   torch.float32, (inputs["vae"].config.scaling_factor, None)).item()


def test_prior_loss_is_added_with_its_weight(loss_inputs):
    """Same batch (instance half, class half), same generator: loss = instance + weight x prior."""
    plain = _loss(loss_inputs)
    assert plain == _loss(loss_inputs)
    instance_only = _loss(loss_inputs, with_prior_preservation=True, prior_loss_weight=0.0)
    weighted = _loss(loss_inputs, with_prior_preservation=True, prior_loss_weight=1.0)
    doubled = _loss(loss_inputs, with_prior_preservation=True, prior_loss_weight=2.0)
    assert weighted != pytest.approx(instance_only)
    assert doubled - instance_only == pytest.approx(2 * (weighted - instance_only), rel=1e-5)
    # Without prior preservation the whole batch is one mean: the mean of the two halves' losses.
    assert plain == pytest.approx(weighted / 2, rel=1e-5)


def test_upstream_defaults_and_config_file(yaml_file):
    """Upstream's defaults; required flags may come from --config, and the command line wins over the file."""
    script = _script()
    args = script.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                              "--instance_prompt", "p"])
    # --resolution and --adam_weight_decay follow the base model (SD 512 and 1e-2; see the flags tests).
    # --output_dir and --learning_rate too (None here; validate_args gives SD lora-dreambooth-model and 5e-4).
    defaults = {"output_dir": None, "resolution": None, "train_batch_size": 4, "learning_rate": None,
                "num_train_epochs": 1, "checkpointing_steps": 500, "validation_epochs": 50, "num_validation_images": 4,
                "lr_scheduler": "constant", "lr_warmup_steps": 500, "mixed_precision": None, "rank": 4,
                "lora_dropout": 0.0, "prior_loss_weight": 1.0, "num_class_images": 100, "sample_batch_size": 4,
                "prior_generation_precision": None, "lr_num_cycles": 1, "lr_power": 1.0,
                "image_interpolation_mode": "lanczos", "report_to": "tensorboard", "logging_dir": "logs"}
    assert {key: getattr(args, key) for key in defaults} == defaults
    config = yaml_file({"pretrained_model_name_or_path": "m", "instance_data_dir": "d", "instance_prompt": "p",
                        "rank": 8, "learning_rate": "1e-4", "validation_images": "v.png"})
    args = script.parse_args(["--config", config, "--rank", "16"])
    assert (args.instance_prompt, args.rank, args.learning_rate, args.validation_images) == ("p", 16, 1e-4, ["v.png"])


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, non-zero exit, no traceback, output_dir untouched (SPEC §7)
# --------------------------------------------------------------------------------------------------------------------

# Checked in-process through the script's own entry point (run_main -> exit status 2): all fail before any model is
# loaded or an Accelerator is created. "{empty}" is an empty folder, "{corrupt}" one holding only a corrupt image,
# "{a_file}" a file, "{pixel_model}" a model folder without vae/.
BAD_ARGUMENTS = {
    "missing model": ({"pretrained_model_name_or_path": "/nonexistent/sd"}, "--pretrained_model_name_or_path"),
    "model folder without parts": ({"pretrained_model_name_or_path": "{empty}"}, "missing tokenizer/, text_encoder/"),
    "missing instance dir": ({"instance_data_dir": "/nonexistent/images"}, "--instance_data_dir"),
    "empty instance dir": ({"instance_data_dir": "{empty}"}, "holds no images"),
    "only corrupt instance images": ({"instance_data_dir": "{corrupt}"}, "none of the 1 images can be read"),
    "prior preservation without class dir": ({"with_prior_preservation": True, "class_prompt": CLASS_PROMPT},
                                             "--class_data_dir"),
    "prior preservation without class prompt": ({"with_prior_preservation": True, "class_data_dir": "{empty}"},
                                                "--class_prompt"),
    "resolution not a multiple of 8": ({"resolution": 60}, "multiple of 8"),
    "lora_layers naming no UNet layer": ({"lora_layers": "to_k,no_such_layer"},
                                         "--lora_layers: 'no_such_layer' names no Linear or Conv2d layer of the UNet"),
    "max_train_steps 0": ({"max_train_steps": 0}, "--max_train_steps"),
    "checkpointing_steps 0": ({"checkpointing_steps": 0}, "--checkpointing_steps"),
    "gradient_accumulation_steps 0": ({"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps"),
    "learning_rate -1": ({"learning_rate": -1}, "--learning_rate"),
    "checkpoints_total_limit 0": ({"checkpoints_total_limit": 0}, "--checkpoints_total_limit"),
    "num_class_images 0": ({"num_class_images": 0}, "--num_class_images"),
    "rank 0": ({"rank": 0}, "--rank"),
    "lora_dropout 1": ({"lora_dropout": 1.0}, "--lora_dropout"),
    "missing checkpoint": ({"resume_from_checkpoint": "checkpoint-999"}, "--resume_from_checkpoint"),
    "text encoder with precomputed embeddings": ({"train_text_encoder": True, "pre_compute_text_embeddings": True},
                                                 "--pre_compute_text_embeddings"),
    "unknown lr scheduler": ({"lr_scheduler": "sometimes"}, "--lr_scheduler"),
    "unknown prior precision": ({"prior_generation_precision": "fp8"}, "--prior_generation_precision"),
    "resolution not an int": ({"resolution": "big"}, "--resolution"),
    "cache_latents with a random crop": ({"cache_latents": True}, "--cache_latents needs --center_crop"),
    "cache_text_embeddings with text encoder training": ({"cache_text_embeddings": True, "train_text_encoder": True},
                                                         "--cache_text_embeddings cannot be used with "
                                                         "--train_text_encoder"),
    "feature_cache_dir is a file": ({"cache_text_embeddings": True, "feature_cache_dir": "{a_file}"},
                                    "--feature_cache_dir"),
    "cache_latents with a pixel-space model": ({"cache_latents": True, "center_crop": True,
                                                "pretrained_model_name_or_path": "{pixel_model}"}, "no vae/"),
}


def _existing_output(tmp_path):
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return str(out), snapshot(str(out))


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_gets_one_line_error(case, tiny_sd, instance_folder, tmp_path, capsys):
    from trainkit.cli import run_main

    overrides, expected = BAD_ARGUMENTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "a_file").write_text("not a folder")
    for part in ("tokenizer", "text_encoder", "unet", "scheduler"):
        (tmp_path / "pixel_model" / part).mkdir(parents=True)
    folders = {"empty": str(tmp_path / "empty"), "corrupt": str(tmp_path / "corrupt"),
               "a_file": str(tmp_path / "a_file"), "pixel_model": str(tmp_path / "pixel_model")}
    overrides = {k: v.format(**folders) if isinstance(v, str) else v for k, v in overrides.items()}
    out, before = _existing_output(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: _script().main(base_args(tiny_sd, instance_folder, out, **overrides)))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and expected in lines[0], stderr
    assert "Traceback" not in stderr
    assert snapshot(out) == before


def test_checkpoint_from_another_setup_is_refused_in_a_launched_run(tiny_sd, instance_folder, tmp_path):
    """A checkpoint whose LoRA file trained the text encoder, resumed without --train_text_encoder: one line, exit
    status 2, no traceback, output_dir untouched (a real process, as users see it)."""
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    save_file({"text_encoder.layer.lora.down.weight": torch.zeros(2, 2)}, str(out / "checkpoint-3" / LORA))
    before = snapshot(str(out))
    result = run_python(SCRIPT, base_args(tiny_sd, instance_folder, str(out), resume_from_checkpoint="latest"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume_from_checkpoint"), result.stderr[-3000:]
    assert "add --train_text_encoder" in lines[0]
    assert snapshot(str(out)) == before


# --------------------------------------------------------------------------------------------------------------------
# Real datasets (SPEC §9): aspect-ratio buckets, masked loss, caption dropout
# --------------------------------------------------------------------------------------------------------------------


def _bucket_args(folder, **values):
    """Parsed-and-checked real-data flags on top of _namespace: the explicit MIXED_ASPECT_BUCKETS list."""
    from conftest import MIXED_ASPECT_BUCKETS

    from trainkit import bucketing

    flags = {"aspect_ratio_buckets": MIXED_ASPECT_BUCKETS, "use_aspect_ratio_buckets": False,
             "bucket_min_resolution": None, "bucket_divisibility": 64, "validation_height": None,
             "validation_width": None, "masked_loss": True, "mask_column": None, "dataset_name": None,
             "instance_data_dir": folder, "image_column": "image", "train_batch_size": 2, "dataloader_num_workers": 0}
    flags.update(values)
    args = _namespace(**flags)
    bucketing.check_bucket_flags(args)
    return args


def _bucketed_dataset(folder, args, class_items=(), **kwargs):
    from trainkit.randomness import RunState

    script = _script()
    items, _ = script.read_image_folder(folder, INSTANCE_PROMPT)
    notes = []
    buckets, masks = script.assign_buckets(args, items), script.read_masks(args, items, notes)
    assert not notes  # every image of the folder has a mask
    prompts = {prompt: torch.full((1,), float(index)) for index, prompt in
               enumerate(dict.fromkeys([""] + [prompt for _, prompt in items + list(class_items)]))}
    dataset = script.DreamBoothDataset(items, list(class_items), script.PromptInputs(None, None, prompts), args,
                                       RunState(0), buckets=buckets, masks=masks, **kwargs)
    return dataset, items, buckets, masks


class _CPU:
    device = torch.device("cpu")


def test_bucketed_batches_masks_and_class_images_share_the_instance_bucket(mixed_aspect_folder):
    """MIXED_ASPECT_BUCKETS: landscape, portrait and square images go to their buckets (the 40x40 one upscaled to
    64x64: an explicit list); no batch mixes buckets; every sample appears once per epoch; each tensor has its
    bucket's shape, the class image of a sample is cropped to that bucket, its mask all ones; instance masks are the
    name.mask.png files (white left half) or square_0's alpha channel (transparent top half) on the latent grid, and
    follow the image's flip."""
    from trainkit.randomness import RunState

    script = _script()
    class_items = [(path, CLASS_PROMPT) for path, _ in script.read_image_folder(mixed_aspect_folder, "")[0][4:]]
    args = _bucket_args(mixed_aspect_folder, random_flip=True)
    dataset, items, buckets, masks = _bucketed_dataset(mixed_aspect_folder, args, class_items)
    by_name = {os.path.basename(path): bucket for path, bucket in buckets.items()}
    assert by_name == {"land_0.png": (64, 96), "land_1.png": (64, 96), "port_0.png": (96, 64),
                       "port_1.png": (96, 64), "small_0.png": (64, 64), "square_0.png": (64, 64)}
    assert {os.path.basename(path): source if source == script.ALPHA else os.path.basename(source)
            for path, source in masks.items()}["square_0.png"] == script.ALPHA
    assert os.path.basename(masks[items[0][0]]) == "land_0.mask.png"

    loader, sampler = script.make_train_dataloader(dataset, args, RunState(0), _CPU())
    assert len(loader) == 3
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for batch_keys, batch in zip(sampler, loader):
            indices = [index for _, index in batch_keys]
            seen += indices
            height, width = dataset.target_size(indices[0])
            assert {dataset.target_size(index) for index in indices} == {(height, width)}
            assert batch["pixel_values"].shape == (2 * len(indices), 3, height, width)
            assert batch["mask"].shape == (2 * len(indices), 1, height // 8, width // 8)
            instance_masks, class_masks = batch["mask"].chunk(2)
            assert (class_masks == 1).all() and (instance_masks < 1).any()
            assert batch["mask"].min() >= 0 and batch["mask"].max() <= 1
        assert sorted(seen) == list(range(6))

    # The mask follows the crop and the flip: a centre crop leaves only the flip to vary.
    upright = script.DreamBoothDataset(items, [], dataset.prompt_inputs, _bucket_args(mixed_aspect_folder,
                                                                                      center_crop=True),
                                       RunState(0), buckets=buckets, masks=masks)
    flipping = script.DreamBoothDataset(items, [], dataset.prompt_inputs, _bucket_args(
        mixed_aspect_folder, center_crop=True, random_flip=True), RunState(0), buckets=buckets, masks=masks)
    flips = []
    # The first image that is not its own mirror (some shapes are symmetric).
    index = next(index for index in range(len(items)) if not torch.equal(
        upright[(0, index)]["instance"]["pixel_values"], upright[(0, index)]["instance"]["pixel_values"].flip(-1)))
    for epoch in range(8):
        plain, example = upright[(epoch, index)]["instance"], flipping[(epoch, index)]["instance"]
        flipped = not torch.equal(example["pixel_values"], plain["pixel_values"])
        assert not flipped or torch.equal(example["pixel_values"], plain["pixel_values"].flip(-1))
        assert torch.equal(example["mask"], plain["mask"].flip(-1) if flipped else plain["mask"])
        flips.append(flipped)
    assert any(flips) and not all(flips)
    # land_0 (96x64 in the 64x96 bucket: no resize, no crop): its white left half is the left 6 of 12 latent columns.
    assert torch.equal(upright[(0, 0)]["instance"]["mask"][0], (torch.arange(12) < 6).float().expand(8, 12))
    # square_0's alpha: transparent top half, after a bilinear 80 -> 64 resize (the edge blurs a little).
    square = upright[(0, [os.path.basename(p) for p, _ in items].index("square_0.png"))]["instance"]["mask"][0]
    assert (square[:3] == 0).all() and (square[5:] == 1).all()


def test_caption_dropout_rate_is_binomial_reproducible_and_draws_nothing_else(instance_folder):
    """--proportion_empty_prompts 0.3: over 600 (epoch, index) samples the share of empty instance prompts is within
    4 standard deviations of 0.3, the same draws on a second pass, class prompts kept, crops unchanged."""
    from trainkit.randomness import RunState

    script = _script()
    items, _ = script.read_image_folder(instance_folder, INSTANCE_PROMPT)
    class_items = [(items[0][0], CLASS_PROMPT)]
    prompts = {prompt: torch.full((1,), float(index)) for index, prompt in
               enumerate(["", CLASS_PROMPT] + [prompt for _, prompt in items])}
    inputs = script.PromptInputs(None, None, prompts)
    args = _namespace(resolution=16)
    dropping = script.DreamBoothDataset(items, class_items, inputs, args, RunState(0), caption_dropout=0.3)
    keeping = script.DreamBoothDataset(items, class_items, inputs, args, RunState(0))
    keys = [(epoch, index) for epoch in range(200) for index in range(3)]

    def dropped(key):
        example = dropping[key]
        assert example["class"]["prompt_embeds"].item() == 1.0
        return example["instance"]["prompt_embeds"].item() == 0.0

    drops = [dropped(key) for key in keys]
    n, p = len(keys), 0.3
    assert abs(sum(drops) - n * p) < 4 * (n * p * (1 - p)) ** 0.5, sum(drops)
    assert drops == [dropped(key) for key in keys]
    for key in keys[:6]:
        assert torch.equal(dropping[key]["instance"]["pixel_values"], keeping[key]["instance"]["pixel_values"])
        assert keeping[key]["instance"]["prompt_embeds"].item() != 0.0


def test_masked_loss_with_an_all_ones_mask_equals_the_unmasked_loss(loss_inputs, monkeypatch):
    """The batch's mask reaches objectives.diffusion_loss, split in halves with prior preservation; an all-ones mask
    gives exactly the unmasked loss, a half mask another one."""
    batch = loss_inputs["batch"]
    plain, prior = _loss(loss_inputs), _loss(loss_inputs, with_prior_preservation=True)
    batch["mask"] = torch.ones(2, 1, 8, 8)
    try:
        assert _loss(loss_inputs) == plain
        assert _loss(loss_inputs, with_prior_preservation=True) == prior
        batch["mask"] = torch.ones(2, 1, 8, 8)
        batch["mask"][0, :, :, :4] = 0
        assert _loss(loss_inputs) != pytest.approx(plain)
        assert _loss(loss_inputs, with_prior_preservation=True) != pytest.approx(prior)
    finally:
        del batch["mask"]


def test_cached_latents_at_bucket_size_pair_with_their_prompts_and_rekey_only_changed_buckets(
        tiny_sd, mixed_aspect_folder, tmp_path):
    """--cache_latents with buckets, --random_flip and --masked_loss: entries at each sample's bucket size (both
    orientations, the mask too); over two shuffled epochs in the bucket sampler's order (a resumed run reads the same
    (epoch, index) keys) every cached example holds its own image's latents, mask and prompt; moving the square
    bucket recomputes exactly the entries of the images in it (instance and paired class images)."""
    from conftest import MIXED_ASPECT_BUCKETS
    from diffusers import AutoencoderKL

    from trainkit import bucketing
    from trainkit.randomness import RunState

    script = _script()
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    class_items = [(path, CLASS_PROMPT) for path, _ in script.read_image_folder(mixed_aspect_folder, "")[0][4:]]
    cache_dir = str(tmp_path / "cache")
    args = _bucket_args(mixed_aspect_folder, center_crop=True, random_flip=True, feature_cache_dir=cache_dir)
    fresh, items, buckets, masks = _bucketed_dataset(mixed_aspect_folder, args, class_items)
    cached, *_ = _bucketed_dataset(mixed_aspect_folder, args, class_items)
    views = cached.latent_views()
    cached.use_latent_cache(*script.cache_latents(_OneProcess(), vae, views, args, torch.float32, masks))
    entries = _cache_entries(cache_dir, "latents")
    # 6 instance images at their buckets; the 2 class images at the buckets of the samples they pair with.
    assert len(entries) == len(views) == 10
    sampler = bucketing.BucketBatchSampler(cached.buckets_of_samples(), 2, RunState(0), script.SHUFFLE_STREAM)
    with torch.no_grad():
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for batch in sampler:
                for key in batch:
                    expected, got = fresh[key], cached[key]
                    for half in ("instance", "class"):
                        height, width = fresh.target_size(key[1])
                        pixels = expected[half]["pixel_values"][None]
                        latents = vae.encode(pixels).latent_dist.parameters[0]
                        assert got[half]["latent_dist"].shape == (8, height // 8, width // 8)
                        torch.testing.assert_close(got[half]["latent_dist"], latents, rtol=1e-5, atol=1e-5)
                        assert torch.equal(got[half]["mask"], expected[half]["mask"])
                        assert torch.equal(got[half]["prompt_embeds"], expected[half]["prompt_embeds"])

    moved = _bucket_args(mixed_aspect_folder, center_crop=True, random_flip=True, feature_cache_dir=cache_dir,
                         aspect_ratio_buckets=MIXED_ASPECT_BUCKETS.replace("64,64", "48,48"))
    again, *_ = _bucketed_dataset(mixed_aspect_folder, moved, class_items)
    changed = set(again.latent_views()) - set(views)
    assert {view.size for view in changed} == {(48, 48)} and len(changed) >= 2
    script.cache_latents(_OneProcess(), vae, again.latent_views(), moved, torch.float32, masks)
    after = _cache_entries(cache_dir, "latents")
    assert {path: time for path, time in after.items() if path in entries} == entries
    assert len(after) - len(entries) == len(changed)


def test_buckets_masked_loss_and_prior_preservation_resume_exactly(tiny_sd, mixed_aspect_folder, tmp_path):
    """One launched run on the mixed-aspect folder with MIXED_ASPECT_BUCKETS (3 buckets of 2 images: 3 batches of 2
    per epoch, 2 steps at accumulation 2), --masked_loss from the mask files and the alpha channel, prior
    preservation (2 square class images cropped to each sample's bucket), random flips and caption dropout; a
    validation image at 64x96. Resuming checkpoint-1 (mid-epoch: 2 of its 3 batches done) in another folder ends bit
    for bit like the straight run; the LoRA loads into the SD pipeline and renders at 64x96."""
    from conftest import MIXED_ASPECT_BUCKETS
    from diffusers import StableDiffusionPipeline

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for index, image in enumerate(_images(2, seed=5)):
        image.resize((32, 32)).save(class_dir / f"dog_{index}.png")
    settings = {"aspect_ratio_buckets": MIXED_ASPECT_BUCKETS, "masked_loss": True, "with_prior_preservation": True,
                "class_data_dir": str(class_dir), "class_prompt": CLASS_PROMPT, "num_class_images": 2,
                "train_batch_size": 2, "gradient_accumulation_steps": 2, "random_flip": True,
                "proportion_empty_prompts": 0.5, "max_train_steps": 4, "checkpointing_steps": 1}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, straight, **settings,
                                      validation_prompt="a photo of sks dog", num_validation_images=1,
                                      validation_epochs=100, validation_height=64, validation_width=96))
    assert "6 instance images, 6 examples, 2 epochs of 2 steps, 4 steps in all" in result.stderr
    assert "64x64: 2, 64x96: 2, 96x64: 2" in result.stderr
    assert Image.open(os.path.join(straight, "validation", "final", "00.png")).size == (96, 64)
    with open(os.path.join(straight, "README.md")) as file:
        card = file.read()
    assert "Aspect-ratio buckets (height,width): `64,64;64,96;96,64`" in card and "Masked loss" in card

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    train(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, resumed, **settings, resume_from_checkpoint="latest"))
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(straight, folder), os.path.join(resumed, folder))

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(straight)
    image = pipeline("a photo of sks dog", num_inference_steps=2, height=64, width=96, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 96, 3) and torch.isfinite(torch.from_numpy(image)).all()
