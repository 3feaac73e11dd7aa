"""Big models (SPEC §13) through train_dreambooth_lora.py: a frozen denoiser quantized by bitsandbytes (nf4 on FLUX.1,
8-bit on SDXL) under a LoRA trained in fp32, on the CPU through the code users run (trainkit.big_models.quantize:
bitsandbytes quantizes each layer as it moves to the device, CPU or GPU alike); --offload; the one-line errors of
--bnb_quantization_config_path and --do_fp8_training.

Four launches in all (a FLUX.1 run with --offload and its resumed twin without it, an SDXL run and its resumed twin),
each read by several checks."""

import json
import os
import re
import shutil

import pytest
import torch
from helpers import assert_one_line_error, checkpoints, fail_in_process, launch, snapshot, train
from test_dreambooth_lora import INSTANCE_PROMPT, assert_same_lora, base_args, lora

SCRIPT = "train_dreambooth_lora.py"
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
INT8 = {"load_in_8bit": True}
FOOTPRINT = re.compile(r"Frozen (\w+) \(quantized\): ([\d.]+)M parameters in [\d.]+ MiB \(([\d.]+) bytes per "
                       r"parameter\)")


def _write_json(folder, name, value):
    path = os.path.join(str(folder), name)
    with open(path, "w") as file:
        file.write(value if isinstance(value, str) else json.dumps(value))
    return path


@pytest.fixture(scope="module")
def instance_folder(tmp_path_factory):
    from conftest import _shape_images

    folder = tmp_path_factory.mktemp("instance")
    for index, image in enumerate(_shape_images(3, 0)):
        image.save(folder / f"dog_{index}.png")
    return str(folder)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bnb_configs")
    return {"nf4": _write_json(folder, "nf4.json", NF4), "int8": _write_json(folder, "int8.json", INT8)}


def quantized_layers(model):
    """{name: bitsandbytes layer} of the frozen base layers (inside peft's LoRA wrappers too)."""
    import bitsandbytes as bnb

    return {name: module for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def quantized_weight_bytes_per_parameter(model, smallest=4096):
    """Bytes per parameter of the quantized weights of layers of at least `smallest` parameters, counting their
    quantization statistics: the tiny model's fp32 norms and biases, and the 64-byte nf4 code book of its 1024-weight
    layers, would hide what quantizing saves a real model (bench/bench.py measures whole denoisers)."""
    parameters = size = 0
    for layer in quantized_layers(model).values():
        count, nbytes = _footprint_of(layer)
        if count >= smallest:
            parameters, size = parameters + count, size + nbytes
    return size / parameters


def _footprint_of(layer):
    from trainkit.big_models import frozen_footprint

    weight_only = torch.nn.Module()
    weight_only.weight = layer.weight
    weight_only.quantization_method, weight_only.is_quantized = "bitsandbytes", True  # as big_models.quantize flags
    return frozen_footprint(weight_only)


def _flux_args(model, data, output_dir, config, **overrides):
    return base_args(model, data, output_dir, resolution=32, max_train_steps=2, checkpointing_steps=1,
                     bnb_quantization_config_path=config, **overrides)


# --------------------------------------------------------------------------------------------------------------------
# FLUX.1, nf4: train with --offload, validate, checkpoint; resume without --offload; load the LoRA both ways
# --------------------------------------------------------------------------------------------------------------------


def test_flux_nf4_lora_trains_resumes_and_loads_quantized_or_not(tiny_flux, instance_folder, configs, tmp_path):
    from diffusers import FluxPipeline

    from trainkit import big_models

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    result = launch(SCRIPT, _flux_args(tiny_flux, instance_folder, straight, configs["nf4"], offload=True,
                                       validation_prompt="a sks dog", num_validation_images=1))
    # The log reports the frozen transformer's footprint, quantized (biases and the tiny model's norms stay fp32).
    part, _, per_parameter = FOOTPRINT.search(result.stderr + result.stdout).groups()
    assert part == "transformer" and float(per_parameter) < 1.0
    # Validation during training and the final images ran on the quantized transformer.
    for folder in ("epoch_0000", "final"):
        assert os.listdir(os.path.join(straight, "validation", folder)), folder
    # Checkpoints and the output hold the LoRA alone, fp32 (the base is never saved).
    assert checkpoints(straight) == {"checkpoint-1", "checkpoint-2"}
    for folder in (straight, os.path.join(straight, "checkpoint-1")):
        weights = lora(folder)
        assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights), list(weights)[:5]
        assert {value.dtype for value in weights.values()} == {torch.float32}
        assert not [name for name in os.listdir(folder) if name.endswith((".bin", ".safetensors"))
                    and name not in ("pytorch_lora_weights.safetensors", "optimizer.bin", "scheduler.bin",
                                     "sampler.bin")]
    # Exact resume with a quantized base, and --offload changes nothing: checkpoint-1 of the offloaded run, resumed
    # without --offload, ends bit for bit where the uninterrupted run ended.
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("checkpoint-2", "validation", "logs"))
    os.remove(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    train(SCRIPT, _flux_args(tiny_flux, instance_folder, resumed, configs["nf4"], resume_from_checkpoint="latest"))
    assert_same_lora(straight, resumed)

    # The LoRA loads on the ordinary (unquantized) pipeline and on a quantized one, and both render.
    pipeline = FluxPipeline.from_pretrained(tiny_flux)
    pipeline.set_progress_bar_config(disable=True)
    before = _render(pipeline)
    pipeline.load_lora_weights(straight)
    plain = _render(pipeline)
    assert not torch.equal(before, plain)  # the LoRA changed the image
    pipeline = FluxPipeline.from_pretrained(tiny_flux)
    pipeline.set_progress_bar_config(disable=True)
    big_models.quantize(pipeline.transformer, NF4, torch.float32, torch.device("cpu"))
    quantized_base = _render(pipeline)
    pipeline.load_lora_weights(straight)
    assert {type(layer).__module__ for layer in pipeline.transformer.modules()
            if type(layer).__name__ == "Linear4bit"} >= {"peft.tuners.lora.bnb", "bitsandbytes.nn.modules"}
    quantized = _render(pipeline)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, quantized_base)


def _render(pipeline):
    image = pipeline(INSTANCE_PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    return torch.from_numpy(image)


# --------------------------------------------------------------------------------------------------------------------
# SDXL, 8-bit: exact resume; the LoRA loads on the unquantized pipeline
# --------------------------------------------------------------------------------------------------------------------


def test_sdxl_int8_lora_resumes_exactly_and_loads(tiny_sdxl, instance_folder, configs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    args = dict(max_train_steps=2, checkpointing_steps=1, bnb_quantization_config_path=configs["int8"])
    result = train(SCRIPT, base_args(tiny_sdxl, instance_folder, straight, **args, offload=True))
    assert FOOTPRINT.search(result.stderr + result.stdout).group(1) == "unet"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("checkpoint-2", "logs"))
    os.remove(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    train(SCRIPT, base_args(tiny_sdxl, instance_folder, resumed, **args, resume_from_checkpoint="latest"))
    assert_same_lora(straight, resumed)
    assert all(key.startswith("unet.") for key in lora(straight))

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(straight)
    image = pipeline(INSTANCE_PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert torch.isfinite(torch.from_numpy(image)).all()


# --------------------------------------------------------------------------------------------------------------------
# The quantized denoiser itself (in process): peft's bitsandbytes LoRA layers, gradients, bytes per parameter
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, lora_class, most_bytes", [(NF4, "Linear4bit", 0.6), (INT8, "Linear8bitLt", 1.1)])
def test_quantized_denoiser_trains_lora_only(tiny_flux, config, lora_class, most_bytes):
    import argparse

    import bitsandbytes as bnb

    from trainkit import families
    from trainkit.families import loading
    from trainkit.lora import add_lora_adapters

    args = argparse.Namespace(pretrained_model_name_or_path=tiny_flux, revision=None, variant=None, cache_dir=None,
                              mixed_precision="no", bnb_config=config, rank=4, lora_alpha=4, lora_dropout=0.0,
                              use_dora=False, lora_targets=None, lora_layers=None, train_text_encoder=False)
    args.family = families.detect(tiny_flux)
    transformer = loading.load_denoiser(args)  # onto accelerate's device: it creates accelerate's shared state
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # which the in-process error cases must find empty
    assert quantized_weight_bytes_per_parameter(transformer) <= most_bytes
    add_lora_adapters(args, transformer, [])
    wrappers = [module for module in transformer.modules() if type(module).__module__ == "peft.tuners.lora.bnb"]
    assert wrappers and all(type(module).__name__ == lora_class for module in wrappers)
    assert all(isinstance(module.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for module in wrappers)
    trained = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    for name, parameter in trained.items():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)  # so that lora_A gets a gradient too
    from diffusers import FluxPipeline

    latents = torch.randn(1, 4, 4, 4)
    packed = FluxPipeline._pack_latents(latents, 1, 4, 4, 4)
    output = transformer(hidden_states=packed, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                         pooled_projections=torch.randn(1, 32), encoder_hidden_states=torch.randn(1, 8, 32),
                         txt_ids=torch.zeros(8, 3), img_ids=FluxPipeline._prepare_latent_image_ids(1, 2, 2, "cpu",
                                                                                                 torch.float32),
                         return_dict=False)[0]
    output.square().mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in trained.values())
    assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)


# --------------------------------------------------------------------------------------------------------------------
# One-line errors, before any model loads, output_dir untouched
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, flags, expected", [
    ("{not json", [], ["--bnb_quantization_config_path", "not valid JSON"]),
    ('["load_in_4bit"]', [], ["--bnb_quantization_config_path", "a JSON object"]),
    ('{"load_in_4bit": true, "load_in_3bit": true}', [], ["'load_in_3bit' is not a BitsAndBytesConfig argument"]),
    ('{"bnb_4bit_quant_type": "nf4"}', [], ["exactly one of load_in_4bit and load_in_8bit", "neither"]),
    ('{"load_in_4bit": true, "load_in_8bit": true}', [], ["exactly one of load_in_4bit and load_in_8bit", "both"]),
    ('{"load_in_4bit": true, "bnb_4bit_quant_type": "int3"}', [], ["bnb_4bit_quant_type", '"nf4" or "fp4"']),
    ('{"load_in_4bit": true}', ["--do_fp8_training"], ["--do_fp8_training cannot be used with "
                                                         "--bnb_quantization_config_path"]),
    (None, ["--do_fp8_training"], ["--do_fp8_training needs", "CUDA GPU of compute capability 8.9"]),
])
def test_big_model_flags_fail_in_one_line(tiny_flux, instance_folder, tmp_path, capsys, monkeypatch, content, flags,
                                          expected):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # this run has no GPU, whatever the machine has
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("untouched")
    before = snapshot(output_dir)
    extra = {}
    if content is not None:
        extra["bnb_quantization_config_path"] = _write_json(tmp_path, "config.json", content)
    status, stderr = fail_in_process("train_dreambooth_lora",
                                     base_args(tiny_flux, instance_folder, str(output_dir), resolution=32, **extra)
                                     + flags, capsys)
    assert_one_line_error(status, stderr, expected)
    if content is None:
        import importlib.util

        assert ("pip install torchao" in stderr) == (importlib.util.find_spec("torchao") is None)
    assert snapshot(output_dir) == before
