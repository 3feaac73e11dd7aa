"""train_dreambooth_lora.py: the flags of upstream's train_dreambooth_lora_sdxl.py on a Stable Diffusion model.

Captioned datasets (--dataset_name, --image_column, --caption_column, --repeats, --random_flip), the text encoder's
own learning rate and weight decay, --optimizer prodigy, --use_dora, --snr_gamma, --output_kohya_format, and the
refusal of --do_edm_style_training. Three launched runs; everything else in-process."""

import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, fail_in_process, launch, snapshot, train
from PIL import Image
from safetensors.torch import load_file, save_file
from test_dreambooth_lora import INSTANCE_PROMPT, LORA, assert_same_lora, base_args, lora, render

from trainkit.families import FAMILIES

SCRIPT = "train_dreambooth_lora.py"
KOHYA = "pytorch_lora_weights_kohya.safetensors"
CAPTIONS = ["a red circle", "", "a blue square in the style of a painting"]  # "" falls back to --instance_prompt


def _script():
    import train_dreambooth_lora

    return train_dreambooth_lora


def _images(count, seed=0):
    from conftest import _shape_images

    return _shape_images(count, seed)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    """An imagefolder: 3 readable non-square images with captions in metadata.jsonl (one empty), one corrupt file."""
    folder = tmp_path_factory.mktemp("caption_folder")
    rows = []
    for index, (image, caption) in enumerate(zip(_images(3, seed=2), CAPTIONS)):
        image.save(folder / f"img_{index}.png")
        rows.append({"file_name": f"img_{index}.png", "text": caption})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.append({"file_name": "corrupt.png", "text": "broken"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def caption_parquet(tmp_path_factory):
    """The same images and captions as a parquet dataset (images held as bytes, column `pixels`)."""
    import datasets

    folder = tmp_path_factory.mktemp("caption_parquet")
    dataset = datasets.Dataset.from_dict(
        {"pixels": _images(3, seed=2), "prompt": CAPTIONS},
        features=datasets.Features({"pixels": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    os.makedirs(folder / "data")
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return str(folder)


def dataset_args(model, data, output_dir, **overrides):
    """base_args with the instance images from --dataset_name instead of --instance_data_dir."""
    flags = base_args(model, "unused", output_dir, **overrides)
    at = flags.index("--instance_data_dir")
    return flags[:at] + ["--dataset_name", data] + flags[at + 2:]


def _namespace(**values):
    defaults = {"resolution": 64, "center_crop": False, "image_interpolation_mode": "lanczos", "random_flip": False,
                "tokenizer_max_length": None, "text_encoder_use_attention_mask": False, "snr_gamma": None,
                "with_prior_preservation": False, "prior_loss_weight": 1.0, "class_labels_conditioning": None,
                "family": FAMILIES["sd"], "lora_targets": None,
                "instance_prompt": INSTANCE_PROMPT, "dataset_name": None, "instance_data_dir": None,
                "dataset_config_name": None, "cache_dir": None, "image_column": "image", "caption_column": None,
                "repeats": 1, "buckets": None, "masked_loss": False, "mask_column": None}
    defaults.update(values)
    return argparse.Namespace(**defaults)


# --------------------------------------------------------------------------------------------------------------------
# Launched runs
# --------------------------------------------------------------------------------------------------------------------

# Captioned imagefolder, each image twice (6 examples), random crops and flips, DoRA on the UNet and the text encoder
# with its own learning rate and weight decay, Min-SNR, accumulation 2: 3 optimizer steps per epoch, 4 in all.
FLAG_SETTINGS = {"caption_column": "text", "repeats": 2, "random_flip": True, "train_text_encoder": True,
                 "text_encoder_lr": 1e-4, "adam_weight_decay_text_encoder": 0.5, "use_dora": True, "snr_gamma": 5.0,
                 "output_kohya_format": True, "gradient_accumulation_steps": 2, "max_train_steps": 4,
                 "checkpointing_steps": 2}


@pytest.fixture(scope="module")
def flags_run(tiny_sd, caption_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("flags_run")
    out, cache_dir = str(root / "out"), str(root / "datasets_cache")
    result = launch(SCRIPT, dataset_args(tiny_sd, caption_folder, out, cache_dir=cache_dir, **FLAG_SETTINGS))
    return {"out": out, "result": result, "cache_dir": cache_dir}


def _magnitudes(model):
    """{layer: DoRA magnitude vector} of a peft-adapted model."""
    return {name.split(".lora_magnitude_vector")[0]: parameter.detach().clone()
            for name, parameter in model.named_parameters() if "lora_magnitude_vector" in name}


def test_captioned_dataset_dora_text_encoder_groups_and_kohya_file(tiny_sd, flags_run):
    out, result = flags_run["out"], flags_run["result"]
    # The corrupt row is skipped by name; 3 images x --repeats 2 = 6 examples, 3 steps per epoch at accumulation 2.
    assert "corrupt.png" in result.stderr
    assert os.listdir(flags_run["cache_dir"])  # datasets prepared the imagefolder under --cache_dir
    assert "6 instance images, 6 examples, 2 epochs of 3 steps, 4 steps in all" in result.stderr

    # Both models' adapters, with DoRA magnitude vectors, in the file.
    weights = lora(out)
    assert {key.split(".")[0] for key in weights} == {"unet", "text_encoder"}
    assert all(key.startswith("text_encoder.text_model.encoder.layers.") for key in weights
               if key.startswith("text_encoder."))
    magnitude_keys = [key for key in weights if "lora_magnitude_vector" in key]
    assert {key.split(".")[0] for key in magnitude_keys} == {"unet", "text_encoder"}

    # The text encoder's parameter group has its own learning rate and weight decay (checkpoint's optimizer state).
    optimizer = torch.load(os.path.join(out, "checkpoint-4", "optimizer.bin"), weights_only=False)
    assert [(group["lr"], group["weight_decay"]) for group in optimizer["param_groups"]] == [(1e-3, 1e-2), (1e-4, 0.5)]

    # load_lora_weights reads every adapter, DoRA magnitudes included (trained: no longer the weights' row norms).
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.set_progress_bar_config(disable=True)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    assert not (render(pipeline) == base).all()
    for prefix, model in (("unet", pipeline.unet), ("text_encoder", pipeline.text_encoder)):
        # The file names CLIP's layers `text_model.encoder.layers.N` whatever transformers' own module names are.
        loaded = {name.removeprefix("text_model."): value for name, value in _magnitudes(model).items()}
        saved = {key[len(prefix) + 1:].split(".lora_magnitude_vector")[0].removeprefix("text_model."): value
                 for key, value in weights.items() if key.startswith(prefix + ".") and "lora_magnitude_vector" in key}
        assert loaded.keys() == saved.keys() and saved
        for layer, value in saved.items():
            torch.testing.assert_close(loaded[layer], value.to(loaded[layer].dtype), rtol=0, atol=0)
        norms = {name[: -len(".base_layer.weight")]: parameter.detach().norm(dim=1)
                 for name, parameter in model.named_parameters() if name.endswith(".base_layer.weight")}
        assert any(not torch.allclose(saved[layer], norms[layer], atol=1e-6) for layer in saved), prefix

    # The kohya copy: every adapter under kohya's names, DoRA's magnitudes as (out, 1) dora_scale.
    kohya = load_file(os.path.join(out, KOHYA))
    downs = [key for key in kohya if key.endswith(".lora_down.weight")]
    assert len(downs) == len([key for key in weights if key.endswith(".down.weight")])
    # The key names ComfyUI's model_lora_keys_unet / model_lora_keys_clip map for SD 1.x (checked against its source).
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for key in kohya)
    assert {key.split(".")[0] + ".alpha" for key in downs} <= kohya.keys()
    scales = [key for key in kohya if key.endswith(".dora_scale")]
    assert len(scales) == len(magnitude_keys) and all(kohya[key].shape[1] == 1 for key in scales)
    comfyui = _comfyui_lora_names(StableDiffusionPipeline.from_pretrained(tiny_sd))
    unmapped = sorted({key.split(".")[0] for key in kohya} - comfyui)
    assert not unmapped, f"{len(unmapped)} kohya layers ComfyUI would skip: {unmapped[:3]}"


def _comfyui_lora_names(pipeline):
    """The kohya layer names ComfyUI's comfy/lora.py maps for an SD 1.x model, restated from its source (ComfyUI is not
    installable here): model_lora_keys_unet maps `lora_unet_` + each diffusers UNet weight's path with `_` for `.`;
    model_lora_keys_clip maps `lora_te_text_model_encoder_layers_{layer}_{part}` for the CLIP attention and MLP
    projections."""
    names = {"lora_unet_" + name[: -len(".weight")].replace(".", "_")
             for name, _ in pipeline.unet.named_parameters() if name.endswith(".weight")}
    parts = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj")
    layers = pipeline.text_encoder.config.num_hidden_layers
    return names | {f"lora_te_text_model_encoder_layers_{layer}_{part}" for layer in range(layers) for part in parts}


def test_exact_resume_from_the_dataset_with_flips_dora_and_accumulation(tiny_sd, caption_folder, flags_run, tmp_path):
    """checkpoint-2 of flags_run (mid-epoch) resumed in another folder to step 4 == the straight run, bit for bit."""
    straight = flags_run["out"]
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = train(SCRIPT, dataset_args(tiny_sd, caption_folder, resumed, **FLAG_SETTINGS,
                                        resume_from_checkpoint="latest"))
    assert f"Resuming from {os.path.join(resumed, 'checkpoint-2')}" in result.stderr
    for folder in ("checkpoint-4", "."):
        assert_same_lora(os.path.join(straight, folder), os.path.join(resumed, folder))
    assert load_file(os.path.join(straight, KOHYA)).keys() == load_file(os.path.join(resumed, KOHYA)).keys()


def test_prodigy_trains_and_its_kohya_file_loads_like_the_diffusers_file(tiny_sd, caption_parquet, tmp_path):
    """--optimizer PRODIGY (any case) with --train_text_encoder on the parquet dataset: the weights move, the optimizer
    state is Prodigy's (its step-size estimate d), and the kohya file renders what the diffusers file renders."""
    out = str(tmp_path / "prodigy")
    train(SCRIPT, dataset_args(tiny_sd, caption_parquet, out, image_column="pixels", caption_column="prompt",
                               optimizer="PRODIGY", learning_rate=1.0, train_text_encoder=True,
                               output_kohya_format=True, max_train_steps=3, checkpointing_steps=3,
                               prodigy_safeguard_warmup="False", prodigy_beta3=0.9))
    optimizer = torch.load(os.path.join(out, "checkpoint-3", "optimizer.bin"), weights_only=False)
    groups = optimizer["param_groups"]
    assert len(groups) == 1 and groups[0]["k"] == 3 and groups[0]["d_numerator"] > 0
    assert groups[0]["safeguard_warmup"] is False and groups[0]["beta3"] == 0.9
    assert groups[0]["decouple"] is True and groups[0]["use_bias_correction"] is True
    up = [value for key, value in lora(out).items() if ".up." in key]
    assert up and all(value.abs().sum() > 0 for value in up)  # B starts at zero
    # Prodigy's step size is still near its 1e-6 start after 3 steps: too small a change to compare renders (the
    # in-process test below does). Loaded by diffusers, the kohya file gives the models exactly the LoRA weights the
    # diffusers file gives them, at the same scale.
    from_diffusers, from_kohya = _loaded_lora(tiny_sd, out, LORA), _loaded_lora(tiny_sd, out, KOHYA)
    assert from_kohya.keys() == from_diffusers.keys()
    assert {key.split(".")[0] for key in from_kohya} == {"unet", "text_encoder", "scaling"}
    assert all(torch.equal(from_kohya[key], from_diffusers[key]) for key in from_kohya)


def _loaded_lora(model, folder, weight_name):
    """{model.parameter: value} of the LoRA weights a fresh pipeline holds after load_lora_weights, and each adapted
    layer's scaling."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model)
    pipeline.load_lora_weights(folder, weight_name=weight_name)
    loaded = {}
    for part in ("unet", "text_encoder"):
        for name, module in getattr(pipeline, part).named_modules():
            if hasattr(module, "scaling") and module.scaling:
                loaded[f"scaling.{part}.{name}"] = torch.tensor(list(module.scaling.values()))
        for name, parameter in getattr(pipeline, part).named_parameters():
            if "lora_" in name:
                loaded[f"{part}.{name}"] = parameter.detach()
    return loaded


def _assert_kohya_renders_like_diffusers(model, folder):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    base = render(pipeline)
    pipeline.load_lora_weights(folder, weight_name=LORA)
    expected = render(pipeline)
    pipeline.unload_lora_weights()
    assert (render(pipeline) == base).all()
    pipeline.load_lora_weights(folder, weight_name=KOHYA)
    assert {"unet", "text_encoder"} <= set(pipeline.get_list_adapters())
    got = render(pipeline)
    assert abs(expected - base).max() > 1e-3, "the LoRA changes too little for the comparison to mean anything"
    assert abs(got - expected).max() < 1e-5


# --------------------------------------------------------------------------------------------------------------------
# In-process
# --------------------------------------------------------------------------------------------------------------------


def test_kohya_file_renders_like_the_diffusers_file_unet_and_text_encoder(tiny_sd, tmp_path):
    """Adapters made by the script (LoRA on the UNet and the text encoder), moved well away from their start, saved
    both ways: diffusers' load_lora_weights renders the same images from either file."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    script = _script()
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    torch.manual_seed(0)
    script.add_lora_adapters(_namespace(rank=4, lora_alpha=4, lora_dropout=0.0, use_dora=False,
                                        train_text_encoder=True), unet,
                             [text_encoder])
    with torch.no_grad():
        for model in (unet, text_encoder):
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
    script.save_lora_weights(str(tmp_path), unet, [text_encoder], FAMILIES["sd"])
    script.save_kohya_weights(str(tmp_path), unet, [text_encoder], FAMILIES["sd"])
    assert any(key.startswith("lora_te_text_model_encoder_layers_") for key in load_file(str(tmp_path / KOHYA)))
    _assert_kohya_renders_like_diffusers(tiny_sd, str(tmp_path))


def test_kohya_file_carries_the_true_alpha(tiny_sd, tmp_path):
    """--rank 4 --lora_alpha 16: every kohya layer's `.alpha` is 16 (not the rank), so kohya, A1111 and ComfyUI scale
    the update by 16 / 4 as diffusers does: loaded by load_lora_weights (which reads the kohya alphas), the kohya file
    renders what the diffusers file renders, UNet and text encoder alike."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    script = _script()
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    torch.manual_seed(0)
    script.add_lora_adapters(_namespace(rank=4, lora_alpha=16, lora_dropout=0.0, use_dora=False,
                                        train_text_encoder=True), unet, [text_encoder])
    with torch.no_grad():
        for model in (unet, text_encoder):
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    script.save_lora_weights(str(tmp_path), unet, [text_encoder], FAMILIES["sd"])
    script.save_kohya_weights(str(tmp_path), unet, [text_encoder], FAMILIES["sd"])
    kohya = load_file(str(tmp_path / KOHYA))
    alphas = {key: value for key, value in kohya.items() if key.endswith(".alpha")}
    assert any(key.startswith("lora_unet_") for key in alphas) and any(key.startswith("lora_te_") for key in alphas)
    assert {value.item() for value in alphas.values()} == {16.0}
    assert {kohya[key.replace(".alpha", ".lora_down.weight")].shape[0] for key in alphas} == {4}
    _assert_kohya_renders_like_diffusers(tiny_sd, str(tmp_path))


def test_dataset_items_captions_repeats_and_flips(caption_folder, caption_parquet, tmp_path):
    """Both dataset forms give the same items in order: captions replace --instance_prompt (an empty one falls back),
    each image repeated --repeats times in a row; the corrupt row is skipped. --random_flip mirrors instance images
    (not class images) from the per-sample generator: the same every time for (epoch, index), both ways over epochs."""
    from trainkit.randomness import RunState

    script = _script()
    expected_prompts = [caption or INSTANCE_PROMPT for caption in CAPTIONS for _ in range(2)]
    folder_items, _ = script.read_instance_items(_namespace(dataset_name=caption_folder, caption_column="text",
                                                            repeats=2))
    parquet_items, _ = script.read_instance_items(_namespace(dataset_name=caption_parquet, image_column="pixels",
                                                             caption_column="prompt", repeats=2))
    for items in (folder_items, parquet_items):
        assert [prompt for _, prompt in items] == expected_prompts
    assert folder_items[0][0].path and not parquet_items[0][0].path and parquet_items[0][0].bytes
    for (a, _), (b, _) in zip(folder_items, parquet_items):
        assert (np.asarray(script.load_rgb(a)) == np.asarray(script.load_rgb(b))).all()
    plain, _ = script.read_instance_items(_namespace(dataset_name=caption_folder))
    assert [prompt for _, prompt in plain] == [INSTANCE_PROMPT] * 3
    # --repeats applies to --instance_data_dir too (upstream), after the unreadable file is skipped.
    folder, skipped = script.read_instance_items(_namespace(instance_data_dir=caption_folder, repeats=3))
    assert [os.path.basename(path) for path, _ in folder] == [f"img_{i}.png" for i in range(3) for _ in range(3)]
    assert len(skipped) == 1 and "corrupt.png" in skipped[0]

    square = tmp_path / "square.png"  # a square image: a centre crop leaves nothing but the flip to vary
    _images(1, seed=4)[0].resize((32, 32)).save(square)
    items = [(str(square), INSTANCE_PROMPT)]
    inputs = script.PromptInputs(None, None, {INSTANCE_PROMPT: torch.zeros(1)})
    flipping = script.DreamBoothDataset(items, items, inputs, _namespace(center_crop=True, random_flip=True),
                                        RunState(0))
    still = script.DreamBoothDataset(items, items, inputs, _namespace(center_crop=True), RunState(0))
    upright = still[(0, 0)]["instance"]["pixel_values"]
    assert not torch.equal(upright, upright.flip(-1))
    flipped = []
    for epoch in range(8):
        example = flipping[(epoch, 0)]
        pixels = example["instance"]["pixel_values"]
        assert torch.equal(pixels, flipping[(epoch, 0)]["instance"]["pixel_values"])
        assert torch.equal(example["class"]["pixel_values"], upright)
        assert torch.equal(pixels, upright) or torch.equal(pixels, upright.flip(-1))
        flipped.append(torch.equal(pixels, upright.flip(-1)))
    assert any(flipped) and not all(flipped)


def test_cached_latents_hold_both_orientations_with_random_flip(tiny_sd, caption_folder, tmp_path):
    """--cache_latents --random_flip: each cached entry holds the latents of the image and of its mirror, and the
    cached dataset hands the one the uncached dataset's flip draw picks."""
    from diffusers import AutoencoderKL
    from test_dreambooth_lora import _OneProcess

    from trainkit.randomness import RunState

    script = _script()
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    items, _ = script.read_instance_items(_namespace(dataset_name=caption_folder))
    args = _namespace(center_crop=True, random_flip=True, feature_cache_dir=str(tmp_path / "cache"),
                      train_batch_size=2)
    inputs = script.PromptInputs(None, None, {INSTANCE_PROMPT: torch.zeros(1)})
    cache = script.cache_latents(_OneProcess(), vae, [image for image, _ in items], args, torch.float32)
    fresh = script.DreamBoothDataset(items, [], inputs, args, RunState(0))
    cached = script.DreamBoothDataset(items, [], inputs, args, RunState(0))
    cached.use_latent_cache(*cache)
    with torch.no_grad():
        for epoch in range(3):
            for index in range(len(items)):
                pixels = fresh[(epoch, index)]["instance"]["pixel_values"][None]
                expected = vae.encode(pixels).latent_dist.parameters[0]
                torch.testing.assert_close(cached[(epoch, index)]["instance"]["latent_dist"], expected, rtol=1e-5,
                                           atol=1e-5)


GAMMA = 1e-3  # below the SNR of every timestep of the tiny model's schedule: every sample's weight is < 1


def test_snr_gamma_weights_the_instance_loss_only(tiny_sd, monkeypatch):
    """Same batch and generator: --snr_gamma makes the loss the mean of the per-sample errors weighted by
    min(SNR, gamma) / SNR of each sample's timestep; with prior preservation the class half keeps its plain mean."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr
    from transformers import CLIPTextModel

    script = _script()
    tokens = _tokenizer(tiny_sd)([INSTANCE_PROMPT, "a photo of dog"], padding="max_length", max_length=77,
                                 return_tensors="pt")
    batch = {"pixel_values": torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    calls, drawn = [], []
    diffusion_loss, sample_timesteps = script.objectives.diffusion_loss, script.objectives.sample_timesteps

    def recording_loss(prediction, target, weights=None):
        calls.append((prediction.detach(), target, weights))
        return diffusion_loss(prediction, target, weights)

    def recording_timesteps(*args):
        drawn.append(sample_timesteps(*args))
        return drawn[-1]

    monkeypatch.setattr(script.objectives, "diffusion_loss", recording_loss)
    monkeypatch.setattr(script.objectives, "sample_timesteps", recording_timesteps)

    def loss(**flags):
        calls.clear()
        drawn.clear()
        with torch.no_grad():
            return script.training_loss(unet, vae, [text_encoder], scheduler, batch, torch.Generator().manual_seed(7),
                                        _namespace(**flags), torch.float32, (vae.config.scaling_factor, None)).item()

    plain = loss()
    weighted = loss(snr_gamma=GAMMA)
    assert (compute_snr(scheduler, drawn[0]) > GAMMA).all()
    assert weighted != pytest.approx(plain)
    (prediction, target, weights), = calls
    snr = compute_snr(scheduler, drawn[0])
    expected = torch.clamp(snr, max=GAMMA) / snr  # epsilon prediction; every weight < 1
    torch.testing.assert_close(weights, expected)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    assert weighted == pytest.approx((per_sample * expected).mean().item(), rel=1e-5)

    prior_plain = loss(with_prior_preservation=True)
    prior_weighted = loss(with_prior_preservation=True, snr_gamma=GAMMA)
    (_, _, instance_weights), (_, _, class_weights) = calls
    assert class_weights is None
    torch.testing.assert_close(instance_weights, expected[:1])
    assert prior_weighted != pytest.approx(prior_plain)


def _tokenizer(model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")


def test_parameter_groups_follow_the_text_encoder_flags():
    script = _script()
    unet_params, text_params = [torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))]

    def groups(**flags):
        values = {"learning_rate": 1e-3, "adam_weight_decay": 1e-2, "text_encoder_lr": None,
                  "adam_weight_decay_text_encoder": None, "optimizer": "adamw"}
        values.update(flags)
        result = script.parameter_groups(argparse.Namespace(**values), unet_params, text_params)
        return [(len(group["params"]), group["lr"], group["weight_decay"]) for group in result]

    # SD default (as upstream's SD script): one group, both models at --learning_rate / --adam_weight_decay.
    assert groups() == [(2, 1e-3, 1e-2)]
    assert groups(text_encoder_lr=5e-6) == [(1, 1e-3, 1e-2), (1, 5e-6, 1e-2)]
    assert groups(adam_weight_decay_text_encoder=1e-3) == [(1, 1e-3, 1e-2), (1, 1e-3, 1e-3)]
    # Prodigy starts both from --learning_rate (upstream), keeping the text encoder's weight decay.
    assert groups(optimizer="prodigy", learning_rate=1.0, text_encoder_lr=5e-6,
                  adam_weight_decay_text_encoder=1e-3) == [(1, 1.0, 1e-2), (1, 1.0, 1e-3)]
    assert script.parameter_groups(argparse.Namespace(learning_rate=1e-3, adam_weight_decay=1e-2), unet_params,
                                   []) == [{"params": unet_params, "lr": 1e-3, "weight_decay": 1e-2}]


def test_upstream_sdxl_flag_defaults_and_warnings(recwarn):
    script = _script()
    args = script.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                              "--instance_prompt", "p"])
    defaults = {"dataset_name": None, "dataset_config_name": None, "cache_dir": None, "image_column": "image",
                "caption_column": None, "repeats": 1, "random_flip": False, "optimizer": "AdamW",
                "prodigy_beta3": None, "prodigy_decouple": True, "prodigy_use_bias_correction": True,
                "prodigy_safeguard_warmup": True, "use_dora": False, "snr_gamma": None, "output_kohya_format": False,
                "do_edm_style_training": False, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
                "text_encoder_lr": None, "adam_weight_decay_text_encoder": None, "adam_weight_decay": None,
                "resolution": None, "pretrained_vae_model_name_or_path": None}
    assert {key: getattr(args, key) for key in defaults} == defaults
    # Flags left out take the default of the upstream script matching the base model (SD / SDXL).
    assert {name: script.FAMILY_DEFAULTS[name] for name in ("sd", "sdxl", "flux")} == {
        "sd": {"resolution": 512, "learning_rate": 5e-4, "adam_weight_decay": 1e-2, "text_encoder_lr": None,
               "adam_weight_decay_text_encoder": None, "output_dir": "lora-dreambooth-model"},
        "sdxl": {"resolution": 1024, "learning_rate": 1e-4, "adam_weight_decay": 1e-4, "text_encoder_lr": 5e-6,
                 "adam_weight_decay_text_encoder": 1e-3, "output_dir": "lora-dreambooth-model"},
        "flux": {"resolution": 512, "learning_rate": 1e-4, "adam_weight_decay": 1e-4, "text_encoder_lr": 5e-6,
                 "adam_weight_decay_text_encoder": 1e-3, "output_dir": "flux-dreambooth-lora", "lora_alpha": 4,
                 "guidance_scale": 3.5, "weighting_scheme": "none", "max_sequence_length": 512}}
    for text, value in (("False", False), ("0", False), ("true", True), ("1", True)):
        assert script.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                  "--instance_prompt", "p", "--prodigy_decouple", text]).prodigy_decouple is value

    # As upstream: --use_8bit_adam is ignored with prodigy, a low learning rate and --text_encoder_lr are warned about.
    args.optimizer, args.use_8bit_adam, args.train_text_encoder, args.text_encoder_lr = "Prodigy", True, True, 1e-5
    args.learning_rate = 5e-4  # validate_args' SD default
    script.validate_optimizer_args(args)
    messages = " | ".join(str(warning.message) for warning in recwarn)
    assert args.optimizer == "prodigy"
    assert "--use_8bit_adam is ignored" in messages and "low for prodigy" in messages
    assert "--text_encoder_lr is ignored" in messages


# Bad input: one line before any model loads (helpers.fail_in_process asserts no Accelerator was created).
# "{folder}" is an instance folder, "{captions}" the captioned imagefolder.
BAD_ARGUMENTS = {
    "caption column without a dataset": ({"caption_column": "text"}, ["--caption_column needs --dataset_name"]),
    "dataset config without a dataset": ({"dataset_config_name": "x"}, ["--dataset_config_name needs --dataset_name"]),
    "dataset and instance folder": ({"dataset_name": "{captions}"}, ["--instance_data_dir", "--dataset_name", "both"]),
    "neither dataset nor folder": ({"instance_data_dir": None}, ["--instance_data_dir", "--dataset_name", "neither"]),
    "caption column not in the data": ({"instance_data_dir": None, "dataset_name": "{captions}",
                                        "caption_column": "prompt"},
                                       ["--caption_column 'prompt' is not a column", "columns: image, text"]),
    "image column not in the data": ({"instance_data_dir": None, "dataset_name": "{captions}",
                                      "image_column": "pixels"}, ["--image_column 'pixels'", "columns: image, text"]),
    "missing dataset folder": ({"instance_data_dir": None, "dataset_name": "/nonexistent/data"}, ["--dataset_name"]),
    "unknown optimizer": ({"optimizer": "sgd"}, ["--optimizer 'sgd' is not one of AdamW, prodigy"]),
    "repeats 0": ({"repeats": 0}, ["--repeats must be > 0"]),
    "snr_gamma 0": ({"snr_gamma": 0}, ["--snr_gamma must be > 0"]),
    "text_encoder_lr negative": ({"text_encoder_lr": -1}, ["--text_encoder_lr must be > 0"]),
    "negative text encoder weight decay": ({"adam_weight_decay_text_encoder": -1},
                                           ["--adam_weight_decay_text_encoder must be >= 0"]),
    "edm on an SD model": ({"do_edm_style_training": True}, ["--do_edm_style_training", "SDXL"]),
    "crop flag on an SD model": ({"crops_coords_top_left_h": 4}, ["--crops_coords_top_left_h applies to SDXL"]),
    "negative crop flag on SDXL": ({"pretrained_model_name_or_path": "{sdxl}", "crops_coords_top_left_w": -1},
                                   ["--crops_coords_top_left_w must be >= 0"]),
    "prodigy flag not a boolean": ({"prodigy_decouple": "maybe"}, ["--prodigy_decouple"]),
    "resume DoRA without --use_dora": ({"resume_from_checkpoint": "latest"}, ["add --use_dora"]),
    "max length on SDXL": ({"pretrained_model_name_or_path": "{sdxl}", "tokenizer_max_length": 16},
                           ["--tokenizer_max_length cannot apply to the SDXL model"]),
    "edm on SDXL": ({"pretrained_model_name_or_path": "{sdxl}", "do_edm_style_training": True},
                    ["--do_edm_style_training cannot apply to the SDXL model", "not built"]),
    # Real datasets (SPEC §9)
    "malformed bucket list": ({"aspect_ratio_buckets": "64x96"}, ["--aspect_ratio_buckets '64x96'", "height,width"]),
    "bucket side not a multiple of 8": ({"aspect_ratio_buckets": "64,100;64,64"},
                                        ["--aspect_ratio_buckets", "64,100", "multiple of 8"]),
    "bucket minimum above the resolution": ({"use_aspect_ratio_buckets": True, "bucket_min_resolution": 128},
                                            ["--bucket_min_resolution (128) must be <= --resolution (64)"]),
    "bucket list with a bucket minimum": ({"aspect_ratio_buckets": "64,64", "bucket_min_resolution": 32},
                                          ["--bucket_min_resolution", "cannot be combined", "--aspect_ratio_buckets"]),
    "masked loss without any mask": ({"masked_loss": True},
                                     ["--masked_loss: no mask found", "name.mask.png", "alpha", "--instance_data_dir"]),
    "mask of the wrong size": ({"masked_loss": True, "instance_data_dir": "{bad_mask}"},
                               ["dog.mask.png is 8x8", "a mask must have its image's size"]),
    "dataset without any mask": ({"instance_data_dir": None, "dataset_name": "{captions}", "masked_loss": True},
                                 ["--masked_loss: no mask found", "alpha channels in --image_column 'image'"]),
    "mask column not in the data": ({"instance_data_dir": None, "dataset_name": "{captions}", "masked_loss": True,
                                     "mask_column": "mask"}, ["--mask_column 'mask' is not a column"]),
    "mask column without masked loss": ({"instance_data_dir": None, "dataset_name": "{captions}",
                                         "mask_column": "image"}, ["--mask_column applies only with --masked_loss"]),
    "mask column without a dataset": ({"masked_loss": True, "mask_column": "mask"},
                                      ["--mask_column needs --dataset_name"]),
    "caption dropout above 1": ({"proportion_empty_prompts": 1.5}, ["--proportion_empty_prompts must be in [0, 1]"]),
    "caption dropout negative": ({"proportion_empty_prompts": -0.1}, ["--proportion_empty_prompts", "-0.1"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_gets_one_line_error(case, tiny_sd, caption_folder, tmp_path, capsys, request):
    overrides, expected = BAD_ARGUMENTS[case]
    sdxl = request.getfixturevalue("tiny_sdxl") if "{sdxl}" in str(overrides) else None
    bad_mask = tmp_path / "bad_mask"  # an image whose name.mask.png has another size
    bad_mask.mkdir()
    _images(1)[0].save(bad_mask / "dog.png")
    Image.new("L", (8, 8), 255).save(bad_mask / "dog.mask.png")
    overrides = {k: v.format(captions=caption_folder, sdxl=sdxl, bad_mask=bad_mask) if isinstance(v, str) else v
                 for k, v in overrides.items()}
    folder = tmp_path / "instance"
    folder.mkdir()
    _images(1)[0].save(folder / "dog.png")
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    save_file({"unet.layer.lora_magnitude_vector": torch.ones(2)}, str(out / "checkpoint-3" / LORA))
    before = snapshot(str(out))
    flags = base_args(tiny_sd, str(folder), str(out), **overrides)  # a None value leaves the flag out
    status, stderr = fail_in_process("train_dreambooth_lora", flags, capsys)
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before


def test_prodigy_without_prodigyopt_is_one_line(tiny_sd, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "prodigyopt" else find_spec(name, *args))
    folder = tmp_path / "instance"
    folder.mkdir()
    _images(1)[0].save(folder / "dog.png")
    status, stderr = fail_in_process("train_dreambooth_lora", base_args(tiny_sd, str(folder), str(tmp_path / "out"),
                                                                        optimizer="prodigy"), capsys)
    assert_one_line_error(status, stderr, ["--optimizer prodigy", "pip install prodigyopt"])
    assert not os.path.exists(tmp_path / "out")


def test_mask_column_masks_dataset_images_and_a_wrong_size_is_named(tmp_path):
    """--masked_loss --mask_column on a parquet dataset (images held as bytes): each row's mask reaches its example on
    the latent grid; a row without a mask trains on every pixel (a note says so); a mask of another size than its
    image is one InputError naming the column."""
    import datasets

    from trainkit.cli import InputError
    from trainkit.randomness import RunState

    script = _script()
    images = [image.resize((64, 64)) for image in _images(3, seed=3)]
    left_half = Image.new("L", (64, 64), 0)
    left_half.paste(255, (0, 0, 32, 64))
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})

    def parquet(name, masks):
        folder = tmp_path / name
        os.makedirs(folder / "data")
        datasets.Dataset.from_dict({"image": images, "mask": masks}, features=features).to_parquet(
            str(folder / "data" / "train-00000-of-00001.parquet"))
        return _namespace(dataset_name=str(folder), mask_column="mask", masked_loss=True)

    args = parquet("masked", [left_half, left_half, None])
    items, _ = script.read_instance_items(args)
    notes = []
    masks = script.read_masks(args, items, notes)
    assert len(masks) == 2 and notes == ["--masked_loss: 1 of 3 instance images have no mask and train on every pixel"]
    inputs = script.PromptInputs(None, None, {INSTANCE_PROMPT: torch.zeros(1)})
    dataset = script.DreamBoothDataset(items, [], inputs, _namespace(center_crop=True), RunState(0), masks=masks)
    expected = (torch.arange(8) < 4).float().expand(8, 8)
    assert torch.equal(dataset[(0, 0)]["instance"]["mask"][0], expected)
    assert (dataset[(0, 2)]["instance"]["mask"] == 1).all()

    args = parquet("wrong_size", [left_half, left_half.resize((32, 32)), left_half])
    items, _ = script.read_instance_items(args)
    with pytest.raises(InputError, match="--mask_column image of .* is 32x32 but its image is 64x64"):
        script.read_masks(args, items, [])
