"""train_dreambooth_lora.py on a Qwen-Image base model (tests/tiny_sd.build_tiny_qwen_image): upstream
train_dreambooth_lora_qwen_image.py's README and test command lines, the conditioning QwenImagePipeline computes
(template, dropped template tokens, attention mask, per-sample text lengths and img_shapes, normalised and packed
latents), --lora_layers, --rank / --lora_alpha in the file's metadata, rotation and resume, exact resume on 2
processes with accumulation, aspect-ratio buckets, masks, captions, prior preservation and both feature caches, an
nf4 transformer with --offload, --final_validation_prompt alone, --skip_final_inference, and the one-line errors of
the flags that cannot apply.

Resolution 32 (a multiple of 16: 4x4 latents, 2x2 tokens); validation images at 32 px (--validation_height/_width):
the pipeline's default 1024 px takes ~20 s an image through the tiny video VAE on a CPU. Few launches, each read by
several checks."""

import os
import re
import shutil

import pytest
import torch
from helpers import (assert_one_line_error, checkpoints, fail_in_process, launch, lora_parts, lora_rank_and_alpha,
                     pipeline_from, snapshot, train)
from test_dreambooth_lora import CLASS_PROMPT, INSTANCE_PROMPT, assert_same_lora, base_args, lora
from test_dreambooth_lora import tiny_sd  # noqa: F401 (module fixture: the SD model of the Qwen-only flag case)

SCRIPT = "train_dreambooth_lora.py"
QWEN_IMAGE_PIPELINE = "QwenImagePipeline"  # what users load the LoRA with
RESOLUTION = 32
SMALL_VALIDATION = {"validation_height": RESOLUTION, "validation_width": RESOLUTION}


def qwen_args(model, data, output_dir, **overrides):
    return base_args(model, data, output_dir, **{"resolution": RESOLUTION, **overrides})


def render(pipeline, prompt=INSTANCE_PROMPT):
    return pipeline(prompt, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


# --------------------------------------------------------------------------------------------------------------------
# Upstream's command lines
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_readme_command_runs_unchanged_and_the_lora_loads_into_the_qwen_pipeline(
        tiny_qwen_image, instance_images, tmp_path):
    """README_qwen.md's command (bf16, 8-bit AdamW, accumulation 4, wandb, validation every 25 epochs) with the tiny
    model; only --resolution (1024 -> 32) and --max_train_steps (500 -> 2) shrunk, --push_to_hub left out (no
    network), and the validation images made small and quick (ours: 2 denoising steps at 32 px). wandb runs
    offline. The LoRA: transformer.* keys, upstream's rank 4 / alpha 4 in the metadata, saved in bf16 (the training
    dtype, as upstream), and QwenImagePipeline.load_lora_weights loads it and renders differently."""
    out = str(tmp_path / "trained-qwen-lora")
    result = launch(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_qwen_image}", f"--instance_data_dir={instance_images}",
        f"--output_dir={out}", "--mixed_precision=bf16", "--instance_prompt=a photo of sks dog", "--resolution=32",
        "--train_batch_size=1", "--gradient_accumulation_steps=4", "--use_8bit_adam", "--learning_rate=2e-4",
        "--report_to=wandb", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=25", "--seed=0",
        "--validation_inference_steps=2", "--validation_height=32", "--validation_width=32",
    ], cwd=str(tmp_path))
    assert "2 steps in all, batch 1 per device, total batch 4" in result.stderr
    weights = lora(out)
    assert lora_parts(weights) == {"transformer"} and all("lora" in key for key in weights)
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
    # Upstream's targets: to_k, to_q, to_v, to_out.0 of every block.
    modules = {key.split(".lora_")[0].rsplit(".attn.", 1)[1] for key in weights}
    assert modules == {"to_k", "to_q", "to_v", "to_out.0"}
    assert lora_rank_and_alpha(QWEN_IMAGE_PIPELINE, out) == (4, 4)
    for name in ("epoch_0000", "final"):  # --num_validation_images defaults to 4
        assert len(os.listdir(os.path.join(out, "validation", name))) == 4, name
    assert os.path.isdir(tmp_path / "wandb")
    with open(os.path.join(out, "README.md")) as file:
        card = file.read()
    assert "QwenImagePipeline.from_pretrained" in card and "\n- qwen-image\n" in card and "apache-2.0" in card

    pipeline = pipeline_from(QWEN_IMAGE_PIPELINE, tiny_qwen_image)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    assert not (render(pipeline) == base).all()


def test_upstream_test_commands_lora_layers_metadata_rotation_and_resume(tiny_qwen_image, instance_images, tmp_path):
    """test_dreambooth_lora_qwenimage.py's command lines, folded into two runs: --cache_latents, --lora_layers
    transformer_blocks.0.attn.to_k, --lora_alpha 8 --rank 4, --learning_rate 5e-4 --scale_lr, a checkpoint every 2
    of 4 steps; then resumed from checkpoint-4 to 8 steps with --checkpoints_total_limit 2, which leaves
    checkpoint-6 and checkpoint-8 (with --gradient_checkpointing, which upstream's tests leave out)."""
    out = str(tmp_path / "out")
    common = [f"--pretrained_model_name_or_path={tiny_qwen_image}", f"--instance_data_dir={instance_images}",
              f"--output_dir={out}", "--instance_prompt=photo", "--resolution=32", "--train_batch_size=1",
              "--gradient_accumulation_steps=1", "--checkpointing_steps=2", "--cache_latents", "--learning_rate",
              "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--lora_layers",
              "transformer_blocks.0.attn.to_k", "--lora_alpha=8", "--rank=4",
              f"--feature_cache_dir={tmp_path / 'cache'}"]
    # Ours beside upstream's: a validation image at the end of epoch 0 (32 px), none after training
    # (--skip_final_inference).
    result = train(SCRIPT, common + ["--max_train_steps=4", "--validation_prompt=a dog", "--num_validation_images=1",
                                     "--validation_height=32", "--validation_width=32", "--skip_final_inference"])
    assert "the latents of centre crops are cached" in result.stderr
    assert os.listdir(os.path.join(out, "validation")) == ["epoch_0000"]
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    weights = lora(out)
    assert weights and all(key.startswith("transformer.transformer_blocks.0.attn.to_k.") for key in weights)
    assert lora_rank_and_alpha(QWEN_IMAGE_PIPELINE, out) == (4, 8)
    result = train(SCRIPT, common + ["--max_train_steps=8", "--resume_from_checkpoint=checkpoint-4",
                                     "--checkpoints_total_limit=2", "--gradient_checkpointing"])
    assert "latents: 3 of 3 cached" in result.stderr
    assert checkpoints(out) == {"checkpoint-6", "checkpoint-8"}
    assert_same_lora(os.path.join(out, "checkpoint-8"), out)


# --------------------------------------------------------------------------------------------------------------------
# Exact resume on real-dataset settings, both feature caches
# --------------------------------------------------------------------------------------------------------------------

QWEN_BUCKETS = "32,48;48,32;32,32"


def test_two_processes_resume_exactly_with_buckets_masks_prior_preservation_and_the_feature_caches(
        tiny_qwen_image, mixed_aspect_folder, tmp_path):
    """CPU DDP over gloo on real-dataset settings: accumulation 2, aspect-ratio buckets (img_shapes per bucket), masks,
    per-image captions, caption dropout, prior preservation (the class prompt and the captions differ in length: the
    prompt states are padded per batch, prompt_embeds_mask marking each sample's text), --cache_latents and
    --cache_text_embeddings, 4 steps with a checkpoint every 2 (6 images: the run crosses an epoch). The straight
    run fills the caches; its checkpoint-2, resumed in a fresh folder from them, ends bit for bit like it; the
    processes exit cleanly. (The video VAE's latents are not batch-invariant on a CPU, ~3e-7: cached latents equal
    the uncached run's only where it encoded the same batches.)"""
    from conftest import _shape_images

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for index, image in enumerate(_shape_images(2, seed=5)):
        image.save(class_dir / f"{index}.png")
    settings = {"gradient_accumulation_steps": 2, "max_train_steps": 4, "checkpointing_steps": 2,
                "aspect_ratio_buckets": QWEN_BUCKETS, "masked_loss": True, "proportion_empty_prompts": 0.3,
                "center_crop": True, "weighting_scheme": "logit_normal", "with_prior_preservation": True,
                "class_data_dir": str(class_dir), "class_prompt": CLASS_PROMPT, "num_class_images": 2,
                "cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": str(tmp_path / "cache")}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, qwen_args(tiny_qwen_image, mixed_aspect_folder, straight, **settings), num_processes=2)
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
    result = launch(SCRIPT, qwen_args(tiny_qwen_image, mixed_aspect_folder, resumed, resume_from_checkpoint="latest",
                                      **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert re.search(r"latents: ([1-9]\d*) of \1 cached", result.stderr), result.stderr[-3000:]
    assert re.search(r"text_embeddings: ([1-9]\d*) of \1 cached", result.stderr), result.stderr[-3000:]
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(straight, folder), os.path.join(resumed, folder))
    a, b = lora(os.path.join(straight, "checkpoint-2")), lora(straight)
    assert any(not torch.equal(a[key], b[key]) for key in a)  # steps 3-4 trained


def test_prior_preservation_quantized_offloaded_and_final_validation_prompt_alone(tiny_qwen_image, instance_images,
                                                                                  tmp_path):
    """Prior preservation (class images given: the pipeline's own 1024 px class images take ~20 s each here) on an
    nf4-quantized transformer (--bnb_quantization_config_path, README_qwen.md's JSON; bitsandbytes runs on a CPU) with
    --offload, and --final_validation_prompt without --validation_prompt, which upstream crashes on (KeyError
    'prompt_embeds'): here the final images of that prompt are rendered from the saved LoRA and shown in the model
    card; no intermediate validation ran."""
    from conftest import _shape_images

    from helpers import write_json

    bnb_config = write_json(str(tmp_path / "bnb.json"), {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for index, image in enumerate(_shape_images(2, seed=5)):
        image.save(class_dir / f"{index}.png")
    out = str(tmp_path / "out")
    result = train(SCRIPT, qwen_args(tiny_qwen_image, instance_images, out, with_prior_preservation=True,
                                     class_data_dir=str(class_dir), class_prompt=CLASS_PROMPT, num_class_images=2,
                                     max_train_steps=2, final_validation_prompt="a photo of sks dog in a bucket",
                                     num_validation_images=2, bnb_quantization_config_path=bnb_config,
                                     offload=True, **SMALL_VALIDATION))
    assert "Prior preservation: 2 class images (0 generated this run)" in result.stderr
    assert "Frozen transformer (quantized)" in result.stderr
    assert os.listdir(os.path.join(out, "validation")) == ["final"]
    assert len(os.listdir(os.path.join(out, "validation", "final"))) == 2
    with open(os.path.join(out, "README.md")) as file:
        assert "Images for `a photo of sks dog in a bucket`" in file.read()
    assert lora_parts(lora(out)) == {"transformer"}


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any model loads, output_dir untouched
# --------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "resolution the packing cannot take": ({"resolution": 40}, ["--resolution", "16", "Qwen-Image"]),
    "bucket side not a multiple of 16": ({"aspect_ratio_buckets": "32,32;32,40"}, ["32,40", "16"]),
    "prompt length over 1024": ({"max_sequence_length": 2000}, ["--max_sequence_length", "1024"]),
    "text-encoder LoRA": ({"train_text_encoder": True}, ["--train_text_encoder", "Qwen-Image"]),
    "SD-only flag on Qwen-Image": ({"snr_gamma": 5}, ["--snr_gamma", "Qwen-Image"]),
    "Flux-only flag on Qwen-Image": ({"guidance_scale": 3.5}, ["--guidance_scale", "Qwen-Image"]),
    "another VAE": ({"pretrained_vae_model_name_or_path": "some/vae"}, ["--pretrained_vae_model_name_or_path"]),
    "lora layer matching no module": ({"lora_layers": "attn.no_such"}, ["--lora_layers", "attn.no_such"]),
    "empty final validation prompt": ({"final_validation_prompt": " "}, ["--final_validation_prompt", "empty"]),
    "Qwen-only flag on SD": ({"pretrained_text_encoder_4_name_or_path": "x", "model": "tiny_sd"},
                             ["--pretrained_text_encoder_4_name_or_path", "Stable Diffusion"]),
    "Qwen and Flux flag on SD": ({"weighting_scheme": "none", "model": "tiny_sd"},
                                 ["--weighting_scheme", "Qwen-Image models only"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_qwen_bad_input_gets_one_line_error(case, tiny_qwen_image, instance_images, request, tmp_path, capsys):
    overrides, expected = BAD_INPUTS[case]
    overrides = dict(overrides)
    model = request.getfixturevalue(overrides.pop("model", "tiny_qwen_image"))
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    status, stderr = fail_in_process("train_dreambooth_lora", qwen_args(model, instance_images, str(out),
                                                                        **overrides), capsys)
    assert status == 2
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before


def test_upstream_defaults_fill_the_flags_left_out(tiny_qwen_image, instance_images):
    """train_dreambooth_lora_qwen_image.py's defaults; its two unread HiDream flags are accepted with a warning."""
    import train_dreambooth_lora as script

    args = script.parse_args(["--pretrained_model_name_or_path", tiny_qwen_image, "--instance_data_dir",
                              instance_images, "--instance_prompt", INSTANCE_PROMPT,
                              "--pretrained_tokenizer_4_name_or_path", "meta-llama/Meta-Llama-3.1-8B-Instruct"])
    with pytest.warns(UserWarning, match="--pretrained_tokenizer_4_name_or_path is ignored"):
        script.validate_args(args)
    assert args.family.name == "qwen_image"
    assert (args.resolution, args.learning_rate, args.adam_weight_decay, args.output_dir, args.rank, args.lora_alpha,
            args.weighting_scheme, args.max_sequence_length, args.train_batch_size, args.lr_warmup_steps,
            args.num_validation_images, args.validation_epochs) == \
        (512, 1e-4, 1e-4, "hidream-dreambooth-lora", 4, 4, "none", 512, 4, 500, 4, 50)


# --------------------------------------------------------------------------------------------------------------------
# What the family computes is what QwenImagePipeline computes (in-process)
# --------------------------------------------------------------------------------------------------------------------


def test_prompt_conditioning_is_the_pipelines(tiny_qwen_image):
    """The template's ids, the text encoder's last hidden state with the 34 template tokens dropped, cut to
    --max_sequence_length: QwenImagePipeline.encode_prompt's, bit for bit, encoded once per prompt; a batch of
    prompts of different lengths collated as the pipeline pads them (zeros, and the mask of each sample's text);
    one of equal lengths gets no mask, as the pipeline gives none."""
    import argparse

    import train_dreambooth_lora as script
    from trainkit.families import FAMILIES

    pipeline = pipeline_from(QWEN_IMAGE_PIPELINE, tiny_qwen_image)
    family = FAMILIES["qwen_image"]
    long_prompt = "a photo of sks dog in the style of a red painting with a blue background"
    for length in (512, 4):
        args = argparse.Namespace(family=family, max_sequence_length=length, text_encoder_use_attention_mask=False)
        embeddings = script.precompute_prompt_embeddings([pipeline.text_encoder], [pipeline.tokenizer],
                                                         [INSTANCE_PROMPT, long_prompt], args)
        for prompt in (INSTANCE_PROMPT, long_prompt):
            with torch.no_grad():
                expected, mask = pipeline.encode_prompt(prompt, max_sequence_length=length)
            assert mask is None and torch.equal(embeddings[prompt], expected[0]), (prompt, length)
    assert embeddings[long_prompt].shape[0] == 4 and embeddings[INSTANCE_PROMPT].shape[0] == 4
    # The template's system prefix is 34 tokens, the ones the pipeline drops.
    ids = family.tokenize_prompt(pipeline.tokenizer, [INSTANCE_PROMPT]).input_ids[0]
    assert pipeline.tokenizer.decode(ids[34:]).startswith(INSTANCE_PROMPT)

    args = argparse.Namespace(family=family, max_sequence_length=512, text_encoder_use_attention_mask=False)
    embeddings = script.precompute_prompt_embeddings([pipeline.text_encoder], [pipeline.tokenizer],
                                                     [INSTANCE_PROMPT, CLASS_PROMPT], args)
    inputs = script.PromptInputs(None, None, embeddings)
    batch = script.collate_examples([{"instance": inputs(INSTANCE_PROMPT), "class": inputs(CLASS_PROMPT)}])
    with torch.no_grad():
        expected, mask = pipeline.encode_prompt([INSTANCE_PROMPT, CLASS_PROMPT], max_sequence_length=512)
    assert torch.equal(batch["prompt_embeds"], expected) and torch.equal(batch["prompt_embeds_mask"], mask)
    batch = script.collate_examples([{"instance": inputs(INSTANCE_PROMPT)}, {"instance": inputs(INSTANCE_PROMPT)}])
    assert "prompt_embeds_mask" not in batch


def test_latents_and_the_transformer_call_are_the_pipelines(tiny_qwen_image):
    """Latents: the VAE's one-frame latents, normalised per channel as upstream does ((x - mean) / std, which
    QwenImagePipeline's decoding undoes); the denoiser call packs 2x2 patches as the pipeline packs them, with the
    batch's own img_shapes (a non-square bucket) and the prompt mask, and unpacks what it predicts."""
    import argparse

    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    from trainkit.families import FAMILIES

    family = FAMILIES["qwen_image"]
    vae = AutoencoderKLQwenImage.from_pretrained(tiny_qwen_image, subfolder="vae")
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        dist = family.latent_dist(vae, pixels)
        expected = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    assert torch.equal(dist.mode(), expected[:, :, 0]) and dist.mode().shape == (2, 4, 4, 6)
    scale, shift = family.latent_scaling(vae, "cpu")
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    normalised = (dist.mode() - shift) * scale
    torch.testing.assert_close(normalised, ((expected - mean) / std)[:, :, 0])
    torch.testing.assert_close(normalised.unsqueeze(2) * std + mean, expected)  # the pipeline's decoding input

    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image, subfolder="transformer")
    embeds, mask = torch.randn(2, 7, 16), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    timesteps = torch.tensor([250.0, 750.0])
    args = argparse.Namespace(max_sequence_length=512)
    with torch.no_grad():
        prediction = family.denoise(transformer, normalised, timesteps, embeds, None, {"prompt_embeds_mask": mask},
                                    args, torch.float32)
        packed = QwenImagePipeline._pack_latents(normalised.unsqueeze(2), 2, 4, 4, 6)
        direct = transformer(hidden_states=packed, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                             timestep=timesteps / 1000, img_shapes=[[(1, 2, 3)]] * 2, return_dict=False)[0]
    assert prediction.shape == normalised.shape
    assert torch.equal(prediction, QwenImagePipeline._unpack_latents(direct, 32, 48, 8)[:, :, 0])
