"""train_dreambooth_lora.py on a Stable Diffusion 3 / 3.5 base model (tests/tiny_sd3.build_tiny_sd3: two CLIPs of
different widths, neither 768 nor 1280; SD3.5's qk_norm and dual-attention block where named): upstream
train_dreambooth_lora_sd3.py's README and test command lines, the conditioning StableDiffusion3Pipeline computes
(both CLIPs' penultimate states padded to T5's width, T5's states, both pooled embeddings; also with T5 encoded once
while the CLIP LoRA trains), latents with the VAE's shift and scale, the transformer called as the pipeline calls it,
--precondition_outputs' arithmetic, --lora_blocks, a checkpoint that holds both CLIPs' LoRA and resumes exactly
(accumulation 2), exact resume on 2 processes with buckets, masks, captions, prior preservation and both feature
caches, and the one-line errors of the flags that cannot apply.

Resolution 32 (a multiple of 16: 4x4 latents, 2x2 patches); validation images at 32 px. Few launches, each read by
several checks."""

import os
import re
import shutil

import pytest
import torch
from helpers import (assert_one_line_error, checkpoints, fail_in_process, launch, lora_parts, lora_rank_and_alpha,
                     pipeline_from, snapshot, train)
from test_dreambooth_lora import CLASS_PROMPT, INSTANCE_PROMPT, assert_same_lora, base_args, lora
from test_dreambooth_lora import tiny_sd  # noqa: F401 (module fixture: the SD model of the SD3-only flag case)

SCRIPT = "train_dreambooth_lora.py"
SD3_PIPELINE = "StableDiffusion3Pipeline"  # what users load the LoRA with
RESOLUTION = 32
SMALL_VALIDATION = {"validation_height": RESOLUTION, "validation_width": RESOLUTION}


def sd3_args(model, data, output_dir, **overrides):
    return base_args(model, data, output_dir, **{"resolution": RESOLUTION, **overrides})


def render(pipeline, prompt=INSTANCE_PROMPT):
    return pipeline(prompt, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


# --------------------------------------------------------------------------------------------------------------------
# Upstream's command lines
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_readme_command_runs_unchanged_and_the_lora_loads_into_the_sd3_pipeline(
        tiny_sd3, instance_images, tmp_path):
    """README_sd3.md's LoRA command (accumulation 4, wandb, validation every 25 epochs) with the tiny model; only
    --resolution (512 -> 32) and --max_train_steps (500 -> 2) shrunk, --mixed_precision fp16 -> bf16 (a CPU), its
    --push_to_hub left out (no network), and the validation images made small and quick. The LoRA: transformer.*
    keys on upstream's targets (both streams' attention projections), rank 4 / alpha 4 in the metadata, saved in bf16
    (the training dtype, as upstream); StableDiffusion3Pipeline.load_lora_weights loads it and renders differently.
    The model card names the pipeline and SD3's tags."""
    out = str(tmp_path / "trained-sd3-lora")
    result = launch(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_sd3}", f"--instance_data_dir={instance_images}",
        f"--output_dir={out}", "--mixed_precision=bf16", "--instance_prompt=a photo of sks dog", "--resolution=32",
        "--train_batch_size=1", "--gradient_accumulation_steps=4", "--learning_rate=4e-4", "--report_to=wandb",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=25", "--seed=0",
        "--num_validation_images=2", "--validation_inference_steps=2", "--validation_height=32",
        "--validation_width=32",
    ], cwd=str(tmp_path))
    assert "2 steps in all, batch 1 per device, total batch 4" in result.stderr
    weights = lora(out)
    assert lora_parts(weights) == {"transformer"} and all("lora" in key for key in weights)
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
    modules = {key.split(".lora_")[0].split(".", 3)[3] for key in weights}
    assert modules == {"attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out"}
    assert lora_rank_and_alpha(SD3_PIPELINE, out) == (4, 4)
    for name in ("epoch_0000", "final"):
        assert len(os.listdir(os.path.join(out, "validation", name))) == 2, name
    assert os.path.isdir(tmp_path / "wandb")
    with open(os.path.join(out, "README.md")) as file:
        card = file.read()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "\n- sd3\n" in card and "openrail++" in card

    pipeline = pipeline_from(SD3_PIPELINE, tiny_sd3)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    assert not (render(pipeline) == base).all()


def test_text_encoder_readme_command_trains_both_clips_whatever_their_widths(tiny_sd3, tmp_path):
    """README_sd3.md's text-encoder command (a dataset, --train_text_encoder, prodigy at 1.0 for both, rank 32) on a
    local copy of a dataset with an `image` column (no network), 2 steps at 32 px. Both CLIPs get their LoRA, saved
    under text_encoder.* and text_encoder_2.* although their widths (16, 24) are not the 768 / 1280 upstream's save
    hook tells them apart by; T5 gets none; the pipeline loads all three parts' LoRA."""
    import datasets
    from conftest import _shape_images

    dataset = tmp_path / "yarn"
    os.makedirs(dataset / "data")
    datasets.Dataset.from_dict({"image": _shape_images(2, seed=3), "text": ["one", "two"]},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                               ).to_parquet(str(dataset / "data" / "train-00000-of-00001.parquet"))
    out = str(tmp_path / "trained-sd3-lora")
    result = train(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_sd3}", f"--output_dir={out}", f"--dataset_name={dataset}",
        "--instance_prompt=a photo of TOK yarn art dog", "--resolution=32", "--train_batch_size=1",
        "--train_text_encoder", "--gradient_accumulation_steps=1", "--optimizer=prodigy", "--learning_rate=1.0",
        "--text_encoder_lr=1.0", "--report_to=tensorboard", "--lr_scheduler=constant", "--lr_warmup_steps=0",
        "--max_train_steps=2", "--rank=32", "--seed=0",
    ])
    assert "The frozen text_encoder_3 encoded the" in result.stderr
    weights = lora(out)
    assert lora_parts(weights) == {"transformer", "text_encoder", "text_encoder_2"}
    widths = {part: {value.shape[1] for key, value in weights.items()
                     if key.startswith(part + ".") and "lora_A" in key and "fc" not in key}
              for part in ("text_encoder", "text_encoder_2")}
    assert widths == {"text_encoder": {16}, "text_encoder_2": {24}}
    assert lora_rank_and_alpha(SD3_PIPELINE, out) == (32, 32)
    pipeline = pipeline_from(SD3_PIPELINE, tiny_sd3)
    pipeline.load_lora_weights(out)
    assert {"text_encoder", "text_encoder_2", "transformer"} <= set(pipeline.get_list_adapters())


def test_sd35_lora_blocks_checkpoint_holds_both_clips_and_resumes_exactly(tiny_sd35, instance_images, tmp_path):
    """On the SD3.5 transformer (qk_norm, a dual-attention block): upstream's test command lines folded into one run
    (--cache_latents without --center_crop, --lora_blocks 0, --learning_rate 5e-4 --scale_lr, a checkpoint every 2
    steps) with --train_text_encoder and accumulation 2, 4 steps; its checkpoint-2, resumed in a fresh folder with
    --checkpoints_total_limit 1, ends bit for bit like it. Every checkpoint holds the LoRA of the transformer's block
    0 and of both CLIPs (upstream's hook, keyed on the widths 768 / 1280, would have saved neither here)."""
    out = str(tmp_path / "straight")
    settings = {"max_train_steps": 4, "checkpointing_steps": 2, "gradient_accumulation_steps": 2,
                "cache_latents": True, "lora_blocks": "0", "learning_rate": 5e-4, "scale_lr": True,
                "train_text_encoder": True, "feature_cache_dir": str(tmp_path / "cache")}
    result = train(SCRIPT, sd3_args(tiny_sd35, instance_images, out, **settings))
    assert "the latents of centre crops are cached" in result.stderr
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    saved = lora(os.path.join(out, "checkpoint-2"))
    assert lora_parts(saved) == {"transformer", "text_encoder", "text_encoder_2"}
    assert all(key.startswith("transformer.transformer_blocks.0.") for key in saved if key.startswith("transformer"))
    assert any(".attn.to_add_out." in key for key in saved)

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = train(SCRIPT, sd3_args(tiny_sd35, instance_images, resumed, resume_from_checkpoint="latest",
                                    checkpoints_total_limit=1, **settings))
    assert "latents: 3 of 3 cached" in result.stderr
    assert checkpoints(resumed) == {"checkpoint-4"}
    assert_same_lora(out, resumed)
    assert_same_lora(os.path.join(out, "checkpoint-4"), resumed)


# --------------------------------------------------------------------------------------------------------------------
# Exact resume on real-dataset settings, both feature caches, 2 processes
# --------------------------------------------------------------------------------------------------------------------

SD3_BUCKETS = "32,48;48,32;32,32"


def test_two_processes_resume_exactly_with_clip_lora_buckets_masks_prior_preservation_and_the_feature_caches(
        tiny_sd3, mixed_aspect_folder, tmp_path):
    """CPU DDP over gloo on real-dataset settings: accumulation 2, aspect-ratio buckets, masks, per-image captions,
    caption dropout, prior preservation, both CLIPs' LoRA (DDP-wrapped encoders) with the frozen T5's states in the
    on-disk text-embedding cache (more distinct prompts than --max_prompts_in_memory 2), --cache_latents,
    --precondition_outputs 0 with --weighting_scheme sigma_sqrt, 4 steps with a checkpoint every 2. The straight run
    fills the caches; its checkpoint-2, resumed in a fresh folder from them, ends bit for bit like it."""
    from conftest import _shape_images

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for index, image in enumerate(_shape_images(2, seed=5)):
        image.save(class_dir / f"{index}.png")
    settings = {"gradient_accumulation_steps": 2, "max_train_steps": 4, "checkpointing_steps": 2,
                "aspect_ratio_buckets": SD3_BUCKETS, "masked_loss": True, "proportion_empty_prompts": 0.3,
                "center_crop": True, "weighting_scheme": "sigma_sqrt", "precondition_outputs": 0,
                "with_prior_preservation": True, "class_data_dir": str(class_dir), "class_prompt": CLASS_PROMPT,
                "num_class_images": 2, "cache_latents": True, "train_text_encoder": True, "max_prompts_in_memory": 2,
                "feature_cache_dir": str(tmp_path / "cache")}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, sd3_args(tiny_sd3, mixed_aspect_folder, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert "4 steps in all, batch 1 per device, total batch 4" in result.stderr
    assert "32x32: 2, 32x48: 2, 48x32: 2" in result.stderr
    assert re.search(r"latents: 0 of [1-9]", result.stderr) and re.search(r"text_embeddings: 0 of [1-9]",
                                                                          result.stderr)
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert lora_parts(lora(straight)) == {"transformer", "text_encoder", "text_encoder_2"}

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch(SCRIPT, sd3_args(tiny_sd3, mixed_aspect_folder, resumed, resume_from_checkpoint="latest",
                                     **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert re.search(r"latents: ([1-9]\d*) of \1 cached", result.stderr), result.stderr[-3000:]
    assert re.search(r"text_embeddings: ([1-9]\d*) of \1 cached", result.stderr), result.stderr[-3000:]
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(straight, folder), os.path.join(resumed, folder))
    a, b = lora(os.path.join(straight, "checkpoint-2")), lora(straight)
    assert any(not torch.equal(a[key], b[key]) for key in a)  # steps 3-4 trained


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any model loads, output_dir untouched
# --------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "resolution the patches cannot take": ({"resolution": 40}, ["--resolution", "16", "SD3"]),
    "bucket side not a multiple of 16": ({"aspect_ratio_buckets": "32,32;32,40"}, ["32,40", "16"]),
    "T5 sequence over 512": ({"max_sequence_length": 1000}, ["--max_sequence_length", "512"]),
    "unknown weighting scheme": ({"weighting_scheme": "bogus"}, ["--weighting_scheme", "bogus"]),
    "block past the transformer's": ({"lora_blocks": "0,7"}, ["--lora_blocks", "block 7", "0-1"]),
    "block not a number": ({"lora_blocks": "first"}, ["--lora_blocks", "'first'"]),
    "lora layer matching no module": ({"lora_layers": "attn.no_such"}, ["--lora_layers", "attn.no_such"]),
    "SD-only flag on SD3": ({"snr_gamma": 5}, ["--snr_gamma", "SD3/3.5"]),
    "Flux-only flag on SD3": ({"guidance_scale": 3.5}, ["--guidance_scale", "SD3/3.5"]),
    "DoRA on SD3": ({"use_dora": True}, ["--use_dora", "SD3/3.5"]),
    "another VAE": ({"pretrained_vae_model_name_or_path": "some/vae"}, ["--pretrained_vae_model_name_or_path"]),
    "SD3-only flag on SD": ({"precondition_outputs": 0, "model": "tiny_sd"},
                            ["--precondition_outputs", "Stable Diffusion", "SD3/3.5 models only"]),
    "SD3-only blocks on SD": ({"lora_blocks": "0", "model": "tiny_sd"}, ["--lora_blocks", "Stable Diffusion"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_sd3_bad_input_gets_one_line_error(case, tiny_sd3, instance_images, request, tmp_path, capsys):
    overrides, expected = BAD_INPUTS[case]
    overrides = dict(overrides)
    model = request.getfixturevalue(overrides.pop("model", "tiny_sd3"))
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    status, stderr = fail_in_process("train_dreambooth_lora", sd3_args(model, instance_images, str(out),
                                                                       **overrides), capsys)
    assert status == 2
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before


def test_upstream_defaults_fill_the_flags_left_out(tiny_sd3, instance_images):
    """train_dreambooth_lora_sd3.py's defaults; SD3 is detected before SDXL (both have a text_encoder_2)."""
    import train_dreambooth_lora as script

    args = script.parse_args(["--pretrained_model_name_or_path", tiny_sd3, "--instance_data_dir", instance_images,
                              "--instance_prompt", INSTANCE_PROMPT])
    script.validate_args(args)
    assert args.family.name == "sd3"
    assert (args.resolution, args.learning_rate, args.adam_weight_decay, args.text_encoder_lr,
            args.adam_weight_decay_text_encoder, args.output_dir, args.rank, args.lora_alpha, args.weighting_scheme,
            args.max_sequence_length, args.precondition_outputs, args.train_batch_size, args.lr_warmup_steps,
            args.num_validation_images, args.validation_epochs, args.logit_mean, args.logit_std, args.mode_scale) == \
        (512, 1e-4, 1e-4, 5e-6, 1e-3, "sd3-dreambooth", 4, 4, "logit_normal", 77, 1, 4, 500, 4, 50, 0.0, 1.0, 1.29)
    assert args.lora_targets is None


# --------------------------------------------------------------------------------------------------------------------
# What the family computes is what StableDiffusion3Pipeline computes (in-process)
# --------------------------------------------------------------------------------------------------------------------


def test_prompt_conditioning_is_the_pipelines(tiny_sd3):
    """Both CLIPs' penultimate states padded to T5's width, T5's states after them, both pooled embeddings:
    StableDiffusion3Pipeline.encode_prompt's bit for bit, at upstream's 77 T5 tokens and at another length; and
    the same with T5's states computed once (the frozen T5 while the CLIP LoRA trains: the CLIP part from the
    encoders, the T5 part from the embeddings computed once)."""
    import argparse

    import train_dreambooth_lora as script
    from trainkit.families import FAMILIES

    pipeline = pipeline_from(SD3_PIPELINE, tiny_sd3)
    family = FAMILIES["sd3"]
    tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3]
    encoders = [pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3]
    long_prompt = "a photo of sks dog in the style of a red painting with a blue background"
    for length in (77, 12):
        args = argparse.Namespace(family=family, max_sequence_length=length, text_encoder_use_attention_mask=False)
        embeddings = script.precompute_prompt_embeddings(encoders, tokenizers, [INSTANCE_PROMPT, long_prompt], args)
        for prompt in (INSTANCE_PROMPT, long_prompt):
            with torch.no_grad():
                expected, _, pooled, _ = pipeline.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                                                max_sequence_length=length)
            got = embeddings[prompt]
            assert expected.shape == (1, 77 + length, 48) and pooled.shape == (1, 32)
            assert torch.equal(got["prompt_embeds"], expected[0]), (prompt, length)
            assert torch.equal(got["pooled_prompt_embeds"], pooled[0]), (prompt, length)
        # T5 encoded once: the script's PromptInputs for the two trained CLIPs, encoded without T5.
        inputs = script.PromptInputs(tokenizers, family.prompt_lengths(args), None,
                                     script.precompute_frozen_embeds(encoders, tokenizers, [long_prompt], args),
                                     tokenize=family.tokenize_prompt, trained=2)
        batch = {key: value[None] for key, value in inputs(long_prompt).items()}
        assert set(batch) == {"input_ids", "input_ids_2", "frozen_prompt_embeds"}
        with torch.no_grad():
            hidden, vector = script.encode_prompts(args, encoders[:2] + [None], batch)
        assert torch.equal(hidden, expected) and torch.equal(vector, pooled)


def test_latents_transformer_call_and_preconditioned_loss_are_upstreams(tiny_sd35):
    """Latents: (sample - shift_factor) * scaling_factor, the inverse of the pipeline's decoding; the transformer is
    called as the pipeline calls it (timesteps in 0-1000 units, pooled projections); --precondition_outputs 1 turns
    the prediction into noisy - sigma * prediction and regresses it onto the latents, 0 regresses the prediction onto
    the velocity noise - latents (upstream's loss under logit_normal: the plain mean)."""
    import argparse

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    import train_dreambooth_lora as script
    from trainkit import randomness
    from trainkit.families import FAMILIES

    family = FAMILIES["sd3"]
    vae = AutoencoderKL.from_pretrained(tiny_sd35, subfolder="vae")
    scale, shift = family.latent_scaling(vae, "cpu")
    assert (scale, shift) == (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd35, subfolder="transformer")
    assert transformer.config.qk_norm == "rms_norm" and transformer.transformer_blocks[0].attn2 is not None
    latents, embeds, pooled = torch.randn(2, 4, 4, 6), torch.randn(2, 9, 48), torch.randn(2, 32)
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        prediction = family.denoise(transformer, latents, timesteps, embeds, pooled, {}, None, torch.float32)
        direct = transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                             pooled_projections=pooled, return_dict=False)[0]
    assert prediction.shape == latents.shape and torch.equal(prediction, direct)

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd35, subfolder="scheduler")
    for precondition in (1, 0):
        args = argparse.Namespace(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                  precondition_outputs=precondition)
        generator = randomness.make_generator("cpu", 0, 3)
        noisy, steps, target, part_loss = script.flow_matching_objective(scheduler, latents, generator, args)
        generator = randomness.make_generator("cpu", 0, 3)
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = ((latents - noisy) / (latents - noise))[:, :1, :1, :1]
        torch.testing.assert_close(noisy, (1 - sigmas) * latents + sigmas * noise)
        torch.testing.assert_close(sigmas.flatten(), steps / 1000)  # the scheduler's sigma of each timestep
        model_pred = torch.randn_like(latents)
        if precondition:
            assert torch.equal(target, latents)
            expected = torch.mean(((model_pred * (-sigmas) + noisy) - latents) ** 2)
        else:
            expected = torch.mean((model_pred - (noise - latents)) ** 2)
        torch.testing.assert_close(part_loss(model_pred, target, None, None), expected)
