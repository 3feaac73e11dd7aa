"""train_dreambooth_lora.py on a FLUX.1 base model (tests/tiny_sd.build_tiny_flux): upstream
train_dreambooth_lora_flux.py's command line, prior preservation with class images from the Flux pipeline, CLIP LoRA
(T5 frozen), --lora_layers, --rank / --lora_alpha in the file's metadata, exact resume (with accumulation, with the
feature caches, on 2 processes), SIGTERM, and the one-line errors of the Flux flags.

Resolution 32 (a multiple of 16: 4x4 latents, 2x2 tokens). Few launches, each read by several checks: the file costs
about 3 minutes of one CPU."""

import os
import re
import shutil
import signal

import pytest
import torch
from helpers import (
    assert_one_line_error,
    checkpoints,
    fail_in_process,
    launch,
    send_signal_and_wait,
    snapshot,
    start_python,
    train,
    wait_for_path,
)
from test_dreambooth_lora import CLASS_PROMPT, INSTANCE_PROMPT, assert_same_lora, base_args, lora
from test_dreambooth_lora import tiny_sd  # noqa: F401 (module fixture: the SD model of the Flux-only flag case)

SCRIPT = "train_dreambooth_lora.py"
RESOLUTION = 32


def _images(count, seed=0):
    from conftest import _shape_images

    return _shape_images(count, seed)


@pytest.fixture(scope="module")
def instance_folder(tmp_path_factory):
    """3 non-square images (24 x 20..22): at batch 1, 3 batches per epoch."""
    folder = tmp_path_factory.mktemp("instance")
    for index, image in enumerate(_images(3)):
        image.save(folder / f"dog_{index}.png")
    return str(folder)


def flux_args(model, data, output_dir, **overrides):
    return base_args(model, data, output_dir, **{"resolution": RESOLUTION, **overrides})


def _flux_pipeline(model):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipeline, prompt=INSTANCE_PROMPT):
    return pipeline(prompt, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


def assert_trained_between(earlier, later):
    """Steps between two LoRA files changed the weights (so that a resume which trained nothing cannot pass)."""
    a, b = lora(earlier), lora(later)
    assert a.keys() == b.keys() and any(not torch.equal(a[key], b[key]) for key in a), (earlier, later)


def parts(weights):
    """The models a LoRA file trains: the first part of its keys (transformer, text_encoder, ...)."""
    return {key.split(".")[0] for key in weights}


# --------------------------------------------------------------------------------------------------------------------
# The upstream command line
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_flux_command_runs_unchanged(tiny_flux, instance_folder, tmp_path):
    """The train_dreambooth_lora_flux.py README command (Prodigy at lr 1, guidance 1, accumulation 4, wandb) with the
    tiny model and no --mixed_precision (CPU); only --resolution (512 -> 32) and --max_train_steps (500 -> 2) are
    shrunk, and --validation_inference_steps=2 (ours) keeps the 4 + 4 validation images, at the pipeline's default
    1024 px, to seconds. wandb runs offline."""
    out = str(tmp_path / "trained-flux")
    result = launch(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_flux}", f"--instance_data_dir={instance_folder}",
        f"--output_dir={out}", "--instance_prompt=a photo of sks dog", "--resolution=32", "--train_batch_size=1",
        "--guidance_scale=1", "--gradient_accumulation_steps=4", "--optimizer=prodigy", "--learning_rate=1.",
        "--report_to=wandb", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=25", "--seed=0",
        "--validation_inference_steps=2",
    ], cwd=str(tmp_path))
    assert "2 steps in all, batch 1 per device, total batch 4" in result.stderr
    weights = lora(out)
    assert parts(weights) == {"transformer"}
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    from PIL import Image

    for name in ("epoch_0000", "final"):  # --num_validation_images defaults to 4
        files = sorted(os.listdir(os.path.join(out, "validation", name)))
        assert len(files) == 4, (name, files)
        # No --validation_height/--validation_width: FluxPipeline's default size.
        with Image.open(os.path.join(out, "validation", name, files[0])) as image:
            assert image.size == (1024, 1024)
    assert os.path.isdir(tmp_path / "wandb")
    with open(os.path.join(out, "README.md")) as file:
        card = file.read()
    assert "FluxPipeline.from_pretrained" in card and "\n- flux\n" in card
    # Upstream Flux's LoRA defaults: rank 4, alpha 4 (SD's alpha would be --rank), in the file's metadata.
    from diffusers import FluxPipeline

    _, metadata = FluxPipeline.lora_state_dict(out, return_lora_metadata=True)
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"]) == (4, 4)

    pipeline = _flux_pipeline(tiny_flux)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    assert not (render(pipeline) == base).all()


# --------------------------------------------------------------------------------------------------------------------
# Prior preservation, CLIP LoRA, --lora_layers, rank and alpha, rotation, exact resume
# --------------------------------------------------------------------------------------------------------------------

# 2 class images generated by the Flux pipeline; batch 1 (3 steps per epoch, so checkpoint-2 is mid-epoch), 4 steps,
# a checkpoint every 2 of which only the newest is kept.
PRIOR_SETTINGS = {"with_prior_preservation": True, "class_prompt": CLASS_PROMPT, "num_class_images": 2,
                  "sample_batch_size": 2, "train_text_encoder": True, "lora_layers": "attn.to_k,attn.to_q",
                  "rank": 4, "lora_alpha": 8, "weighting_scheme": "logit_normal", "max_train_steps": 4,
                  "checkpointing_steps": 2, "checkpoints_total_limit": 1}


@pytest.fixture(scope="module")
def prior_run(tiny_flux, instance_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_prior")
    out, class_dir = str(root / "out"), str(root / "class")
    result = train(SCRIPT, flux_args(tiny_flux, instance_folder, out, class_data_dir=class_dir, **PRIOR_SETTINGS))
    return {"out": out, "class_dir": class_dir, "result": result}


def test_prior_preservation_clip_lora_layers_rank_and_alpha_load_into_the_flux_pipeline(tiny_flux, prior_run):
    out, result = prior_run["out"], prior_run["result"]
    assert "2 class images (2 generated this run)" in result.stderr
    # CLIP trains; the frozen T5 encoded the instance and class prompts once and left memory.
    assert "The frozen text_encoder_2 encoded the 2 distinct prompts once and left memory" in result.stderr
    assert len(os.listdir(prior_run["class_dir"])) == 2
    assert checkpoints(out) == {"checkpoint-4"}
    assert_same_lora(os.path.join(out, "checkpoint-4"), out)
    # Upstream Flux's defaults: the transformer at weight decay 1e-4, CLIP at 5e-6 and 1e-3.
    optimizer = torch.load(os.path.join(out, "checkpoint-4", "optimizer.bin"), weights_only=False)
    assert [(group["lr"], group["weight_decay"]) for group in optimizer["param_groups"]] == [(1e-3, 1e-4),
                                                                                             (5e-6, 1e-3)]

    # The transformer's attn.to_k / attn.to_q only (in the double- and the single-stream block), and CLIP; T5 frozen.
    weights = lora(out)
    assert parts(weights) == {"transformer", "text_encoder"}
    modules = {key.split(".lora_")[0] for key in weights if key.startswith("transformer.")}
    assert modules == {f"transformer.{block}.0.attn.{name}" for block in ("transformer_blocks",
                                                                          "single_transformer_blocks")
                       for name in ("to_k", "to_q")}
    # Rank 4 everywhere; alpha 8 in the file's adapter metadata, so that loading scales by 8 / 4.
    assert {min(tensor.shape) for tensor in weights.values()} == {4}
    from diffusers import FluxPipeline

    _, metadata = FluxPipeline.lora_state_dict(out, return_lora_metadata=True)
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8

    pipeline = _flux_pipeline(tiny_flux)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    assert not (render(pipeline) == base).all()
    config = next(iter(pipeline.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    assert any("lora_" in name for name, _ in pipeline.text_encoder.named_parameters())
    assert not any("lora_" in name for name, _ in pipeline.text_encoder_2.named_parameters())


def test_flux_exact_resume_with_clip_lora_and_prior_preservation(tiny_flux, instance_folder, prior_run, tmp_path):
    """The first 2 steps of prior_run (class images reused), their checkpoint-2 resumed in a fresh folder to step 4
    == prior_run, bit for bit; rotation there too leaves checkpoint-4 only."""
    settings = dict(PRIOR_SETTINGS, class_data_dir=prior_run["class_dir"])
    half = str(tmp_path / "half")
    result = train(SCRIPT, flux_args(tiny_flux, instance_folder, half, **dict(settings, max_train_steps=2)))
    assert "(0 generated this run)" in result.stderr
    assert checkpoints(half) == {"checkpoint-2"}

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(half, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = train(SCRIPT, flux_args(tiny_flux, instance_folder, resumed, resume_from_checkpoint="latest",
                                     **settings))
    assert f"Resuming from {os.path.join(resumed, 'checkpoint-2')}" in result.stderr
    assert checkpoints(resumed) == {"checkpoint-4"}
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(prior_run["out"], folder), os.path.join(resumed, folder))
    assert_trained_between(os.path.join(half, "checkpoint-2"), resumed)


# --------------------------------------------------------------------------------------------------------------------
# Accumulation, the feature caches, exact resume
# --------------------------------------------------------------------------------------------------------------------


def test_flux_caches_equal_fresh_encodings_and_resume_exactly_with_accumulation(tiny_flux, instance_folder, tmp_path):
    """Accumulation 2, center crops, 4 steps, checkpoints at 2 and 4:
    - --cache_latents --cache_text_embeddings (VAE latents; T5 hidden states and CLIP pooled embeddings), given
      without --center_crop as upstream's command lines give them, train exactly like the uncached run with
      --center_crop (which also encodes its prompts once, before training);
    - the uncached run's checkpoint-2 resumed in a fresh folder, from the filled caches, ends bit for bit like it."""
    settings = {"center_crop": True, "gradient_accumulation_steps": 2, "max_train_steps": 4,
                "checkpointing_steps": 2}
    cache = str(tmp_path / "cache")
    cached_flags = {"cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": cache}
    fresh = str(tmp_path / "fresh")
    train(SCRIPT, flux_args(tiny_flux, instance_folder, fresh, **settings))
    assert checkpoints(fresh) == {"checkpoint-2", "checkpoint-4"}
    assert parts(lora(fresh)) == {"transformer"}

    # Upstream's Flux command lines give --cache_latents without --center_crop: centre crops are cached, said once.
    cached = str(tmp_path / "cached")
    result = train(SCRIPT, flux_args(tiny_flux, instance_folder, cached, **{**settings, "center_crop": False},
                                     **cached_flags))
    assert "the latents of centre crops are cached" in result.stderr
    assert "latents: 0 of 3 cached" in result.stderr
    assert re.search(r"text_embeddings: 0 of [1-9]", result.stderr), result.stderr[-3000:]
    for folder in ("checkpoint-2", "."):
        assert_same_lora(os.path.join(fresh, folder), os.path.join(cached, folder))

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(fresh, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = train(SCRIPT, flux_args(tiny_flux, instance_folder, resumed, resume_from_checkpoint="latest",
                                     **settings, **cached_flags))
    assert "latents: 3 of 3 cached" in result.stderr
    assert re.search(r"text_embeddings: ([1-9]\d*) of \1 cached", result.stderr), result.stderr[-3000:]
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(fresh, folder), os.path.join(resumed, folder))
    assert_trained_between(os.path.join(fresh, "checkpoint-2"), fresh)


def _cache_entries(cache_dir, kind):
    return [name for _, _, files in os.walk(os.path.join(cache_dir, kind)) for name in files
            if name.endswith(".safetensors")]


def test_flux_per_image_captions_past_the_bound_go_to_the_disk_cache(tiny_flux, tmp_path):
    """Per-image captions (name.txt), 3 distinct prompts, --max_prompts_in_memory 2: the prompts encoded once do not
    stay in host memory; they go to the on-disk feature cache (the log says so and why), so that training equals the
    --cache_text_embeddings run bit for bit. With --train_text_encoder (CLIP trains, T5's states computed once) the
    T5 states go there too, and training equals the in-memory run within rounding."""
    data = tmp_path / "captioned"
    data.mkdir()
    for index, image in enumerate(_images(3)):
        image.save(data / f"dog_{index}.png")
        (data / f"dog_{index}.txt").write_text(f"a photo of sks dog number {index}")
    settings = {"center_crop": True, "max_train_steps": 2, "checkpointing_steps": 2}
    bounded_cache, cached_cache = str(tmp_path / "bounded_cache"), str(tmp_path / "cached_cache")
    bounded, cached = str(tmp_path / "bounded"), str(tmp_path / "cached")
    result = train(SCRIPT, flux_args(tiny_flux, str(data), bounded, **settings, max_prompts_in_memory=2,
                                     feature_cache_dir=bounded_cache))
    assert "3 distinct prompts, more than --max_prompts_in_memory 2" in result.stderr
    assert "text_embeddings: 0 of 3 cached" in result.stderr
    assert len(_cache_entries(bounded_cache, "text_embeddings")) == 3
    train(SCRIPT, flux_args(tiny_flux, str(data), cached, **settings, cache_text_embeddings=True,
                            feature_cache_dir=cached_cache))
    assert_same_lora(bounded, cached)
    # Within the bound (the default 64) nothing is written: the embeddings stay in memory, as before.
    in_memory = str(tmp_path / "in_memory")
    result = train(SCRIPT, flux_args(tiny_flux, str(data), in_memory, **settings,
                                     feature_cache_dir=str(tmp_path / "unused_cache")))
    assert "--max_prompts_in_memory" not in result.stderr and not os.path.exists(tmp_path / "unused_cache")

    text_encoder = {**settings, "train_text_encoder": True}
    bounded_te, in_memory_te = str(tmp_path / "bounded_te"), str(tmp_path / "in_memory_te")
    result = train(SCRIPT, flux_args(tiny_flux, str(data), bounded_te, **text_encoder, max_prompts_in_memory=2,
                                     feature_cache_dir=str(tmp_path / "te_cache")))
    assert "3 distinct prompts, more than --max_prompts_in_memory 2" in result.stderr
    assert len(_cache_entries(str(tmp_path / "te_cache"), "text_embeddings")) == 3
    train(SCRIPT, flux_args(tiny_flux, str(data), in_memory_te, **text_encoder))
    expected, got = lora(in_memory_te), lora(bounded_te)
    assert parts(got) == {"transformer", "text_encoder"} and expected.keys() == got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=2e-6)


def test_flux_prompts_past_the_bound_with_a_file_as_feature_cache_dir_get_one_line_error(tiny_flux, tmp_path):
    """Past --max_prompts_in_memory the prompts go to --feature_cache_dir: a file there is one line naming both."""
    data = tmp_path / "captioned"
    data.mkdir()
    for index, image in enumerate(_images(2)):
        image.save(data / f"dog_{index}.png")
        (data / f"dog_{index}.txt").write_text(f"a photo of sks dog number {index}")
    (tmp_path / "cache_file").write_text("not a folder")
    result = train(SCRIPT, flux_args(tiny_flux, str(data), str(tmp_path / "out"), max_train_steps=1,
                                     max_prompts_in_memory=1, feature_cache_dir=str(tmp_path / "cache_file")),
                   check=False)
    assert_one_line_error(result.returncode, result.stderr, ["--feature_cache_dir", "--max_prompts_in_memory"])


# --------------------------------------------------------------------------------------------------------------------
# 2 processes, SIGTERM
# --------------------------------------------------------------------------------------------------------------------


# Mixed-aspect images (conftest.mixed_aspect_folder) in three buckets whose sides are multiples of 16.
FLUX_BUCKETS = "32,48;48,32;32,32"


def test_flux_two_processes_resume_exactly(tiny_flux, mixed_aspect_folder, tmp_path):
    """CPU DDP over gloo, on real-dataset settings (SPEC §9): aspect-ratio buckets, the masked loss and caption
    dropout. 4 steps (6 images: 3 steps per epoch, so the run crosses an epoch) with a checkpoint every 2;
    checkpoint-2 resumed on 2 processes in another folder == the straight 2-process run, bit for bit; the processes
    exit cleanly."""
    settings = {"max_train_steps": 4, "checkpointing_steps": 2, "aspect_ratio_buckets": FLUX_BUCKETS,
                "masked_loss": True, "proportion_empty_prompts": 0.5}
    instance_folder = mixed_aspect_folder
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, flux_args(tiny_flux, instance_folder, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert "total batch 2" in result.stderr
    assert "32x32: 2, 32x48: 2, 48x32: 2" in result.stderr
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {"random_states_0.pkl", "random_states_1.pkl"}

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch(SCRIPT, flux_args(tiny_flux, instance_folder, resumed, resume_from_checkpoint="checkpoint-2",
                                      **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(straight, folder), os.path.join(resumed, folder))
    assert_trained_between(os.path.join(straight, "checkpoint-2"), straight)


def test_flux_sigterm_saves_a_checkpoint_and_exits_143(tiny_flux, instance_folder, tmp_path):
    """SIGTERM mid-run (accumulation 2, CLIP LoRA): the current optimizer step ends, a checkpoint of it is saved and
    named, the exit status is 143, and no final weights are written."""
    steps = 500
    out = str(tmp_path / "out")
    process = start_python(SCRIPT, flux_args(tiny_flux, instance_folder, out, gradient_accumulation_steps=2,
                                             train_text_encoder=True, max_train_steps=steps, checkpointing_steps=2))
    wait_for_path(os.path.join(out, "checkpoint-2"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(out))
    assert 2 <= stop_step < steps, "the signal arrived after the run had finished: the test needs more steps"
    assert os.path.join(out, f"checkpoint-{stop_step}") in stderr
    assert "Continue with --resume_from_checkpoint latest" in stdout
    assert parts(lora(os.path.join(out, f"checkpoint-{stop_step}"))) == {"transformer", "text_encoder"}
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any model loads, output_dir untouched
# --------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "unknown weighting scheme": ({"weighting_scheme": "bogus"}, ["--weighting_scheme", "bogus"]),
    "lora layer matching no module": ({"lora_layers": "no_such_module"}, ["--lora_layers", "no_such_module"]),
    "T5 sequence over 512": ({"max_sequence_length": 1000}, ["--max_sequence_length", "512"]),
    "SD-only flag on Flux": ({"snr_gamma": 5}, ["--snr_gamma", "FLUX"]),
    "DoRA on Flux": ({"use_dora": True}, ["--use_dora", "FLUX"]),
    "kohya copy on Flux": ({"output_kohya_format": True}, ["--output_kohya_format", "FLUX"]),
    "resolution not a multiple of 16": ({"resolution": 40}, ["--resolution", "16"]),
    "bucket side not a multiple of 16": ({"aspect_ratio_buckets": "32,32;32,40"}, ["32,40", "16"]),
    "Flux-only flag on SD": ({"guidance_scale": 3.5, "model": "tiny_sd"}, ["--guidance_scale", "FLUX"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_flux_bad_input_gets_one_line_error(case, tiny_flux, instance_folder, request, tmp_path, capsys):
    """SPEC §7 for the Flux flags (checked on the model's config, before any weights load): one line naming the
    flag, exit status 2, no traceback, an existing output_dir left as it was."""
    overrides, expected = BAD_INPUTS[case]
    overrides = dict(overrides)
    model = request.getfixturevalue(overrides.pop("model", "tiny_flux"))
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    status, stderr = fail_in_process("train_dreambooth_lora",
                                     flux_args(model, instance_folder, str(out), **overrides), capsys)
    assert status == 2
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before


def test_flux_prompt_conditioning_is_the_pipelines(tiny_flux):
    """What the transformer trains on is what FluxPipeline.encode_prompt gives at inference: T5's last hidden state
    at --max_sequence_length tokens and CLIP's pooled output, from token ids (every step, CLIP training) or encoded
    once (the default, --pre_compute_text_embeddings) or T5 alone once (CLIP training)."""
    import argparse

    import train_dreambooth_lora as script

    pipeline = _flux_pipeline(tiny_flux)
    from trainkit.families import FAMILIES

    args = argparse.Namespace(family=FAMILIES["flux"], max_sequence_length=16, tokenizer_max_length=None)
    tokenizers, text_encoders = [pipeline.tokenizer, pipeline.tokenizer_2], [pipeline.text_encoder,
                                                                              pipeline.text_encoder_2]
    with torch.no_grad():  # as FluxPipeline.__call__ runs it (T5's attention takes another kernel with autograd)
        expected_embeds, expected_pooled, _ = pipeline.encode_prompt(INSTANCE_PROMPT, None, max_sequence_length=16)
    inputs = script.PromptInputs(tokenizers, args.family.prompt_lengths(args))(INSTANCE_PROMPT)
    assert inputs["input_ids"].shape == (77,) and inputs["input_ids_2"].shape == (16,)
    with torch.no_grad():
        embeds, pooled = script.encode_prompts(args, text_encoders, {key: value[None] for key, value in inputs.items()})
    assert torch.equal(embeds, expected_embeds) and torch.equal(pooled, expected_pooled)
    once = script.precompute_prompt_embeddings(text_encoders, tokenizers, [INSTANCE_PROMPT], args)[INSTANCE_PROMPT]
    assert torch.equal(once["prompt_embeds"], expected_embeds[0])
    assert torch.equal(once["pooled_prompt_embeds"], expected_pooled[0])
    t5_states = script.precompute_frozen_embeds(text_encoders, tokenizers, [INSTANCE_PROMPT], args)
    assert torch.equal(t5_states[INSTANCE_PROMPT], expected_embeds[0])
    inputs = script.PromptInputs(tokenizers, args.family.prompt_lengths(args), frozen_embeds=t5_states)(INSTANCE_PROMPT)
    assert set(inputs) == {"input_ids", "frozen_prompt_embeds"}
    with torch.no_grad():
        embeds, pooled = script.encode_prompts(args, [pipeline.text_encoder, None],
                                               {key: value[None] for key, value in inputs.items()})
    assert torch.equal(embeds, expected_embeds) and torch.equal(pooled, expected_pooled)


def test_lora_layers_take_short_names_and_full_module_paths(tiny_flux, instance_folder):
    """--lora_layers as upstream's examples write it: short names matching every block's layer ("to_k") or one
    module's full path ("single_transformer_blocks.0.attn.to_k"), checked on the transformer's config."""
    import train_dreambooth_lora as script

    for layers, targets in (("to_k, to_q", ["to_k", "to_q"]),
                            ("single_transformer_blocks.0.attn.to_k", ["single_transformer_blocks.0.attn.to_k"])):
        args = script.parse_args(["--pretrained_model_name_or_path", tiny_flux, "--instance_data_dir", instance_folder,
                                  "--instance_prompt", INSTANCE_PROMPT, "--lora_layers", layers])
        script.validate_args(args)
        assert args.lora_targets == targets and args.family.name == "flux" and args.lora_alpha == 4
        assert (args.learning_rate, args.output_dir, args.guidance_scale) == (1e-4, "flux-dreambooth-lora", 3.5)


def test_bf16_training_saves_in_bf16_unless_upcast_before_saving(tiny_flux, instance_folder, tmp_path):
    """As upstream's Flux script: with --mixed_precision bf16 the final file holds the transformer's LoRA in bf16
    (checkpoints keep the fp32 weights they resume from) and CLIP's (--train_text_encoder) in fp32, and
    --upcast_before_saving writes it all in fp32. bf16 autocast runs on CPU."""
    for upcast, final_dtype in ((False, torch.bfloat16), (True, torch.float32)):
        out = str(tmp_path / f"upcast_{upcast}")
        train(SCRIPT, flux_args(tiny_flux, instance_folder, out, max_train_steps=1, checkpointing_steps=1,
                                mixed_precision="bf16", upcast_before_saving=upcast, train_text_encoder=True))
        weights = lora(out)
        assert parts(weights) == {"transformer", "text_encoder"}
        assert {value.dtype for key, value in weights.items() if key.startswith("transformer.")} == {final_dtype}
        assert {value.dtype for key, value in weights.items() if key.startswith("text_encoder.")} == {torch.float32}
        assert {value.dtype for value in lora(os.path.join(out, "checkpoint-1")).values()} == {torch.float32}


def test_flux_loss_uses_the_guidance_embedding_where_the_transformer_has_one(tiny_flux):
    """--guidance_scale reaches FLUX.1 [dev]'s guidance embedding (another scale, another loss, with the same draws);
    a transformer without one (FLUX.1 [schnell]) gets none; the same generator state repeats the loss exactly, and
    the prior-preservation loss is the instance half's loss plus --prior_loss_weight times the class half's."""
    import argparse

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    import train_dreambooth_lora as script
    from trainkit.families import FAMILIES

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux, subfolder="scheduler")
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    embeds, pooled = torch.randn(2, 8, 32), torch.randn(2, 32)

    def loss(model, guidance_scale=3.5, prior_loss_weight=None):
        args = argparse.Namespace(family=FAMILIES["flux"], weighting_scheme="none", logit_mean=0.0, logit_std=1.0,
                                  mode_scale=1.29, guidance_scale=guidance_scale,
                                  with_prior_preservation=prior_loss_weight is not None,
                                  prior_loss_weight=prior_loss_weight)
        with torch.no_grad():
            return script.denoising_loss(model, scheduler, latents, embeds, pooled, {},
                                         torch.Generator().manual_seed(3), args, torch.float32)

    assert torch.equal(loss(transformer), loss(transformer))
    assert not torch.equal(loss(transformer), loss(transformer, guidance_scale=1.0))
    schnell = FluxTransformer2DModel.from_config({**transformer.config, "guidance_embeds": False})
    assert torch.equal(loss(schnell), loss(schnell, guidance_scale=1.0))
    # With uniform weights the whole batch's loss is the mean of its two halves' (instance, class): weight 1 gives
    # their sum, twice the mean, and a smaller weight takes part of the class half's away.
    whole = loss(transformer)
    torch.testing.assert_close(loss(transformer, prior_loss_weight=1.0), 2 * whole)
    assert loss(transformer, prior_loss_weight=0.5) < loss(transformer, prior_loss_weight=1.0)
