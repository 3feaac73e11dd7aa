"""The launch configs in configs/launch/, DeepSpeed ZeRO-2 on 2 CPU processes, and the SLURM job's stop-and-requeue.

DeepSpeed runs without ACCELERATE_USE_CPU (which would turn the launch into plain CPU DDP): DeepSpeed itself falls
back to the CPU and a gloo-style communication op it compiles on first use (SPEC §9).
"""

import glob
import json
import os
import shutil
import signal
import stat
import subprocess

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from helpers import (
    BIN,
    REPO,
    assert_different_weights,
    assert_same_weights,
    checkpoints,
    free_port,
    launch_command,
    run,
    script_env,
    wait_for_path,
)
from test_controlnet import fill_parquet, validation_images  # noqa: F401 (module fixtures)
from test_dreambooth_lora import instance_folder  # noqa: F401 (module fixture)
from test_instruct_pix2pix import pairs_parquet, validation_image  # noqa: F401 (module fixtures)
from test_text_to_image import base_args, metadata_folder, tiny_sd  # noqa: F401 (module fixtures)

LAUNCH_CONFIGS = {
    "single_gpu.yaml": ("NO", None),
    "multi_gpu.yaml": ("MULTI_GPU", None),
    "multi_node.yaml": ("MULTI_GPU", None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
    "deepspeed_zero2_offload.yaml": ("DEEPSPEED", 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 3),
    "fsdp.yaml": ("FSDP", None),
}


def test_every_launch_config_parses_as_accelerate_reads_it_and_is_documented():
    """The dry run for the GPU-only and multi-node configs: accelerate's own loader accepts each file and reads the
    engine it names; README shows the command that uses each one."""
    from accelerate.commands.config.config_args import load_config_from_file

    found = sorted(os.path.basename(path) for path in glob.glob(os.path.join(REPO, "configs", "launch", "*.yaml")))
    assert found == sorted(LAUNCH_CONFIGS)
    readme = open(os.path.join(REPO, "README.md")).read()
    for name, (distributed_type, zero_stage) in LAUNCH_CONFIGS.items():
        config = load_config_from_file(os.path.join(REPO, "configs", "launch", name))
        assert config.distributed_type.value == distributed_type, name
        if zero_stage is not None:
            assert config.deepspeed_config["zero_stage"] == zero_stage, name
        assert f"configs/launch/{name}" in readme, f"README does not show how to use {name}"


def deepspeed_launch(script, args, config="deepspeed_zero2.yaml", num_processes=2):
    command = [
        os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(REPO, "configs", "launch", config),
        "--num_processes", str(num_processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
        os.path.join(REPO, script),
    ] + [str(arg) for arg in args]
    env = script_env()
    env.pop("ACCELERATE_USE_CPU")
    return run(command, env=env)


def assert_deepspeed_run_resumes_exactly(script, make_args, weights, checkpoint_weights, tmp_path, examples_line,
                                         config="deepspeed_zero2.yaml", same=assert_same_weights, lines=()):
    """Two ranks with ZeRO-2 and gradient accumulation: the optimizer state is sharded (one file per rank), the data
    is split between the ranks, and resuming the straight run's checkpoint-2 in another output folder ends like the
    4 steps straight, bit for bit (`same` compares two weight paths); the last checkpoint's `checkpoint_weights`
    equal the final trained `weights`; the straight run logged each of `lines`. Returns the straight run's output
    folder."""
    settings = {"gradient_accumulation_steps": 2, "checkpointing_steps": 2, "train_batch_size": 1}
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    result = deepspeed_launch(script, make_args(straight, max_train_steps=4, **settings), config=config)
    assert examples_line in result.stderr, [line for line in result.stderr.splitlines() if "examples, " in line]
    for line in lines:
        assert line in result.stderr, line
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    shards = sorted(os.listdir(os.path.join(straight, "checkpoint-2", "pytorch_model")))
    assert [name for name in shards if "optim_states" in name] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    second = deepspeed_launch(script, make_args(resumed, max_train_steps=4, resume_from_checkpoint="latest",
                                                **settings), config=config)
    assert f"Resuming from {os.path.join(resumed, 'checkpoint-2')}" in second.stderr
    same(os.path.join(straight, weights), os.path.join(resumed, weights))
    same(os.path.join(straight, "checkpoint-4", checkpoint_weights), os.path.join(straight, weights))
    return straight


def test_text_to_image_under_deepspeed_zero3_with_ema_and_validation_trains_checkpoints_and_resumes_exactly(
        tiny_sd, metadata_folder, tmp_path):
    """ZeRO-3 shards the UNet's weights too. Checkpoints, validation (one prompt: rank 0 renders it, rank 1 has none)
    and the final pipeline gather them into full copies; the frozen VAE and text encoder stay whole; the EMA copy
    lives outside DeepSpeed."""
    straight = assert_deepspeed_run_resumes_exactly(
        "train_text_to_image.py",
        lambda out, **flags: base_args(tiny_sd, metadata_folder, out, use_ema=True, validation_prompts=["a red circle"],
                                       **flags),
        "unet_raw", "unet", tmp_path,
        "7 examples, 2 epochs of 2 steps, 4 steps in all, batch 1 per device, total batch 4",
        config="deepspeed_zero3.yaml")
    assert_same_weights(os.path.join(straight, "checkpoint-4", "unet_ema"), os.path.join(straight, "unet"))
    assert sorted(os.listdir(os.path.join(straight, "validation"))) == ["epoch_0000", "final"]

    from diffusers import StableDiffusionPipeline

    image = StableDiffusionPipeline.from_pretrained(straight)(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_controlnet_sdxl_under_deepspeed_zero2_trains_checkpoints_and_resumes_exactly(tiny_sdxl, fill_parquet,
                                                                                      tmp_path):
    """On SDXL (the SD DeepSpeed path is the ZeRO-3 test below): the frozen UNet, VAE and both text encoders stay
    outside DeepSpeed; only the ControlNet is its engine's model. The output drives the SDXL ControlNet pipeline."""
    from test_controlnet import base_args as controlnet_args

    straight = assert_deepspeed_run_resumes_exactly(
        "train_controlnet.py", lambda out, **flags: controlnet_args(tiny_sdxl, out, parquet=fill_parquet, **flags),
        ".", "controlnet", tmp_path,
        "6 examples, 2 epochs of 2 steps, 4 steps in all, batch 1 per device, total batch 4")

    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl, controlnet=ControlNetModel.from_pretrained(straight))
    image = pipeline("a red circle", image=Image.new("RGB", (64, 64), "white"), num_inference_steps=2,
                     height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


def test_dreambooth_lora_under_deepspeed_zero2_offload_trains_checkpoints_and_resumes(tiny_sd, instance_folder,
                                                                                      tmp_path):
    """ZeRO-2 with the optimizer states in CPU memory: accelerate swaps AdamW for DeepSpeed's CPU Adam, over the LoRA
    parameters only. The LoRA file of the output and of each checkpoint loads into a pipeline.

    Resume is exact up to fp32 rounding here, not bit for bit: CPU Adam keeps beta**t as a running product and
    recomputes it with pow() when it meets a step it did not count itself, as after a resume."""
    from test_dreambooth_lora import base_args as dreambooth_args
    from test_dreambooth_lora import lora

    def close(folder_a, folder_b):
        a, b = lora(folder_a), lora(folder_b)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)

    straight = assert_deepspeed_run_resumes_exactly(
        "train_dreambooth_lora.py", lambda out, **flags: dreambooth_args(tiny_sd, instance_folder, out, **flags), ".",
        ".", tmp_path, "3 instance images, 3 examples", config="deepspeed_zero2_offload.yaml", same=close)
    # The tolerance is far below what two optimizer steps change.
    start, end = lora(os.path.join(straight, "checkpoint-2")), lora(straight)
    assert max((end[key] - start[key]).abs().max() for key in end) > 1e-4
    # DeepSpeed's model states hold the LoRA weights, not the frozen UNet (which every start loads from the base).
    states = torch.load(os.path.join(straight, "checkpoint-4", "pytorch_model", "mp_rank_00_model_states.pt"),
                        weights_only=False)
    assert states["module"] and all(".lora_" in name for name in states["module"])

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipeline.load_lora_weights(straight)
    image = pipeline("a photo of sks dog", num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


def zero3_sharding_every_weight(folder):
    """configs/launch/deepspeed_zero3.yaml's engine with every weight partitioned: by default DeepSpeed keeps weights
    under 100k elements (all of a tiny model's) whole on every rank, so nothing would be gathered. Returns the path of
    an accelerate launch config."""
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": "auto",
                 "gradient_clipping": "auto",
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    launch_config = yaml.safe_load(open(os.path.join(REPO, "configs", "launch", "deepspeed_zero3.yaml")))
    launch_config["deepspeed_config"] = {"deepspeed_config_file": str(folder / "ds.json"), "zero3_init_flag": True}
    del launch_config["mixed_precision"]  # the DeepSpeed file holds the precision (here: none, fp32)
    (folder / "ds.json").write_text(json.dumps(ds_config))
    (folder / "zero3.yaml").write_text(yaml.safe_dump(launch_config))
    return str(folder / "zero3.yaml")


def test_flux_lora_under_deepspeed_zero3_trains_validates_checkpoints_and_resumes_exactly(tiny_flux, instance_folder,
                                                                                         tmp_path):
    """FLUX.1 LoRA under ZeRO-3, where upstream's Flux script fails (its text encoders come out partitioned)."""
    assert_flux_lora_under_deepspeed(zero3_sharding_every_weight(tmp_path), tiny_flux, instance_folder, tmp_path)


def assert_flux_lora_under_deepspeed(config, tiny_flux, instance_folder, tmp_path):
    """Gradient accumulation 2 on 2 processes. ZeRO-3 shards the frozen transformer itself, half on each rank; the
    frozen text encoders and VAE stay whole. Validation renders 3 images (rank 1 renders a fourth in step and drops
    it) from the sharded model at epochs 0 and 2 and at the end. Each checkpoint and the output hold the whole LoRA,
    gathered from the ranks, and the engine's checkpoint files hold no frozen weight; resuming checkpoint-2 ends bit
    for bit like the straight run; the output loads into FluxPipeline and changes its image. With
    "deepspeed_zero2.yaml" the same checks pass (83 s; not in the suite for time: the ZeRO-2 offload test above runs
    that engine's LoRA path)."""
    from test_dreambooth_lora import assert_same_lora, lora
    from test_dreambooth_lora import base_args as dreambooth_args
    from test_dreambooth_lora_flux import _flux_pipeline, assert_trained_between, parts, render

    def flux_args(out, **flags):
        return dreambooth_args(tiny_flux, instance_folder, out, resolution=32, validation_prompt="a photo of sks dog",
                               num_validation_images=3, validation_epochs=2, validation_height=32,
                               validation_width=32, **flags)

    frozen = sum(value.numel() for value in load_file(
        os.path.join(tiny_flux, "transformer", "diffusion_pytorch_model.safetensors")).values())
    lines = [f"rank {rank} holds {frozen // 2} of the {frozen} frozen transformer weights" for rank in (0, 1)] \
        if "zero3" in config else []
    straight = assert_deepspeed_run_resumes_exactly(
        "train_dreambooth_lora.py", flux_args, ".", ".", tmp_path,
        "3 instance images, 3 examples, 4 epochs of 1 steps, 4 steps in all, batch 1 per device, total batch 4",
        config=config, same=assert_same_lora, lines=lines)
    assert_trained_between(os.path.join(straight, "checkpoint-2"), straight)
    for name in ("epoch_0000", "epoch_0002", "final"):
        assert sorted(os.listdir(os.path.join(straight, "validation", name))) == ["00.png", "01.png", "02.png"]
    for path in glob.glob(os.path.join(straight, "checkpoint-4", "pytorch_model", "*model_states.pt")):
        states = torch.load(path, weights_only=False)
        assert states.get("frozen_param_fragments") is None
        assert states["module"] and all(".lora_" in name for name in states["module"])

    pipeline = _flux_pipeline(tiny_flux)
    before = render(pipeline)
    pipeline.load_lora_weights(straight)
    assert parts(lora(straight)) == {"transformer"}
    after = render(pipeline)
    assert after.shape == (32, 32, 3) and np.isfinite(after).all() and not np.array_equal(before, after)


def test_textual_inversion_under_deepspeed_zero2_trains_checkpoints_and_resumes_exactly(tiny_sd, image_folder,
                                                                                        tmp_path):
    """The text encoder is DeepSpeed's model; only the new token's row changes and is saved."""
    from test_textual_inversion import assert_same_embeds
    from test_textual_inversion import base_args as inversion_args

    def same(folder_a, folder_b):
        assert_same_embeds(os.path.join(folder_a, "learned_embeds.safetensors"),
                           os.path.join(folder_b, "learned_embeds.safetensors"))

    assert_deepspeed_run_resumes_exactly(
        "textual_inversion.py", lambda out, **flags: inversion_args(tiny_sd, image_folder, out, **flags), ".", ".",
        tmp_path, "7 samples, 2 epochs of 2 steps", same=same)


def test_instruct_pix2pix_sdxl_under_deepspeed_zero2_with_ema_trains_checkpoints_and_resumes_exactly(
        tiny_sdxl, pairs_parquet, tmp_path):
    """On SDXL (the SD DeepSpeed path is the ZeRO-3 test below): the EMA copy lives outside DeepSpeed and is saved and
    restored by the script's own hooks; the output is an SDXL InstructPix2Pix pipeline that edits an image."""
    from test_instruct_pix2pix import base_args as pix2pix_args

    straight = assert_deepspeed_run_resumes_exactly(
        "train_instruct_pix2pix.py",
        lambda out, **flags: pix2pix_args(tiny_sdxl, out, parquet=pairs_parquet, use_ema=True, **flags), "unet_raw",
        "unet", tmp_path, "examples, 2 epochs of 2 steps, 4 steps in all, batch 1 per device, total batch 4")
    assert_same_weights(os.path.join(straight, "checkpoint-4", "unet_ema"), os.path.join(straight, "unet"))

    from diffusers import StableDiffusionXLInstructPix2PixPipeline
    from PIL import Image

    pipeline = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(straight)
    image = pipeline("make it green", image=Image.new("RGB", (64, 64), "red"), num_inference_steps=2, height=64,
                     width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


def assert_zero3_run_saves_whole_weights(script, args, out, weights, checkpoint_weights):
    """One ZeRO-3 launch on 2 processes, 4 steps with gradient accumulation 2 and checkpoints at 2 and 4: the model
    really is sharded (a model-states file per rank), each checkpoint holds the gathered weights, which training
    changed, and the last checkpoint's equal the final `weights`."""
    deepspeed_launch(script, args + ["--max_train_steps", "4", "--gradient_accumulation_steps", "2",
                                     "--checkpointing_steps", "2", "--train_batch_size", "1"],
                     config="deepspeed_zero3.yaml")
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    shards = os.listdir(os.path.join(out, "checkpoint-4", "pytorch_model"))
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(shards)
    assert_different_weights(os.path.join(out, "checkpoint-2", checkpoint_weights),
                             os.path.join(out, "checkpoint-4", checkpoint_weights))
    assert_same_weights(os.path.join(out, "checkpoint-4", checkpoint_weights), os.path.join(out, weights))


def test_controlnet_under_deepspeed_zero3_saves_and_validates_whole_weights(tiny_sd, fill_parquet,
                                                                            validation_images, tmp_path):
    """The trained ControlNet is sharded; the frozen UNet, VAE and text encoder load whole. Three validation images
    (2 on rank 0, 1 on rank 1) are rendered from a gathered copy."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image
    from test_controlnet import base_args as controlnet_args

    out = str(tmp_path / "out")
    assert_zero3_run_saves_whole_weights("train_controlnet.py", controlnet_args(
        tiny_sd, out, parquet=fill_parquet, validation_steps=4, validation_prompt=["red circle"],
        validation_image=validation_images[:1], num_validation_images=3), out, ".", "controlnet")
    assert os.path.isdir(os.path.join(out, "validation", "step_000004"))
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd, controlnet=ControlNetModel.from_pretrained(out), safety_checker=None, requires_safety_checker=False)
    image = pipeline("red circle", Image.new("RGB", (64, 64), "white"), num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_instruct_pix2pix_under_deepspeed_zero3_saves_and_validates_whole_weights(tiny_sd, pairs_parquet,
                                                                                  validation_image, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image
    from test_instruct_pix2pix import base_args as pix2pix_args

    out = str(tmp_path / "out")
    assert_zero3_run_saves_whole_weights("train_instruct_pix2pix.py", pix2pix_args(
        tiny_sd, out, parquet=pairs_parquet, val_image_url=validation_image, validation_prompt="make it green",
        num_validation_images=1), out, "unet", "unet")
    assert os.path.exists(os.path.join(out, "validation", "final", "00.png"))
    pipeline = StableDiffusionInstructPix2PixPipeline.from_pretrained(out)
    image = pipeline("make it green", image=Image.new("RGB", (64, 64), "red"), num_inference_steps=2,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_unconditional_under_deepspeed_zero3_saves_and_samples_whole_weights(image_folder, tiny_unet_config,
                                                                            tmp_path):
    """Sample grids (3 images: 2 on rank 0, 1 on rank 1) and the DDPMPipeline come from gathered weights."""
    from diffusers import DDPMPipeline
    from test_unconditional import base_args as unconditional_args

    out = str(tmp_path / "out")
    assert_zero3_run_saves_whole_weights("train_unconditional.py", unconditional_args(
        image_folder, tiny_unet_config, out, num_epochs=10, eval_batch_size=3), out, "unet", "unet")
    assert os.listdir(os.path.join(out, "samples"))
    images = DDPMPipeline.from_pretrained(out)(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def assert_refused_under_deepspeed(config, script, args, out, error):
    """The launch fails with exactly `error` as the one error line, no traceback from the training processes, and
    nothing written to `out`."""
    command = [
        os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(REPO, "configs", "launch", config),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        os.path.join(REPO, script),
    ] + args
    env = script_env()
    env.pop("ACCELERATE_USE_CPU")
    result = run(command, env=env, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [error]
    # No traceback from the training processes (the launcher still reports the failed processes its own way).
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert f'{script}", line' not in result.stderr
    assert not os.path.exists(out)


def test_zero3_is_refused_with_one_line_before_loading_models_where_unsupported(tiny_sd, image_folder, tmp_path):
    from test_textual_inversion import base_args as inversion_args

    out = str(tmp_path / "out")
    assert_refused_under_deepspeed(
        "deepspeed_zero3.yaml", "textual_inversion.py", inversion_args(tiny_sd, image_folder, out, max_train_steps=2),
        out, "error: DeepSpeed ZeRO-3 is not supported by this script (it trains a few weights inside a frozen model, "
             "which ZeRO-3 would shard with them); use configs/launch/deepspeed_zero2.yaml or "
             "configs/launch/deepspeed_zero2_offload.yaml (optimizer states in CPU memory)")


def test_dreambooth_training_the_text_encoder_is_refused_under_deepspeed(tiny_sd, instance_folder, tmp_path):
    from test_dreambooth_lora import base_args as dreambooth_args

    out = str(tmp_path / "out")
    assert_refused_under_deepspeed(
        "deepspeed_zero2.yaml", "train_dreambooth_lora.py",
        dreambooth_args(tiny_sd, instance_folder, out, max_train_steps=2, train_text_encoder=True), out,
        "error: --train_text_encoder trains two models, which accelerate cannot give to one DeepSpeed engine: drop the "
        "flag or launch without DeepSpeed")


# --------------------------------------------------------------------------------------------------------------------
# SLURM: the batch script run on one machine with stand-ins for srun, scancel and scontrol
# --------------------------------------------------------------------------------------------------------------------

STUBS = {
    # srun: run the step's command once per node (options dropped; --ntasks-per-node=1), each with its own
    # SLURM_NODEID, and remember their processes.
    "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
: > "$STUB_DIR/step.pid"
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node "$@" &
    echo $! >> "$STUB_DIR/step.pid"
done
status=0
for pid in $(cat "$STUB_DIR/step.pid"); do wait "$pid" || status=$?; done
exit $status
""",
    # scancel --signal=SIG JOB: signal every process of the job step, as Slurm does through the step's cgroup (the
    # training processes run in sessions of their own, so a process-group signal would miss them), never the batch
    # shell.
    "scancel": """#!/bin/bash
sig=${1#--signal=}
tree() { echo "$1"; for child in $(pgrep -P "$1"); do tree "$child"; done; }
kill -"$sig" $(for pid in $(cat "$STUB_DIR/step.pid"); do tree "$pid"; done)
""",
    "scontrol": """#!/bin/bash
if [ "$1" = requeue ]; then echo "$2" >> "$STUB_DIR/requeued"; fi
if [ "$1" = show ]; then echo 127.0.0.1; fi
""",
}


def test_slurm_job_checkpoints_before_the_time_limit_and_requeues(tiny_sd, metadata_folder, tmp_path):
    """A two-node job: Slurm's early-warning SIGUSR1 to the batch shell reaches the training processes on both nodes
    (not the launchers), which save one checkpoint and stop; the job requeues itself, and the requeued run continues
    from that checkpoint."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(stat.S_IRWXU)
    # Two simulated nodes on this machine (SPEC §9), one CPU process each, rendezvous over loopback; mixed precision
    # off on the CPU. The output folder is shared, as on a cluster's shared filesystem.
    launch_config = yaml.safe_load(open(os.path.join(REPO, "configs", "launch", "multi_node.yaml")))
    launch_config["mixed_precision"] = "no"
    launch_config_path = tmp_path / "multi_node_cpu.yaml"
    launch_config_path.write_text(yaml.safe_dump(launch_config))
    env = script_env(
        PATH=f"{stubs}:{BIN}:{os.environ['PATH']}", STUB_DIR=str(stubs), SLURM_JOB_ID="4242", SLURM_NNODES="2",
        SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=REPO, GPUS_PER_NODE="1",
        MASTER_PORT=str(free_port()), LAUNCH_CONFIG=str(launch_config_path),
    )
    out = str(tmp_path / "out")
    job = [os.path.join(REPO, "configs", "slurm_multinode.sbatch"), "train_text_to_image.py"] + base_args(
        tiny_sd, metadata_folder, out, max_train_steps=40, checkpointing_steps=2,
        train_batch_size=1)

    batch_shell = subprocess.Popen(["bash"] + job, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_path(os.path.join(out, "checkpoint-2"), batch_shell)
    batch_shell.send_signal(signal.SIGUSR1)
    output, _ = batch_shell.communicate(timeout=300)
    assert batch_shell.returncode == 0, output[-3000:]
    assert (stubs / "requeued").read_text().split() == ["4242"]
    assert "Received SIGUSR1" in output and "Continue with --resume_from_checkpoint latest" in output
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(out))
    assert 2 <= stop_step < 40
    # Both nodes' ranks saved their state into the one checkpoint.
    stop_checkpoint = os.path.join(out, f"checkpoint-{stop_step}")
    assert sorted(name for name in os.listdir(stop_checkpoint) if name.startswith("random_states")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert not os.path.exists(os.path.join(out, "model_index.json"))

    # The requeued job: the same command, which resumes from the newest checkpoint and finishes.
    env["MASTER_PORT"] = str(free_port())
    rerun = subprocess.run(["bash"] + job, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"Resuming from {os.path.join(out, f'checkpoint-{stop_step}')}" in rerun.stdout + rerun.stderr
    assert os.path.exists(os.path.join(out, "model_index.json"))
    assert (stubs / "requeued").read_text().split() == ["4242"]


def test_slurm_script_refuses_to_run_without_a_training_script():
    result = subprocess.run(["bash", os.path.join(REPO, "configs", "slurm_multinode.sbatch")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "usage: sbatch" in result.stderr


def test_sigterm_to_one_rank_stops_both_ranks_at_the_same_step_with_one_checkpoint(image_folder, tiny_unet_config,
                                                                                   tmp_path):
    """A preemption signal that reaches only rank 1 (as when a scheduler signals one node's processes first): the
    ranks agree on the stop step, write one complete checkpoint together and both exit with 143."""
    import psutil
    from test_unconditional import base_args as unconditional_args

    out = str(tmp_path / "out")
    command = launch_command("train_unconditional.py", unconditional_args(
        image_folder, tiny_unet_config, out, num_epochs=200, checkpointing_steps=3, use_ema=True), num_processes=2)
    launcher = subprocess.Popen(command, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_path(os.path.join(out, "checkpoint-3"), launcher)

    workers = [child for child in psutil.Process(launcher.pid).children(recursive=True)
               if "train_unconditional.py" in " ".join(child.cmdline())]
    ranks = {child.environ().get("RANK"): child for child in workers}
    assert set(ranks) == {"0", "1"}
    ranks["1"].send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=300)

    stopped = [line for line in stdout.splitlines() if line.startswith("Stopped at step")]
    assert len(stopped) == 1, stdout[-3000:]  # printed by the main process only
    stop_step = int(stopped[0].split()[3].rstrip(":"))
    assert f"checkpoint saved to {os.path.join(out, f'checkpoint-{stop_step}')}" in stopped[0]
    assert "exitcode  : 143" in stderr and "exitcode  : 1 " not in stderr
    assert max(int(name.split("-")[1]) for name in checkpoints(out)) == stop_step
    assert not [name for name in os.listdir(out) if name.startswith(".partial")]
    saved = os.listdir(os.path.join(out, f"checkpoint-{stop_step}"))
    assert {"random_states_0.pkl", "random_states_1.pkl", "unet", "unet_ema"} <= set(saved)
