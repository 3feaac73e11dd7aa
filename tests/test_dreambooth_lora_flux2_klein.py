"""train_dreambooth_lora.py on a FLUX.2 [klein] base model (tests/tiny_flux2_klein.build_tiny_flux2_klein): upstream
train_dreambooth_lora_flux2_klein.py's README and test command lines, the conditioning Flux2KleinPipeline computes
(chat template with thinking off, padded to --max_sequence_length, the hidden states of --text_encoder_out_layers
side by side), its transformer call (no guidance embedding), --lora_layers, --rank / --lora_alpha in the file's
metadata, rotation and exact resume on 1 process, SIGTERM (README_flux2.md's Prodigy command), exact resume on 2
processes with accumulation, aspect-ratio buckets, masks, captions, --caption_dropout, prior preservation and both
feature caches, the one-line errors of the flags that cannot apply.

Resolution 32 (a multiple of 16: 4x4 latents, 2x2 tokens); validation images at 32 px with 2 steps. Few launches,
each read by several checks."""

import os
import re
import shutil

import pytest
import torch
import signal

from helpers import (assert_one_line_error, checkpoints, fail_in_process, launch, lora_rank_and_alpha, pipeline_from,
                     send_signal_and_wait, snapshot, start_python, train, wait_for_path)
from test_dreambooth_lora import CLASS_PROMPT, INSTANCE_PROMPT, assert_same_lora, base_args, lora

SCRIPT = "train_dreambooth_lora.py"
FLUX2_KLEIN_PIPELINE = "Flux2KleinPipeline"  # what users load the LoRA with
RESOLUTION = 32
SMALL_VALIDATION = {"validation_height": RESOLUTION, "validation_width": RESOLUTION, "validation_inference_steps": 2}
# Upstream's defaults for the klein text encoder (10 20 30) need 30 layers; the tiny one has them.
UPSTREAM_TARGETS = {"to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "to_out"}


def klein_args(model, data, output_dir, **overrides):
    return base_args(model, data, output_dir, **{"resolution": RESOLUTION, **overrides})


def render(pipeline, prompt=INSTANCE_PROMPT):
    return pipeline(prompt=prompt, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="np",
                    text_encoder_out_layers=(10, 20, 30), generator=torch.Generator().manual_seed(0)).images[0]


def targets(weights):
    """The module names LoRA adapts (the last part(s) of each key's module path)."""
    names = set()
    for key in weights:
        module = key.split(".lora_")[0]
        names.add(module.rsplit(".attn.", 1)[1] if ".attn." in module else module)
    return names


# --------------------------------------------------------------------------------------------------------------------
# Upstream's command lines
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_readme_command_runs_unchanged_and_the_lora_loads_into_the_klein_pipeline(
        tiny_flux2_klein, instance_images, tmp_path):
    """README_flux2.md's command with train_dreambooth_lora_flux2_klein.py's name changed (bf16, gradient
    checkpointing, --cache_latents, --guidance_scale 1, 8-bit AdamW, accumulation 4, wandb, validation every 25
    epochs) on the tiny klein; only --resolution (1024 -> 32) and --max_train_steps (500 -> 2) shrunk, --push_to_hub
    and --do_fp8_training (torchao float8: CUDA) left out, and the validation images made small and quick. The LoRA:
    transformer.* keys on upstream's targets (to_k/q/v/out.0 of the double blocks, to_qkv_mlp_proj and attn.to_out of
    the single ones), rank 4 / alpha 4 in the metadata, saved in bf16; Flux2KleinPipeline.load_lora_weights loads it
    and renders differently (with true CFG: the tiny base is not distilled)."""
    out = str(tmp_path / "trained-flux2-klein")
    result = launch(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_flux2_klein}", f"--instance_data_dir={instance_images}",
        f"--output_dir={out}", "--mixed_precision=bf16", "--gradient_checkpointing", "--cache_latents",
        "--instance_prompt=a photo of sks dog", "--resolution=32", "--train_batch_size=1", "--guidance_scale=1",
        "--use_8bit_adam", "--gradient_accumulation_steps=4", "--optimizer=adamW", "--learning_rate=1e-4",
        "--report_to=wandb", "--lr_scheduler=constant", "--lr_warmup_steps=100", "--max_train_steps=2",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=25", "--seed=0",
        f"--feature_cache_dir={tmp_path / 'cache'}", "--validation_inference_steps=2", "--validation_height=32",
        "--validation_width=32",
    ], cwd=str(tmp_path))
    assert "2 steps in all, batch 1 per device, total batch 4" in result.stderr
    weights = lora(out)
    assert {key.split(".")[0] for key in weights} == {"transformer"} and all("lora" in key for key in weights)
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
    assert targets(weights) == UPSTREAM_TARGETS
    assert any(key.startswith("transformer.single_transformer_blocks.0.attn.to_out.") for key in weights)
    assert lora_rank_and_alpha(FLUX2_KLEIN_PIPELINE, out) == (4, 4)
    for name in ("epoch_0000", "final"):  # --num_validation_images defaults to 4
        assert len(os.listdir(os.path.join(out, "validation", name))) == 4, name
    assert os.path.isdir(tmp_path / "wandb")
    with open(os.path.join(out, "README.md")) as file:
        card = file.read()
    assert "Flux2KleinPipeline" in card and "\n- flux2-klein\n" in card and "\n- flux2-klein-diffusers\n" in card

    pipeline = pipeline_from(FLUX2_KLEIN_PIPELINE, tiny_flux2_klein)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    assert not (render(pipeline) == base).all()


def test_upstream_test_commands_lora_layers_metadata_rotation_and_resume(tiny_flux2_klein, instance_images,
                                                                         tmp_path):
    """test_dreambooth_lora_flux2_klein.py's command lines (--max_sequence_length 8, --text_encoder_out_layers: its
    tiny model's 1, three layers here as the tiny klein's transformer takes), folded into two runs: --cache_latents,
    --lora_layers single_transformer_blocks.0.attn.to_qkv_mlp_proj, --lora_alpha 8 --rank 4, --learning_rate 5e-4
    --scale_lr, a checkpoint every 2 of 4 steps; then resumed from checkpoint-4 to 8 steps with
    --checkpoints_total_limit 2, which leaves checkpoint-6 and checkpoint-8 (with --offload and a
    --final_validation_prompt of its own); and checkpoint-2 resumed in a fresh folder to 4 steps, bit for bit the
    first run's LoRA."""
    out = str(tmp_path / "out")
    common = [f"--pretrained_model_name_or_path={tiny_flux2_klein}", f"--instance_data_dir={instance_images}",
              f"--output_dir={out}", "--instance_prompt", "dog", "--resolution", "32", "--train_batch_size", "1",
              "--gradient_accumulation_steps", "1", "--checkpointing_steps=2", "--cache_latents", "--learning_rate",
              "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_sequence_length",
              "8", "--text_encoder_out_layers", "1", "2", "3", "--lora_layers",
              "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "--lora_alpha=8", "--rank=4",
              f"--feature_cache_dir={tmp_path / 'cache'}"]
    # Ours beside upstream's: a validation image at the end of epoch 0, none after training (--skip_final_inference).
    first = ["--max_train_steps=4", "--validation_prompt=a dog", "--num_validation_images=1", "--validation_height=32",
             "--validation_width=32", "--validation_inference_steps=2", "--skip_final_inference"]
    result = train(SCRIPT, common + first)
    assert "the latents of centre crops are cached" in result.stderr
    assert os.listdir(os.path.join(out, "validation")) == ["epoch_0000"]
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    weights = lora(out)
    assert weights and all(key.startswith("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.")
                           for key in weights)
    assert lora_rank_and_alpha(FLUX2_KLEIN_PIPELINE, out) == (4, 8)
    # Exact resume, 1 process, no accumulation: checkpoint-2 resumed in a fresh folder ends bit for bit like the run.
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    train(SCRIPT, [flag.replace(out, resumed) for flag in common] + first + ["--resume_from_checkpoint=latest"])
    assert_same_lora(out, resumed)
    # Ours beside upstream's: --offload (the text encoder visits the device to encode, then leaves), and
    # --final_validation_prompt alone: the final image of that prompt, rendered from the saved LoRA.
    result = train(SCRIPT, common + ["--max_train_steps=8", "--resume_from_checkpoint=checkpoint-4",
                                     "--checkpoints_total_limit=2", "--offload",
                                     "--final_validation_prompt=a dog in a bucket", "--num_validation_images=1",
                                     "--validation_height=32", "--validation_width=32",
                                     "--validation_inference_steps=2"])
    assert "latents: 3 of 3 cached" in result.stderr
    assert checkpoints(out) == {"checkpoint-6", "checkpoint-8"}
    assert_same_lora(os.path.join(out, "checkpoint-8"), out)
    assert len(os.listdir(os.path.join(out, "validation", "final"))) == 1
    with open(os.path.join(out, "README.md")) as file:
        assert "a dog in a bucket" in file.read()


def test_readme_prodigy_command_and_sigterm_saves_a_checkpoint_and_exits_143(tiny_flux2_klein, instance_images,
                                                                              tmp_path):
    """README_flux2.md's LoRA command (Prodigy at learning rate 1.0, constant_with_warmup, --guidance_scale 1,
    accumulation 4, gradient checkpointing, --cache_latents) with train_dreambooth_lora_flux2_klein.py's name changed,
    scaled down (resolution 32, tensorboard, a checkpoint every 2 steps, prompts of 8 tokens from layers 1 2 3),
    stopped by SIGTERM mid-run: the current optimizer step ends, a checkpoint of it is saved and named, the exit
    status is 143, and no final weights are written."""
    steps = 500
    out = str(tmp_path / "out")
    process = start_python(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_flux2_klein}", f"--instance_data_dir={instance_images}",
        f"--output_dir={out}", "--gradient_checkpointing", "--cache_latents", "--instance_prompt=a photo of sks dog",
        "--resolution=32", "--train_batch_size=1", "--guidance_scale=1", "--gradient_accumulation_steps=4",
        "--optimizer=prodigy", "--learning_rate=1.", "--report_to=tensorboard", "--lr_scheduler=constant_with_warmup",
        "--lr_warmup_steps=100", f"--max_train_steps={steps}", "--seed=0", "--checkpointing_steps=2",
        "--max_sequence_length=8", "--text_encoder_out_layers", "1", "2", "3",
        f"--feature_cache_dir={tmp_path / 'cache'}",
    ])
    wait_for_path(os.path.join(out, "checkpoint-2"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(out))
    assert 2 <= stop_step < steps
    assert os.path.join(out, f"checkpoint-{stop_step}") in stderr
    assert {key.split(".")[0] for key in lora(os.path.join(out, f"checkpoint-{stop_step}"))} == {"transformer"}
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))


# --------------------------------------------------------------------------------------------------------------------
# Exact resume on real-dataset settings, both feature caches
# --------------------------------------------------------------------------------------------------------------------

KLEIN_BUCKETS = "32,48;48,32;32,32"


def test_two_processes_resume_exactly_with_buckets_masks_prior_preservation_and_the_feature_caches(
        tiny_flux2_klein, mixed_aspect_folder, tmp_path):
    """CPU DDP over gloo on real-dataset settings: accumulation 2, aspect-ratio buckets (position ids per bucket),
    masks, per-image captions, --caption_dropout (upstream klein's flag), prior preservation, --cache_latents and
    --cache_text_embeddings, 4 steps with a checkpoint every 2 (6 images: the run crosses an epoch). The straight
    run fills the caches; its checkpoint-2, resumed in a fresh folder from them, ends bit for bit like it; the
    processes exit cleanly."""
    from conftest import _shape_images

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for index, image in enumerate(_shape_images(2, seed=5)):
        image.save(class_dir / f"{index}.png")
    settings = {"gradient_accumulation_steps": 2, "max_train_steps": 4, "checkpointing_steps": 2,
                "use_aspect_ratio_buckets": True, "aspect_ratio_buckets": KLEIN_BUCKETS, "masked_loss": True,
                "caption_dropout": 0.3, "center_crop": True, "weighting_scheme": "logit_normal",
                "with_prior_preservation": True, "class_data_dir": str(class_dir), "class_prompt": CLASS_PROMPT,
                "num_class_images": 2, "cache_latents": True, "cache_text_embeddings": True,
                "max_sequence_length": 16, "feature_cache_dir": str(tmp_path / "cache")}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, klein_args(tiny_flux2_klein, mixed_aspect_folder, straight, **settings), num_processes=2)
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
    result = launch(SCRIPT, klein_args(tiny_flux2_klein, mixed_aspect_folder, resumed,
                                       resume_from_checkpoint="latest", **settings), num_processes=2)
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
    "resolution the packing cannot take": ({"resolution": 40}, ["--resolution", "16", "FLUX.2 [klein]"]),
    "text encoder layer out of range": ({"text_encoder_out_layers": [10, 20, 31]},
                                        ["--text_encoder_out_layers 10 20 31", "layer 31", "Qwen3", "30 layers"]),
    "as many layers as the transformer takes": ({"text_encoder_out_layers": [10, 20]},
                                                ["--text_encoder_out_layers 10 20", "takes 3"]),
    "prompt longer than the text encoder's positions": ({"max_sequence_length": 2000},
                                                        ["--max_sequence_length 2000", "1024", "Qwen3"]),
    "caption dropout out of range": ({"caption_dropout": 1.5}, ["--caption_dropout", "[0, 1]"]),
    "caption dropout and proportion_empty_prompts": ({"caption_dropout": 0.2, "proportion_empty_prompts": 0.3},
                                                     ["--caption_dropout 0.2", "--proportion_empty_prompts 0.3"]),
    "text-encoder LoRA": ({"train_text_encoder": True}, ["--train_text_encoder", "FLUX.2 [klein]"]),
    "remote text encoder": ({"remote_text_encoder": True}, ["--remote_text_encoder", "--cache_text_embeddings"]),
    "SD-only flag": ({"snr_gamma": 5}, ["--snr_gamma", "FLUX.2 [klein]"]),
    "lora layer matching no module": ({"lora_layers": "attn.no_such"}, ["--lora_layers", "attn.no_such"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_klein_bad_input_gets_one_line_error(case, tiny_flux2_klein, instance_images, tmp_path, capsys):
    overrides, expected = BAD_INPUTS[case]
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    status, stderr = fail_in_process("train_dreambooth_lora", klein_args(tiny_flux2_klein, instance_images, str(out),
                                                                         **overrides), capsys)
    assert status == 2
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before


def test_upstream_defaults_fill_the_flags_left_out(tiny_flux2_klein, instance_images):
    """train_dreambooth_lora_flux2_klein.py's defaults, --text_encoder_out_layers 10 20 30 among them."""
    import train_dreambooth_lora as script

    args = script.parse_args(["--pretrained_model_name_or_path", tiny_flux2_klein, "--instance_data_dir",
                              instance_images, "--instance_prompt", INSTANCE_PROMPT])
    script.validate_args(args)
    assert args.family.name == "flux2_klein"
    # Neither FLUX.1 nor FLUX.2 [dev] claims a klein folder, whatever the detection order.
    from trainkit.families import FAMILIES, read_model_index

    index = read_model_index(tiny_flux2_klein)
    assert [name for name in ("flux", "flux2", "flux2_klein")
            if FAMILIES[name].recognises(tiny_flux2_klein, index)] == ["flux2_klein"]
    assert (args.resolution, args.learning_rate, args.adam_weight_decay, args.output_dir, args.rank, args.lora_alpha,
            args.weighting_scheme, args.max_sequence_length, list(args.text_encoder_out_layers), args.guidance_scale,
            args.train_batch_size, args.lr_warmup_steps, args.num_validation_images, args.validation_epochs) == \
        (512, 1e-4, 1e-4, "flux-dreambooth-lora", 4, 4, "none", 512, [10, 20, 30], 3.5, 4, 500, 4, 50)


# --------------------------------------------------------------------------------------------------------------------
# What the family computes is what Flux2KleinPipeline computes (in-process)
# --------------------------------------------------------------------------------------------------------------------


def test_prompt_conditioning_is_the_pipelines(tiny_flux2_klein):
    """The chat template with thinking off, padded to --max_sequence_length, the hidden states of
    --text_encoder_out_layers side by side: Flux2KleinPipeline.encode_prompt's, bit for bit, for upstream's default
    layers and others, long and short; the empty prompt (caption dropout, the negative prompt) too."""
    import argparse

    import train_dreambooth_lora as script
    from trainkit.families import FAMILIES

    pipeline = pipeline_from(FLUX2_KLEIN_PIPELINE, tiny_flux2_klein)
    family = FAMILIES["flux2_klein"]
    for length, layers in ((512, [10, 20, 30]), (8, [1, 2, 3])):
        args = argparse.Namespace(family=family, max_sequence_length=length, text_encoder_out_layers=layers,
                                  text_encoder_use_attention_mask=False)
        embeddings = script.precompute_prompt_embeddings([pipeline.text_encoder], [pipeline.tokenizer],
                                                         [INSTANCE_PROMPT, CLASS_PROMPT, ""], args)
        for prompt in (INSTANCE_PROMPT, CLASS_PROMPT, ""):
            with torch.no_grad():
                expected, _ = pipeline.encode_prompt(prompt, max_sequence_length=length,
                                                     text_encoder_out_layers=tuple(layers))
            assert torch.equal(embeddings[prompt], expected[0]), (prompt, length, layers)
    # The chat template's turn, thinking off, as the tokens the encoder reads.
    ids = family.tokenize_prompt(pipeline.tokenizer, [INSTANCE_PROMPT], 512)
    text = pipeline.tokenizer.decode(ids.input_ids[0][ids.attention_mask[0].bool()])
    assert text == f"<|im_start|>user\n{INSTANCE_PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_latents_and_the_transformer_call_are_the_klein_pipelines(tiny_flux2_klein):
    """Latents: the VAE's mode, patchified 2x2 and normalised by its batch-norm statistics as upstream's klein script
    does (what Flux2KleinPipeline's decoding undoes), kept on the VAE's grid; the transformer call: patchified and
    packed with the pipeline's 4-axis latent ids and text ids, no guidance (the klein transformer has no guidance
    embedding, and --guidance_scale changes nothing), timesteps / 1000, unpacked by the ids; a non-square bucket."""
    import argparse

    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    from trainkit.families import FAMILIES

    family = FAMILIES["flux2_klein"]
    vae = AutoencoderKLFlux2.from_pretrained(tiny_flux2_klein, subfolder="vae")
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        latents = family.latent_dist(vae, pixels).mode()
        patched = Flux2KleinPipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    expected = (patched - mean) / std
    torch.testing.assert_close(Flux2KleinPipeline._patchify_latents(latents), expected)
    assert latents.shape == (2, 4, 4, 6)

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_flux2_klein, subfolder="transformer")
    assert not transformer.config.guidance_embeds
    embeds, timesteps = torch.randn(2, 7, 48), torch.tensor([250.0, 750.0])
    with torch.no_grad():
        predictions = [family.denoise(transformer, latents, timesteps, embeds, None, {},
                                      argparse.Namespace(guidance_scale=scale), torch.float32) for scale in (1.0, 3.5)]
        patched = Flux2KleinPipeline._patchify_latents(latents)
        ids = Flux2KleinPipeline._prepare_latent_ids(patched)
        direct = transformer(hidden_states=Flux2KleinPipeline._pack_latents(patched), timestep=timesteps / 1000,
                             guidance=None, encoder_hidden_states=embeds,
                             txt_ids=Flux2KleinPipeline._prepare_text_ids(embeds), img_ids=ids, return_dict=False)[0]
    unpacked = Flux2KleinPipeline._unpatchify_latents(Flux2KleinPipeline._unpack_latents_with_ids(direct, ids))
    assert torch.equal(predictions[0], unpacked) and torch.equal(predictions[1], unpacked)
