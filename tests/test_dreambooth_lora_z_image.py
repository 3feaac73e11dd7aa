"""train_dreambooth_lora.py on a Z-Image base model (tests/tiny_z_image.build_tiny_z_image): upstream
train_dreambooth_lora_z_image.py's README command line, the conditioning ZImagePipeline computes (chat template with
thinking, the second-to-last hidden state, each prompt's real tokens), its latents (scaling and shift factors) and its
transformer call (a list of latents and a list of prompt states, time (1000 - t) / 1000, the output negated),
--lora_layers, --rank / --lora_alpha in the file's metadata, rotation and exact resume on 1 process, SIGTERM, exact
resume on 2 processes with accumulation, aspect-ratio buckets, masks, captions, prior preservation (prompts of
different lengths in one batch, which upstream's script crashes on) and both feature caches, an nf4 transformer with
--offload, validation on a CPU (upstream calls enable_model_cpu_offload, which needs a GPU), --final_validation_prompt
alone, and the one-line errors of the flags that cannot apply.

Resolution 32 (a multiple of 16: 4x4 latents, 2x2 tokens); validation images at 32 px (--validation_height/_width).
Few launches, each read by several checks."""

import os
import re
import shutil
import signal

import pytest
import torch
from helpers import (assert_one_line_error, checkpoints, fail_in_process, launch, lora_rank_and_alpha, pipeline_from,
                     send_signal_and_wait, snapshot, start_python, train, wait_for_path)
from test_dreambooth_lora import CLASS_PROMPT, INSTANCE_PROMPT, assert_same_lora, base_args, lora

SCRIPT = "train_dreambooth_lora.py"
Z_IMAGE_PIPELINE = "ZImagePipeline"  # what users load the LoRA with
RESOLUTION = 32
SMALL_VALIDATION = {"validation_height": RESOLUTION, "validation_width": RESOLUTION}
LONG_PROMPT = "a photo of sks dog in the style of a red painting with a blue background"


@pytest.fixture()
def class_folder(tmp_path):
    from conftest import _shape_images

    folder = tmp_path / "class"
    folder.mkdir()
    for index, image in enumerate(_shape_images(2, seed=5)):
        image.save(folder / f"{index}.png")
    return str(folder)


def z_args(model, data, output_dir, **overrides):
    return base_args(model, data, output_dir, **{"resolution": RESOLUTION, **overrides})


def render(pipeline, prompt=INSTANCE_PROMPT):
    return pipeline(prompt, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


# --------------------------------------------------------------------------------------------------------------------
# Upstream's command line
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_readme_command_runs_unchanged_and_the_lora_loads_into_the_z_image_pipeline(
        tiny_z_image, instance_images, tmp_path):
    """README_z_image.md's command (bf16, gradient checkpointing, --cache_latents without --center_crop,
    --guidance_scale 5.0 (upstream never reads it: a warning here), 8-bit AdamW, accumulation 4, wandb, validation
    every 25 epochs) with the tiny model; only --resolution (1024 -> 32), --max_train_steps (500 -> 2) and the
    warmup (100 -> 0) shrunk, --push_to_hub left out (no network), the validation images made small and quick (ours:
    2 denoising steps at 32 px). Validation runs on the CPU with classifier-free guidance from the precomputed
    prompt embeddings (upstream's enable_model_cpu_offload needs a GPU). The LoRA: transformer.* keys of upstream's
    targets, rank 4 / alpha 4 in the metadata, saved in bf16 (the training dtype, as upstream), and
    ZImagePipeline.load_lora_weights loads it and renders differently."""
    out = str(tmp_path / "trained-z-image-lora")
    result = launch(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_z_image}", f"--instance_data_dir={instance_images}",
        f"--output_dir={out}", "--mixed_precision=bf16", "--gradient_checkpointing", "--cache_latents",
        "--instance_prompt=a photo of sks dog", "--resolution=32", "--train_batch_size=1", "--guidance_scale=5.0",
        "--use_8bit_adam", "--gradient_accumulation_steps=4", "--optimizer=adamW", "--learning_rate=1e-4",
        "--report_to=wandb", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=25", "--seed=0",
        f"--feature_cache_dir={tmp_path / 'cache'}",
        "--validation_inference_steps=2", "--validation_height=32", "--validation_width=32",
    ], cwd=str(tmp_path))
    assert "2 steps in all, batch 1 per device, total batch 4" in result.stderr
    assert "--guidance_scale is ignored on Z-Image" in result.stderr
    weights = lora(out)
    assert {key.split(".")[0] for key in weights} == {"transformer"} and all("lora" in key for key in weights)
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
    modules = {key.split(".lora_")[0].rsplit(".attention.", 1)[1] for key in weights}
    assert modules == {"to_k", "to_q", "to_v", "to_out.0"}
    # Every block's attention: the noise and context refiners' and the main layers'.
    assert {key.split(".")[1] for key in weights} == {"noise_refiner", "context_refiner", "layers"}
    assert lora_rank_and_alpha(Z_IMAGE_PIPELINE, out) == (4, 4)
    for name in ("epoch_0000", "final"):  # --num_validation_images defaults to 4
        assert len(os.listdir(os.path.join(out, "validation", name))) == 4, name
    assert os.path.isdir(tmp_path / "wandb")
    with open(os.path.join(out, "README.md")) as file:
        card = file.read()
    assert "ZImagePipeline.from_pretrained" in card and "\n- z-image\n" in card and "apache-2.0" in card

    pipeline = pipeline_from(Z_IMAGE_PIPELINE, tiny_z_image)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    assert not (render(pipeline) == base).all()


# --------------------------------------------------------------------------------------------------------------------
# Exact resume on real-dataset settings, both feature caches
# --------------------------------------------------------------------------------------------------------------------

Z_BUCKETS = "32,48;48,32;32,32"


def test_two_processes_resume_exactly_with_buckets_masks_prior_preservation_and_the_feature_caches(
        tiny_z_image, mixed_aspect_folder, class_folder, tmp_path):
    """CPU DDP over gloo on real-dataset settings: accumulation 2, aspect-ratio buckets, masks, per-image captions,
    caption dropout, prior preservation (the class prompt and the captions differ in length: the prompt states are
    padded per batch, prompt_embeds_mask marking each sample's real tokens, which the transformer gets as a list of
    each one's own), --cache_latents and --cache_text_embeddings, 4 steps with a checkpoint every 2 (6 images: the
    run crosses an epoch). The straight run fills the caches; its checkpoint-2, resumed in a fresh folder from them,
    ends bit for bit like it; the processes exit cleanly."""
    settings = {"gradient_accumulation_steps": 2, "max_train_steps": 4, "checkpointing_steps": 2,
                "aspect_ratio_buckets": Z_BUCKETS, "masked_loss": True, "proportion_empty_prompts": 0.3,
                "center_crop": True, "with_prior_preservation": True,
                "class_data_dir": class_folder, "class_prompt": CLASS_PROMPT, "num_class_images": 2,
                "cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": str(tmp_path / "cache")}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, z_args(tiny_z_image, mixed_aspect_folder, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert "4 steps in all, batch 1 per device, total batch 4" in result.stderr
    assert "32x32: 2, 32x48: 2, 48x32: 2" in result.stderr
    assert re.search(r"latents: 0 of [1-9]", result.stderr) and re.search(r"text_embeddings: 0 of [1-9]",
                                                                          result.stderr)
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {"random_states_0.pkl", "random_states_1.pkl"}

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch(SCRIPT, z_args(tiny_z_image, mixed_aspect_folder, resumed, resume_from_checkpoint="latest",
                                   **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert re.search(r"latents: ([1-9]\d*) of \1 cached", result.stderr), result.stderr[-3000:]
    assert re.search(r"text_embeddings: ([1-9]\d*) of \1 cached", result.stderr), result.stderr[-3000:]
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(straight, folder), os.path.join(resumed, folder))
    a, b = lora(os.path.join(straight, "checkpoint-2")), lora(straight)
    assert any(not torch.equal(a[key], b[key]) for key in a)  # steps 3-4 trained


def test_prior_preservation_quantized_offloaded_lora_layers_and_exact_resume(tiny_z_image, instance_images,
                                                                            class_folder, tmp_path):
    """Prior preservation at batch 2 (the instance and class prompts differ in length: one batch of four prompt
    states of two lengths, where upstream's torch.cat of its per-prompt lists raises a TypeError) on an
    nf4-quantized transformer (--bnb_quantization_config_path; bitsandbytes runs on a CPU) with --offload, bf16,
    --lora_layers layers.0.attention.to_k, --lora_alpha 8 --rank 4, --scale_lr, --weighting_scheme logit_normal,
    --upcast_before_saving (an fp32 file from a bf16 run), a checkpoint every 2 of 4 steps, and
    --final_validation_prompt without --validation_prompt: the final images of that prompt are rendered on the CPU
    from the saved LoRA and shown in the model card, no intermediate validation ran. Then its checkpoint-2, resumed
    in another folder with --checkpoints_total_limit 1 and --skip_final_inference, ends bit for bit like the
    straight run, keeps checkpoint-4 alone and renders nothing."""
    from helpers import write_json

    bnb_config = write_json(str(tmp_path / "bnb.json"), {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    common = {"with_prior_preservation": True, "class_data_dir": class_folder, "class_prompt": CLASS_PROMPT,
              "num_class_images": 2, "train_batch_size": 2, "bnb_quantization_config_path": bnb_config,
              "offload": True, "max_train_steps": 4, "checkpointing_steps": 2,
              "lora_layers": "layers.0.attention.to_k", "lora_alpha": 8, "rank": 4, "scale_lr": True,
              "weighting_scheme": "logit_normal", "mixed_precision": "bf16", "upcast_before_saving": True,
              "final_validation_prompt": "a photo of sks dog in a bucket", "num_validation_images": 2,
              **SMALL_VALIDATION}
    straight = str(tmp_path / "straight")
    result = train(SCRIPT, z_args(tiny_z_image, instance_images, straight, **common))
    assert "Prior preservation: 2 class images (0 generated this run)" in result.stderr
    assert "Frozen transformer (quantized)" in result.stderr
    assert "4 steps in all, batch 2 per device" in result.stderr
    assert os.listdir(os.path.join(straight, "validation")) == ["final"]
    assert len(os.listdir(os.path.join(straight, "validation", "final"))) == 2
    with open(os.path.join(straight, "README.md")) as file:
        assert "Images for `a photo of sks dog in a bucket`" in file.read()
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    weights = lora(straight)
    assert weights and all(key.startswith("transformer.layers.0.attention.to_k.") for key in weights)
    assert {value.dtype for value in weights.values()} == {torch.float32}
    assert lora_rank_and_alpha(Z_IMAGE_PIPELINE, straight) == (4, 8)

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    train(SCRIPT, z_args(tiny_z_image, instance_images, resumed, resume_from_checkpoint="checkpoint-2",
                         checkpoints_total_limit=1, skip_final_inference=True, **common))
    assert checkpoints(resumed) == {"checkpoint-4"}
    assert not os.path.exists(os.path.join(resumed, "validation"))
    assert_same_lora(os.path.join(straight, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))
    assert_same_lora(straight, resumed)


def test_readme_prodigy_command_and_sigterm_saves_a_checkpoint_and_exits_143(tiny_z_image, instance_images,
                                                                              tmp_path):
    """README_z_image.md's Prodigy command (bf16, gradient checkpointing, --cache_latents, --guidance_scale 5.0,
    prodigy at learning rate 1.0, constant_with_warmup, accumulation 4) scaled down (resolution 32, a checkpoint every
    2 steps, tensorboard instead of wandb, its validation left out: the first test renders it), stopped by SIGTERM
    mid-run: the current optimizer step ends, a checkpoint of it is saved and named, the exit status is 143, and no
    final weights are written."""
    steps = 500
    out = str(tmp_path / "out")
    process = start_python(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_z_image}", f"--instance_data_dir={instance_images}",
        f"--output_dir={out}", "--mixed_precision=bf16", "--gradient_checkpointing", "--cache_latents",
        "--instance_prompt=a photo of sks dog", "--resolution=32", "--train_batch_size=1", "--guidance_scale=5.0",
        "--gradient_accumulation_steps=4", "--optimizer=prodigy", "--learning_rate=1.0", "--report_to=tensorboard",
        "--lr_scheduler=constant_with_warmup", "--lr_warmup_steps=100", f"--max_train_steps={steps}", "--seed=0",
        "--checkpointing_steps=2", f"--feature_cache_dir={tmp_path / 'cache'}",
    ])
    wait_for_path(os.path.join(out, "checkpoint-2"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(out))
    assert 2 <= stop_step < steps, "the signal arrived after the run had finished: the test needs more steps"
    assert os.path.join(out, f"checkpoint-{stop_step}") in stderr
    assert "Continue with --resume_from_checkpoint latest" in stdout
    assert {key.split(".")[0] for key in lora(os.path.join(out, f"checkpoint-{stop_step}"))} == {"transformer"}
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    optimizer = torch.load(os.path.join(out, f"checkpoint-{stop_step}", "optimizer.bin"), weights_only=False)
    assert "d" in optimizer["param_groups"][0]  # Prodigy's step-size estimate: the optimizer asked for


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any model loads, output_dir untouched
# --------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "resolution the patching cannot take": ({"resolution": 40}, ["--resolution", "16", "Z-Image"]),
    "bucket side not a multiple of 16": ({"aspect_ratio_buckets": "32,32;32,40"}, ["32,40", "16"]),
    "text-encoder LoRA": ({"train_text_encoder": True}, ["--train_text_encoder", "Z-Image"]),
    "DDPM-only flag": ({"snr_gamma": 5}, ["--snr_gamma", "Z-Image"]),
    "another VAE": ({"pretrained_vae_model_name_or_path": "some/vae"}, ["--pretrained_vae_model_name_or_path"]),
    "another family's flag (SD3's)": ({"lora_blocks": "0"}, ["--lora_blocks", "Z-Image"]),
    "text encoder sharded by FSDP": ({"fsdp_text_encoder": True}, ["--fsdp_text_encoder", "FSDP"]),
    "lora layer matching no module": ({"lora_layers": "attention.no_such"}, ["--lora_layers", "attention.no_such"]),
    "float8 and nf4 at once": ({"do_fp8_training": True, "bnb_quantization_config_path": "x.json"},
                               ["--do_fp8_training", "--bnb_quantization_config_path"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_z_image_bad_input_gets_one_line_error(case, tiny_z_image, instance_images, tmp_path, capsys):
    overrides, expected = BAD_INPUTS[case]
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    status, stderr = fail_in_process("train_dreambooth_lora", z_args(tiny_z_image, instance_images, str(out),
                                                                     **overrides), capsys)
    assert status == 2
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before


def test_upstream_defaults_fill_the_flags_left_out(tiny_z_image, instance_images):
    """train_dreambooth_lora_z_image.py's defaults."""
    import train_dreambooth_lora as script

    args = script.parse_args(["--pretrained_model_name_or_path", tiny_z_image, "--instance_data_dir",
                              instance_images, "--instance_prompt", INSTANCE_PROMPT])
    script.validate_args(args)
    assert args.family.name == "z_image"
    assert (args.resolution, args.learning_rate, args.adam_weight_decay, args.output_dir, args.rank, args.lora_alpha,
            args.weighting_scheme, args.max_sequence_length, args.train_batch_size, args.lr_warmup_steps,
            args.num_validation_images, args.validation_epochs, args.text_encoder_lr,
            args.adam_weight_decay_text_encoder, args.lora_dropout, args.checkpointing_steps) == \
        (512, 1e-4, 1e-4, "z-image-dreambooth-lora", 4, 4, "none", 512, 4, 500, 4, 50, 5e-6, 1e-3, 0.0, 500)


# --------------------------------------------------------------------------------------------------------------------
# What the family computes is what ZImagePipeline computes (in-process)
# --------------------------------------------------------------------------------------------------------------------


def test_prompt_conditioning_is_the_pipelines(tiny_z_image):
    """The chat template's ids (thinking on: no empty think block), the text encoder's second-to-last hidden state
    under the attention mask, each prompt's real tokens: ZImagePipeline.encode_prompt's, bit for bit, encoded once
    per prompt (--max_sequence_length 512, and 8, which cuts the long prompt); a batch of prompts of different
    lengths is collated padded with the mask of each one's tokens, and the family gives the transformer each
    prompt's own states, as the pipeline does."""
    import argparse

    import train_dreambooth_lora as script
    from trainkit.families import FAMILIES

    pipeline = pipeline_from(Z_IMAGE_PIPELINE, tiny_z_image)
    family = FAMILIES["z_image"]
    prompts = [INSTANCE_PROMPT, LONG_PROMPT, ""]
    for length in (512, 8):
        args = argparse.Namespace(family=family, max_sequence_length=length, text_encoder_use_attention_mask=False)
        embeddings = script.precompute_prompt_embeddings([pipeline.text_encoder], [pipeline.tokenizer], prompts, args)
        for prompt in prompts:
            with torch.no_grad():
                expected, _ = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                     max_sequence_length=length)
            assert torch.equal(embeddings[prompt], expected[0]), (prompt, length)
    assert embeddings[LONG_PROMPT].shape[0] == 8
    ids = family.tokenize_prompt(pipeline.tokenizer, [INSTANCE_PROMPT], 512)
    text = pipeline.tokenizer.decode(ids.input_ids[0][ids.attention_mask[0].bool()])
    assert text == f"<|im_start|>user\n{INSTANCE_PROMPT}<|im_end|>\n<|im_start|>assistant\n"

    args = argparse.Namespace(family=family, max_sequence_length=512, text_encoder_use_attention_mask=False)
    embeddings = script.precompute_prompt_embeddings([pipeline.text_encoder], [pipeline.tokenizer],
                                                     [INSTANCE_PROMPT, LONG_PROMPT], args)
    inputs = script.PromptInputs(None, None, embeddings)
    batch = script.collate_examples([{"instance": inputs(INSTANCE_PROMPT), "class": inputs(LONG_PROMPT)}])
    with torch.no_grad():
        expected, _ = pipeline.encode_prompt([INSTANCE_PROMPT, LONG_PROMPT], do_classifier_free_guidance=False)
    lengths = [states.shape[0] for states in expected]
    assert lengths[0] < lengths[1] and batch["prompt_embeds"].shape[1] == lengths[1]
    assert batch["prompt_embeds_mask"].sum(1).tolist() == lengths
    captions = []
    transformer = pipeline.transformer

    def keep_captions(module, args):
        captions.extend(args[2])

    handle = transformer.register_forward_pre_hook(keep_captions)
    with torch.no_grad():
        family.denoise(transformer, torch.randn(2, 16, 4, 4), torch.tensor([500.0, 250.0]), batch["prompt_embeds"],
                       None, batch, args, torch.float32)
    handle.remove()
    assert len(captions) == 2 and all(torch.equal(a, b) for a, b in zip(captions, expected))


def test_latents_time_and_sign_are_the_pipelines(tiny_z_image):
    """Latents: (the mode of the VAE's latents - shift_factor) * scaling_factor, which ZImagePipeline's decoding
    undoes; training takes the mode, as upstream. The prediction: ZImagePipeline's own denoising steps (no guidance)
    recorded, each one's Euler step equals the one the family's prediction makes, x + (sigma_next - sigma) *
    denoise(x, t), bit for bit: the transformer is given the latents and prompt states as the pipeline gives them,
    the time (1000 - t) / 1000, and its output negated, so the flow-matching target (noise - latents) is the
    velocity the pipeline integrates."""
    import argparse

    import train_dreambooth_lora as script
    from trainkit.families import FAMILIES

    family = FAMILIES["z_image"]
    pipeline = pipeline_from(Z_IMAGE_PIPELINE, tiny_z_image)
    vae = pipeline.vae
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        latents = family.latent_dist(vae, pixels).mode()
    assert latents.shape == (2, 16, 4, 6)
    scale, shift = family.latent_scaling(vae, "cpu")
    assert (scale, shift) == (0.3611, 0.1159)
    normalised = (latents - shift) * scale
    torch.testing.assert_close(normalised / vae.config.scaling_factor + vae.config.shift_factor, latents)
    # Training takes the distribution's mode, as upstream (not a sample), cached or not.
    trained = script.batch_latents(vae, {"pixel_values": pixels}, torch.Generator().manual_seed(0), torch.float32,
                                   scale, shift, family=family)
    assert torch.equal(trained, normalised)

    prompt_embeds, _ = pipeline.encode_prompt(INSTANCE_PROMPT, do_classifier_free_guidance=False)
    steps = []

    def record(pipe, index, timestep, kwargs):
        steps.append((timestep.clone(), kwargs["latents"].clone()))
        return {}

    start = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    pipeline(prompt_embeds=prompt_embeds, guidance_scale=0.0, num_inference_steps=3, height=32, width=48,
             latents=start.clone(), output_type="latent", callback_on_step_end=record)
    sigmas = pipeline.scheduler.sigmas
    assert len(steps) == 3 and 0 < sigmas[1] < 1
    batch = {"prompt_embeds": prompt_embeds[0][None]}
    args = argparse.Namespace(max_sequence_length=512)
    before = start
    for index, (timestep, after) in enumerate(steps):
        with torch.no_grad():
            prediction = family.denoise(pipeline.transformer, before, timestep[None], batch["prompt_embeds"], None,
                                        batch, args, torch.float32)
        assert prediction.abs().min() > 0  # the sign shows
        assert torch.equal(before + (sigmas[index + 1] - sigmas[index]) * prediction, after), index
        before = after
