"""textual_inversion.py, launched as users launch it, on a tiny local Stable Diffusion model."""

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MIXED_ASPECT_BUCKETS
from helpers import (
    assert_one_line_error,
    checkpoints,
    fail_in_process,
    launch,
    run_python,
    send_signal_and_wait,
    snapshot,
    start_python,
    train,
    wait_for_path,
)

SCRIPT = "textual_inversion.py"
TOKEN = "<cat-toy>"
EMBEDDING_KEY = "embeddings.token_embedding.weight"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


def base_args(model, data, output_dir, **overrides):
    """Tiny, fast settings: 64 px (8x8 latents), batch 2, each of the 7 images once per epoch (4 batches)."""
    args = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "placeholder_token": TOKEN,
        "initializer_token": "toy",
        "resolution": 64,
        "output_dir": output_dir,
        "train_batch_size": 2,
        "repeats": 1,
        "max_train_steps": 4,
        "learning_rate": 1e-2,
        "lr_warmup_steps": 0,
        "seed": 0,
        "logging_steps": 1,
        "validation_inference_steps": 2,
    }
    args.update(overrides)
    flags = []
    for key, value in args.items():
        if value is True:
            flags.append(f"--{key}")
        elif value is not None and value is not False:
            flags += [f"--{key}", str(value)]
    return flags


def embeds(path):
    return load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)


def assert_same_embeds(path_a, path_b):
    a, b = embeds(path_a), embeds(path_b)
    assert a.keys() == b.keys() == {TOKEN}
    assert torch.equal(a[TOKEN], b[TOKEN]), f"{path_a} and {path_b} differ"


def base_embedding_matrix(model):
    return load_file(os.path.join(model, "text_encoder", "model.safetensors"))[EMBEDDING_KEY]


def toy_id(model):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    return tokenizer.encode("toy", add_special_tokens=False)[0], len(tokenizer)


def test_trains_and_the_embedding_loads_into_a_pipeline(tiny_sd, image_folder, tmp_path):
    out = str(tmp_path / "out")
    result = launch(SCRIPT, base_args(
        tiny_sd, image_folder, out, num_vectors=2, save_steps=2, checkpointing_steps=2, save_as_full_pipeline=True,
        validation_prompt=f"a photo of {TOKEN}", validation_steps=2, num_validation_images=2,
    ))

    # The corrupt file is skipped by name; the 7 good images make 4 batches of 2.
    assert "Skipping unreadable image" in result.stderr and "corrupt.png" in result.stderr
    assert "7 images x 1 repeats = 7 samples" in result.stderr
    learned = embeds(os.path.join(out, "learned_embeds.safetensors"))
    assert list(learned) == [TOKEN] and learned[TOKEN].shape == (2, 32)
    toy, vocabulary = toy_id(tiny_sd)
    base = base_embedding_matrix(tiny_sd)
    initial = base[toy].repeat(2, 1)
    assert not torch.equal(learned[TOKEN], initial), "the new vectors did not train"

    # --save_steps files, and checkpoints that hold the new rows (loadable by themselves), not the text encoder.
    for step in (2, 4):
        assert_same_embeds(os.path.join(out, f"learned_embeds-steps-{step}.safetensors"),
                           os.path.join(out, f"checkpoint-{step}", "learned_embeds.safetensors"))
    assert_same_embeds(os.path.join(out, "learned_embeds-steps-4.safetensors"),
                       os.path.join(out, "learned_embeds.safetensors"))
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    checkpoint_files = os.listdir(os.path.join(out, "checkpoint-4"))
    assert not [name for name in checkpoint_files if name.startswith(("model", "pytorch_model"))], checkpoint_files
    checkpoint_bytes = sum(os.path.getsize(os.path.join(out, "checkpoint-4", n)) for n in checkpoint_files)
    assert checkpoint_bytes < os.path.getsize(os.path.join(tiny_sd, "text_encoder", "model.safetensors")) / 4

    # --save_as_full_pipeline: every original row of the embedding matrix is bit-identical; the new rows are learned.
    full = load_file(os.path.join(out, "text_encoder", "model.safetensors"))[EMBEDDING_KEY]
    assert full.shape == (vocabulary + 2, 32)
    assert torch.equal(full[:vocabulary], base), "rows other than the placeholder's changed"
    assert torch.equal(full[vocabulary:], learned[TOKEN])

    # Validation images are saved and logged; the model card says how to use the embedding.
    assert sorted(os.listdir(os.path.join(out, "validation"))) == [
        "step_2_0.png", "step_2_1.png", "step_4_0.png", "step_4_1.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs", "textual_inversion"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [event.step for event in events.Images("validation")] == [2, 4]
    card = open(os.path.join(out, "README.md")).read()
    assert "load_textual_inversion" in card and "textual_inversion" in card

    # load_textual_inversion(output_dir) resolves <cat-toy> to both vectors and the prompt uses the learned values:
    # the image differs from the one the same tokens give with their initial (initializer) values.
    from diffusers import StableDiffusionPipeline

    def render(source):
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.load_textual_inversion(source, token=TOKEN if isinstance(source, dict) else None)
        assert pipeline.maybe_convert_prompt(f"a {TOKEN}", pipeline.tokenizer) == f"a {TOKEN} {TOKEN}_1"
        return pipeline(f"a photo of {TOKEN}", num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    trained = render(out)
    assert trained.shape == (1, 64, 64, 3)
    assert not torch.equal(torch.from_numpy(trained), torch.from_numpy(render({TOKEN: initial})))
    assert torch.equal(torch.from_numpy(trained), torch.from_numpy(render(os.path.join(out, "checkpoint-4"))))


def test_resume_is_exact(tiny_sd, image_folder, tmp_path):
    """N steps straight == resume from a mid-epoch checkpoint + the rest, bit for bit (random captions, flips,
    VAE sampling, noise), with gradient accumulation; checkpoint rotation before and after the resume."""
    # 7 images at batch 1 with accumulation 2: 4 steps an epoch (the last from one batch), so checkpoint-6 is
    # mid-epoch; checkpoints 3, 6, 9 with a limit of 2 leave 6 and 9.
    half, end = 6, 9
    settings = dict(train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=10, checkpointing_steps=3,
                    checkpoints_total_limit=2, lr_scheduler="cosine", lr_warmup_steps=2, num_vectors=2)
    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(tiny_sd, image_folder, straight, **settings))
    expected = {"checkpoint-6", "checkpoint-9"}
    assert checkpoints(straight) == expected

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, f"checkpoint-{half}"), os.path.join(resumed, f"checkpoint-{half}"))
    # An older checkpoint beside it, which rotation after the resumed run's first save must remove.
    shutil.copytree(os.path.join(straight, f"checkpoint-{half}"), os.path.join(resumed, "checkpoint-3"))
    result = train(SCRIPT, base_args(tiny_sd, image_folder, resumed, resume_from_checkpoint="latest", **settings))
    assert f"Resuming from {os.path.join(resumed, f'checkpoint-{half}')}" in result.stderr
    assert checkpoints(resumed) == expected

    for name in (f"checkpoint-{end}/learned_embeds.safetensors", "learned_embeds.safetensors"):
        assert_same_embeds(os.path.join(straight, name), os.path.join(resumed, name))


def test_sigterm_saves_a_checkpoint_and_latest_resumes_exactly(tiny_sd, image_folder, tmp_path):
    """Also: style templates, --center_crop and --no_safe_serialization (.bin outputs)."""
    settings = dict(train_batch_size=1, repeats=3, max_train_steps=30, checkpointing_steps=5, save_steps=5,
                    lr_scheduler="linear", learnable_property="style", center_crop=True, no_safe_serialization=True)
    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, base_args(tiny_sd, image_folder, interrupted, **settings))
    wait_for_path(os.path.join(interrupted, "checkpoint-5"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)

    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(interrupted))
    assert 5 <= stop_step < 30, "the signal arrived after the run had finished: the test needs more steps"
    assert not os.path.exists(os.path.join(interrupted, "learned_embeds.bin"))

    train(SCRIPT, base_args(tiny_sd, image_folder, interrupted, resume_from_checkpoint="latest", **settings))
    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(tiny_sd, image_folder, straight, **settings))
    assert not os.path.exists(os.path.join(straight, "learned_embeds.safetensors"))
    assert_same_embeds(os.path.join(straight, "learned_embeds.bin"), os.path.join(interrupted, "learned_embeds.bin"))
    assert_same_embeds(os.path.join(straight, "learned_embeds-steps-30.bin"),
                       os.path.join(interrupted, "learned_embeds-steps-30.bin"))

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipeline.load_textual_inversion(straight, weight_name="learned_embeds.bin")
    assert TOKEN in pipeline.tokenizer.get_vocab()


def test_two_processes(tiny_sd, image_folder, tmp_path):
    """CPU DDP over gloo: trains, validates (images split across ranks), checkpoints and resumes exactly."""
    settings = dict(max_train_steps=4, checkpointing_steps=2, validation_prompt=f"a photo of {TOKEN}",
                    validation_steps=4, num_validation_images=3)
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, image_folder, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {
        "random_states_0.pkl", "random_states_1.pkl", "learned_embeds.safetensors"}
    assert sorted(os.listdir(os.path.join(straight, "validation"))) == [f"step_4_{i}.png" for i in range(3)]

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    launch(SCRIPT, base_args(tiny_sd, image_folder, resumed, resume_from_checkpoint="checkpoint-2", **settings),
           num_processes=2)
    assert_same_embeds(os.path.join(straight, "learned_embeds.safetensors"),
                       os.path.join(resumed, "learned_embeds.safetensors"))


def _cache_entries(cache_dir, kind):
    """{entry path: mtime} of one kind of feature-cache entry."""
    entries = {}
    for root, _, files in os.walk(os.path.join(cache_dir, kind)):
        for name in files:
            if name.endswith(".safetensors"):
                entries[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
    return entries


def test_feature_cache_matches_fresh_encodings_is_reused_and_resumes_exactly(tiny_sd, image_folder,
                                                                             tmp_path):
    """--cache_latents (images are always flipped at random, so both orientations are cached), 2 repeats of each
    image: one entry per image file, not per sample.
    - training on the cache equals training on fresh encodings within fp32 rounding (the VAE sees other batch
      shapes when filling the cache, nothing else differs); validation loads the dropped VAE again;
    - a second run, resuming the first's checkpoint-2 in another output folder with 2 data loader workers,
      computes nothing, rewrites no entry and ends bit for bit like the first.
    (That an edited image recomputes its entry only is shown by test_text_to_image and test_common.)"""
    data = str(tmp_path / "data")
    shutil.copytree(image_folder, data)
    cache = str(tmp_path / "cache")
    settings = dict(repeats=2, num_vectors=2, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-4)
    cached = dict(cache_latents=True, feature_cache_dir=cache)

    fresh = str(tmp_path / "fresh")
    train(SCRIPT, base_args(tiny_sd, data, fresh, **settings))
    first = str(tmp_path / "first")
    result = launch(SCRIPT, base_args(tiny_sd, data, first, **settings, **cached, validation_prompt=f"a {TOKEN}",
                                      validation_steps=4, num_validation_images=1))
    # 7 readable images (the corrupt one is skipped before the cache sees it), each seen twice an epoch.
    assert "7 images x 2 repeats = 14 samples" in result.stderr
    assert "latents: 0 of 7 cached" in result.stderr and "computing 7" in result.stderr
    latents = _cache_entries(cache, "latents")
    assert len(latents) == 7
    learned, expected = (embeds(os.path.join(folder, "learned_embeds.safetensors"))[TOKEN] for folder in (first, fresh))
    torch.testing.assert_close(learned, expected, rtol=0, atol=2e-6)
    toy, _ = toy_id(tiny_sd)
    assert not torch.equal(learned, base_embedding_matrix(tiny_sd)[toy].repeat(2, 1)), "the new vectors did not train"
    assert os.listdir(os.path.join(first, "validation")) == ["step_4_0.png"]

    second = str(tmp_path / "second")
    shutil.copytree(os.path.join(first, "checkpoint-2"), os.path.join(second, "checkpoint-2"))
    result = train(SCRIPT, base_args(tiny_sd, data, second, **settings, **cached, resume_from_checkpoint="latest",
                                     dataloader_num_workers=2))
    assert "latents: 7 of 7 cached" in result.stderr and "computing 0" in result.stderr
    assert _cache_entries(cache, "latents") == latents
    for name in ("checkpoint-4/learned_embeds.safetensors", "learned_embeds.safetensors"):
        assert_same_embeds(os.path.join(first, name), os.path.join(second, name))


def test_buckets_masked_loss_and_cache_resume_exactly_and_load_at_a_bucket_shape(tiny_sd, mixed_aspect_folder,
                                                                                  tmp_path):
    """Aspect-ratio buckets (landscape, portrait, square) with --masked_loss (mask files and an alpha channel) and
    --cache_latents, accumulation 2: 6 images x 2 repeats make 6 one-bucket batches, 3 steps an epoch, so
    checkpoint-4 is in the middle of the second epoch (whose order must be that epoch's, not the first's).
    - the cache holds each image at its bucket's latent size with its latent-grid mask, both orientations;
    - resuming checkpoint-4 (reusing every entry) ends bit for bit like the straight run;
    - training on fresh encodings ends like the cached run within fp32 rounding;
    - validation renders at --validation_height/--validation_width, the model card names the buckets, and the
      embedding loads into StableDiffusionPipeline, which generates at a bucket's (non-square) shape."""
    cache = str(tmp_path / "cache")
    settings = dict(aspect_ratio_buckets=MIXED_ASPECT_BUCKETS, masked_loss=True, center_crop=True, repeats=2,
                    gradient_accumulation_steps=2, max_train_steps=5, checkpointing_steps=4)
    cached = dict(cache_latents=True, feature_cache_dir=cache)
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, straight, **settings, **cached,
                                      validation_prompt=f"a {TOKEN}", validation_steps=4, num_validation_images=1,
                                      validation_height=64, validation_width=96))
    assert "6 images x 2 repeats = 12 samples, 2 epochs of 3 steps" in result.stderr
    assert "Aspect-ratio buckets (height x width: images): 64x64: 2, 64x96: 2, 96x64: 2; 6 batches" in result.stderr
    assert "latents: 0 of 6 cached" in result.stderr
    entries = _cache_entries(cache, "latents")
    shapes = sorted(tuple(load_file(path)["latent_dist"].shape) for path in entries)
    assert shapes == [(8, 8, 8)] * 2 + [(8, 8, 12)] * 2 + [(8, 12, 8)] * 2  # mean and log-variance, h / 8, w / 8
    for path in entries:
        entry = load_file(path)
        assert set(entry) == {"latent_dist", "flipped", "mask", "mask_flipped"}
        assert entry["mask"].shape == (1, *entry["latent_dist"].shape[1:])
        torch.testing.assert_close(entry["mask_flipped"], entry["mask"].flip(-1), rtol=0, atol=1e-6)
    from PIL import Image

    assert Image.open(os.path.join(straight, "validation", "step_4_0.png")).size == (96, 64)
    card = open(os.path.join(straight, "README.md")).read()
    assert "64,64;64,96;96,64" in card and "masked loss" in card

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(straight, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))
    result = train(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, resumed, **settings, **cached,
                                     resume_from_checkpoint="latest"))
    assert "latents: 6 of 6 cached" in result.stderr
    assert _cache_entries(cache, "latents") == entries
    assert_same_embeds(os.path.join(straight, "learned_embeds.safetensors"),
                       os.path.join(resumed, "learned_embeds.safetensors"))

    fresh = str(tmp_path / "fresh")
    train(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, fresh, **settings))
    torch.testing.assert_close(embeds(os.path.join(fresh, "learned_embeds.safetensors"))[TOKEN],
                               embeds(os.path.join(straight, "learned_embeds.safetensors"))[TOKEN], rtol=0, atol=2e-6)

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_textual_inversion(straight)
    image = pipeline(f"a photo of {TOKEN}", num_inference_steps=2, height=64, width=96, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 96, 3)


def test_diffusers_docs_command_runs_unchanged(tiny_sd, tmp_path):
    """The diffusers docs' command line with the tiny model and two local images. 3000 steps at 512 px would take
    hours on CPU, so a SIGTERM right after training starts keeps it short: it must parse, scale the learning rate,
    train a first step and leave a checkpoint holding the <cat-toy> embedding."""
    from conftest import _shape_images

    data = tmp_path / "cat_toy"
    data.mkdir()
    for index, image in enumerate(_shape_images(2)):
        image.save(data / f"{index}.jpeg")
    out = str(tmp_path / "textual_inversion_cat")
    process = start_python(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_sd}", f"--train_data_dir={data}", '--learnable_property=object',
        f'--placeholder_token={TOKEN}', '--initializer_token=toy', "--resolution=512", "--train_batch_size=1",
        "--gradient_accumulation_steps=4", "--max_train_steps=3000", "--learning_rate=5.0e-04", "--scale_lr",
        '--lr_scheduler=constant', "--lr_warmup_steps=0", f'--output_dir={out}',
    ])
    wait_for_path(os.path.join(out, "logs"), process)
    status, _, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    # 2 images x 100 repeats at batch 1 and accumulation 4: 50 steps an epoch; lr 5e-4 x 4 x 1 x 1.
    assert "2 images x 100 repeats = 200 samples, 60 epochs of 50 steps, 3000 steps in all" in stderr
    assert "learning rate 0.002" in stderr
    assert checkpoints(out) == {"checkpoint-1"}
    assert embeds(os.path.join(out, "checkpoint-1", "learned_embeds.safetensors"))[TOKEN].shape == (1, 32)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, non-zero exit, no traceback, output_dir untouched (SPEC §7)
# --------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "missing train_data_dir": ({"train_data_dir": "/nonexistent/images"}, "--train_data_dir"),
    "empty image folder": ({"train_data_dir": "{empty_dir}"}, "holds no images"),
    "only corrupt images": ({"train_data_dir": "{corrupt_only}"}, "none of the 1 images"),
    "multi-token initializer": ({"initializer_token": "xyzzy"}, "--initializer_token 'xyzzy' must be exactly one"),
    "placeholder already in the tokenizer": (
        {"tokenizer_name": "{used_tokenizer}"}, "already has the token '<cat-toy>'"),
    "num_vectors 0": ({"num_vectors": 0}, "--num_vectors must be >= 1"),
    "max_train_steps 0": ({"max_train_steps": 0}, "--max_train_steps"),
    "learning_rate 0": ({"learning_rate": 0}, "--learning_rate"),
    "resolution not a multiple of 8": ({"resolution": 60}, "--resolution must be a multiple of 8"),
    "save_steps -1": ({"save_steps": -1}, "--save_steps"),
    "checkpoints_total_limit 0": ({"checkpoints_total_limit": 0}, "--checkpoints_total_limit"),
    "missing checkpoint": ({"resume_from_checkpoint": "checkpoint-999"}, "--resume_from_checkpoint"),
    "checkpoint of another placeholder": ({"resume_from_checkpoint": "{other_checkpoint}"}, "--num_vectors 1"),
    "missing model": ({"pretrained_model_name_or_path": "/nonexistent/sd"}, "--pretrained_model_name_or_path"),
    "model folder that is not an SD folder": ({"pretrained_model_name_or_path": "{empty_dir}"}, "missing tokenizer"),
    "unknown learnable property": ({"learnable_property": "objects"}, "--learnable_property"),
    "feature_cache_dir is a file": ({"cache_latents": True, "feature_cache_dir": "{a_file}"},
                                    "--feature_cache_dir"),
    "malformed aspect_ratio_buckets": ({"aspect_ratio_buckets": "64x96"}, "--aspect_ratio_buckets '64x96'"),
    "bucket side not a multiple of 8": ({"aspect_ratio_buckets": "64,100"}, "bucket 64,100 has a side"),
    "bucket_min_resolution above resolution": ({"use_aspect_ratio_buckets": True, "bucket_min_resolution": 128},
                                               "--bucket_min_resolution (128) must be <= --resolution (64)"),
    "bucket list with bucket_min_resolution": ({"aspect_ratio_buckets": "64,64", "bucket_min_resolution": 32},
                                               "cannot be combined"),
    "cached random bucket crops": ({"use_aspect_ratio_buckets": True, "cache_latents": True},
                                   "--cache_latents with aspect-ratio buckets needs --center_crop"),
    "masked_loss without any mask": ({"masked_loss": True},
                                     "looked for name.mask.png beside each image name.* and for an alpha channel"),
    "mask of another size": ({"masked_loss": True, "train_data_dir": "{bad_mask}"}, "bad_mask/a.mask.png is 16x8"),
}


# Found only once the images are read (after the Accelerator exists): this runs as a process; the rest fail while the
# arguments, tokenizer and checkpoint are checked and run in-process through the script's entry point.
FOUND_AFTER_LOADING = {"only corrupt images"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_error(case, tiny_sd, image_folder, tmp_path, capsys):
    overrides, expected = BAD_INPUTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt_only").mkdir()
    (tmp_path / "corrupt_only" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "bad_mask").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "bad_mask" / "a.png")
    Image.new("L", (16, 8)).save(tmp_path / "bad_mask" / "a.mask.png")
    values = {"empty_dir": str(tmp_path / "empty"), "corrupt_only": str(tmp_path / "corrupt_only"),
              "a_file": str(tmp_path / "a_file"), "bad_mask": str(tmp_path / "bad_mask")}
    if "{used_tokenizer}" in overrides.values():
        # A tokenizer saved by an earlier run that already learned <cat-toy>.
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
        tokenizer.add_tokens([TOKEN])
        tokenizer.save_pretrained(str(tmp_path / "used_tokenizer"))
        values["used_tokenizer"] = str(tmp_path / "used_tokenizer")
    if "{other_checkpoint}" in overrides.values():
        other = tmp_path / "other" / "checkpoint-2"
        other.mkdir(parents=True)
        save_file({TOKEN: torch.zeros(3, 32)}, str(other / "learned_embeds.safetensors"))
        values["other_checkpoint"] = str(other)
    overrides = {k: v.format(**values) if isinstance(v, str) else v for k, v in overrides.items()}

    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    args = base_args(tiny_sd, image_folder, str(out), **overrides)
    if case in FOUND_AFTER_LOADING:
        result = run_python(SCRIPT, args)
        status, stderr = result.returncode, result.stderr
    else:
        status, stderr = fail_in_process("textual_inversion", args, capsys)
    assert_one_line_error(status, stderr, [expected])
    assert snapshot(str(out)) == before


def test_exif_orientation_and_restorable_per_sample_randomness(tiny_sd, tmp_path):
    """In-process (no launch): a phone photo's EXIF rotation is applied; a sample's caption template and flip depend
    only on (seed, epoch, index), so a resumed run or another worker draws the same ones."""
    from argparse import Namespace

    from PIL import Image
    from transformers import CLIPTokenizer

    from trainkit import families, randomness
    import textual_inversion as script

    path = str(tmp_path / "rotated.jpg")
    image = Image.new("RGB", (30, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    image.save(path, exif=exif)
    assert script._load_rgb(path).size == (20, 30)

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    args = Namespace(learnable_property="object", resolution=16, center_crop=False, repeats=4,
                     family=families.FAMILIES["sd"])
    dataset = script.TextualInversionDataset([path], tokenizer, "toy", args, randomness.RunState(seed=7))
    assert len(dataset) == 4
    samples = {(epoch, index): dataset[(epoch, index)] for epoch in range(3) for index in range(4)}
    for key, sample in samples.items():
        again = dataset[key]
        assert torch.equal(sample["input_ids"], again["input_ids"])
        assert torch.equal(sample["pixel_values"], again["pixel_values"])
    assert len({tuple(sample["input_ids"].tolist()) for sample in samples.values()}) > 1, "one template for all"
    assert samples[(0, 0)]["pixel_values"].shape == (3, 16, 16)


# --------------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets and masked loss, in-process (SPEC §9)
# --------------------------------------------------------------------------------------------------------------------

# The bucket (height, width) MIXED_ASPECT_BUCKETS gives each image of the mixed_aspect_folder fixture.
EXPECTED_BUCKETS = {"land_0": (64, 96), "land_1": (64, 96), "port_0": (96, 64), "port_1": (96, 64),
                    "square_0": (64, 64), "small_0": (64, 64)}


def _bucketed(script, tiny_sd, folder, tmp_path, **overrides):
    """(args, dataset) as main builds them, for the mixed-aspect folder with the explicit bucket list."""
    from transformers import CLIPTokenizer

    from trainkit import bucketing, families, randomness

    settings = dict(aspect_ratio_buckets=MIXED_ASPECT_BUCKETS, masked_loss=True, repeats=2)
    settings.update(overrides)
    args = script.parse_args(base_args(tiny_sd, folder, str(tmp_path / "out"), **settings))
    args.family = families.detect(tiny_sd)
    bucketing.check_bucket_flags(args)
    paths, _ = script.readable_images(folder)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    return args, script.TextualInversionDataset(paths, tokenizer, TOKEN, args, randomness.RunState(seed=3))


def _name(dataset, index):
    return os.path.splitext(os.path.basename(dataset.paths[index % len(dataset.paths)]))[0]


def test_bucketed_batches_shapes_masks_and_random_crops(tiny_sd, mixed_aspect_folder, tmp_path):
    """Every sample once an epoch, batches never mix buckets, each image trains at its bucket's shape with its mask
    framed and flipped like it (mask files: white left half; square_0's alpha: opaque bottom half), random crops are
    restorable and vary, and an all-ones mask gives exactly the unmasked loss."""
    import textual_inversion as script
    from trainkit import objectives

    args, dataset = _bucketed(script, tiny_sd, mixed_aspect_folder, tmp_path, center_crop=True)
    assert len(dataset) == 12 and dataset.describe_buckets() == "64x64: 2, 64x96: 2, 96x64: 2"
    _, sampler = script.training_dataloader(dataset, args, dataset.run_state, pin_memory=False)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 6
        indices = [index for batch in batches for _, index in batch]
        assert sorted(indices) == list(range(12)) and all(e == epoch for batch in batches for e, _ in batch)
        orders.append(indices)
        for batch in batches:
            assert len({EXPECTED_BUCKETS[_name(dataset, index)] for _, index in batch}) == 1, batch
        collated = torch.utils.data.default_collate([dataset[key] for key in batches[0]])
        height, width = EXPECTED_BUCKETS[_name(dataset, batches[0][0][1])]
        assert collated["pixel_values"].shape == (2, 3, height, width)
        assert collated["loss_mask"].shape == (2, 1, height // 8, width // 8)
        assert collated["target_size"].tolist() == [[height, width]] * 2
    assert orders[0] != orders[1], "the bucketed order does not change between epochs"

    for index in range(len(dataset)):
        sample, name = dataset[(0, index)], _name(dataset, index)
        height, width = EXPECTED_BUCKETS[name]
        assert sample["pixel_values"].shape == (3, height, width)
        assert torch.equal(sample["pixel_values"], dataset[(0, index)]["pixel_values"])  # restorable
        mask = sample["loss_mask"][0]
        assert mask.shape == (height // 8, width // 8) and 0 <= mask.min() and mask.max() <= 1
        if name == "square_0":  # alpha: the top half transparent, whatever the flip
            assert mask[: mask.shape[0] // 2 - 1].max() == 0 and mask[mask.shape[0] // 2 + 1:].min() == 1
        else:  # the white left half, mirrored when the sample is flipped
            framing = dataset.framing.frame(*dataset.sizes[index % 6], None)
            unflipped = script.image_tensor(script._load_rgb(dataset.paths[index % 6]), framing, flip=False)
            flipped = not torch.equal(sample["pixel_values"], unflipped)
            left, right = mask[:, : mask.shape[1] // 2 - 1], mask[:, mask.shape[1] // 2 + 1:]
            white, black = (right, left) if flipped else (left, right)
            assert white.min() == 1 and black.max() == 0, (name, flipped)

    # Random crops (no --center_crop): land_1 (112 x 72) covers its 64 x 96 bucket at 100 x 64, so the crop's left
    # is drawn from 0..4; the same sample draws the same crop again, other epochs draw others.
    args, dataset = _bucketed(script, tiny_sd, mixed_aspect_folder, tmp_path, masked_loss=False)
    land_1 = [name for name in map(os.path.basename, dataset.paths)].index("land_1.png")
    crops = {tuple(dataset[(epoch, land_1)]["crop_top_left"].tolist()) for epoch in range(12)}
    assert len(crops) > 1 and all(top == 0 and 0 <= left <= 4 for top, left in crops)
    assert torch.equal(dataset[(5, land_1)]["pixel_values"], dataset[(5, land_1)]["pixel_values"])

    # Without buckets the mask follows today's square framing.
    _, dataset = _bucketed(script, tiny_sd, mixed_aspect_folder, tmp_path, aspect_ratio_buckets=None)
    sample = dataset[(0, land_1)]
    assert sample["pixel_values"].shape == (3, 64, 64) and sample["loss_mask"].shape == (1, 8, 8)

    prediction, target = torch.randn(2, 4, 8, 12), torch.randn(2, 4, 8, 12)
    assert torch.equal(objectives.diffusion_loss(prediction, target, mask=torch.ones(2, 1, 8, 12)),
                       objectives.diffusion_loss(prediction, target))


class _OneProcess:
    """What FeatureCache.fill asks of an Accelerator, for one CPU process."""
    device, process_index, num_processes, is_main_process = torch.device("cpu"), 0, 1, True

    def wait_for_everyone(self):
        pass


class _IdentityVAE(torch.nn.Module):
    """A 'VAE' whose latent distribution is the pixels themselves: a cached sample is then comparable, value for
    value, with the pixels the same sample gets without the cache."""

    def encode(self, pixels):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(parameters=pixels))


def test_cached_latents_pair_with_their_own_sample_and_bucket_changes_recompute_only_theirs(
        tiny_sd, mixed_aspect_folder, tmp_path):
    """With buckets and masks, in shuffled bucketed batches of two epochs: every cached sample holds its own image in
    its own orientation, its own mask and time-id geometry, exactly as the uncached sample (resume recomputes the
    same (epoch, index) keys). A new bucket list recomputes only the entries of the images whose bucket changed."""
    import textual_inversion as script

    args, uncached = _bucketed(script, tiny_sd, mixed_aspect_folder, tmp_path, center_crop=True,
                               feature_cache_dir=str(tmp_path / "cache"), cache_latents=True)
    _, cached = _bucketed(script, tiny_sd, mixed_aspect_folder, tmp_path, center_crop=True,
                          feature_cache_dir=str(tmp_path / "cache"), cache_latents=True)
    script.cache_latents(_OneProcess(), cached, _IdentityVAE(), args, torch.float32)
    _, sampler = script.training_dataloader(cached, args, cached.run_state, pin_memory=False)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for key in batch:
                with_cache, without = cached[key], uncached[key]
                assert torch.equal(with_cache.pop("latent_dist"), without.pop("pixel_values")), key
                torch.testing.assert_close(with_cache.pop("loss_mask"), without.pop("loss_mask"), rtol=0, atol=1e-6)
                assert with_cache.keys() == without.keys()
                for name in with_cache:
                    assert torch.equal(with_cache[name], without[name]), (key, name)

    other_args, other = _bucketed(script, tiny_sd, mixed_aspect_folder, tmp_path, center_crop=True,
                                  feature_cache_dir=str(tmp_path / "cache"), cache_latents=True,
                                  aspect_ratio_buckets="64,96;96,64;72,72")
    script.cache_latents(_OneProcess(), other, _IdentityVAE(), other_args, torch.float32)
    assert other.latent_cache.folder == cached.latent_cache.folder  # the bucket list is not a folder setting
    changed = {_name(cached, i) for i, (a, b) in enumerate(zip(cached.cache_keys, other.cache_keys)) if a != b}
    assert changed == {"square_0", "small_0"}
