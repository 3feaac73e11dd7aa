"""train_unconditional.py, launched as users launch it."""

import os
import shutil
import signal
import sys

import pytest

from helpers import (
    assert_one_line_error,
    assert_different_weights,
    assert_same_weights,
    checkpoints,
    fail_in_process,
    launch,
    run,
    run_python,
    script_env,
    send_signal_and_wait,
    snapshot,
    start_python,
    train,
    wait_for_path,
)

SCRIPT = "train_unconditional.py"


def base_args(data, unet_config, output_dir, **overrides):
    """Tiny, fast settings: 16 px, batch 2, 2 denoising steps for samples."""
    args = {
        "train_data_dir": data,
        "model_config_name_or_path": unet_config,
        "resolution": 16,
        "output_dir": output_dir,
        "train_batch_size": 2,
        "eval_batch_size": 2,
        "num_epochs": 1,
        "ddpm_num_inference_steps": 2,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "seed": 0,
        "logging_steps": 1,
    }
    args.update(overrides)
    flags = []
    for key, value in args.items():
        if value is True:
            flags.append(f"--{key}")
        elif value is not None and value is not False:
            flags += [f"--{key}", str(value)]
    return flags


def test_trains_and_writes_a_loadable_pipeline(image_folder, tiny_unet_config, tmp_path):
    out = str(tmp_path / "out")
    result = launch(SCRIPT, base_args(image_folder, tiny_unet_config, out, use_ema=True, checkpointing_steps=2,
                                      random_flip=True))

    # The corrupt file is skipped by name, and training uses the 7 good images (4 batches of 2).
    assert "Skipping unreadable image" in result.stderr and "corrupt.png" in result.stderr
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/diffusion_pytorch_model.safetensors",
                 "README.md", "samples/epoch_0000.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert "DDPMPipeline" in open(os.path.join(out, "README.md")).read()

    from diffusers import DDPMPipeline, UNet2DModel

    pipeline = DDPMPipeline.from_pretrained(out)
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    # The checkpoint is usable by itself: raw weights in unet/, EMA in unet_ema/, and they differ.
    checkpoint = os.path.join(out, "checkpoint-4")
    UNet2DModel.from_pretrained(checkpoint, subfolder="unet")
    assert_different_weights(os.path.join(checkpoint, "unet"), os.path.join(checkpoint, "unet_ema"))
    # The final pipeline holds the EMA weights.
    assert_same_weights(os.path.join(checkpoint, "unet_ema"), os.path.join(out, "unet"))

    # TensorBoard received the loss curve and the sample images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs", "train_unconditional"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert events.Images("test_samples")


def test_resume_is_exact(image_folder, tiny_unet_config, tmp_path):
    """N steps straight == resume from a mid-epoch checkpoint + the rest, bit for bit, with EMA, random crops and
    flips and gradient accumulation."""
    # 7 images at batch 2 with accumulation 2: 2 steps an epoch, so checkpoint-3 is mid-epoch.
    half = 3
    settings = dict(use_ema=True, random_flip=True, gradient_accumulation_steps=2, max_train_steps=6,
                    checkpointing_steps=half, lr_scheduler="cosine")
    straight = str(tmp_path / "straight")
    train(SCRIPT, base_args(image_folder, tiny_unet_config, straight, **settings))
    assert f"checkpoint-{half}" in checkpoints(straight)

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, f"checkpoint-{half}"), os.path.join(resumed, f"checkpoint-{half}"))
    # The resumed run loads data in 2 worker processes: augmentation randomness must not depend on that.
    result = train(SCRIPT, base_args(image_folder, tiny_unet_config, resumed, resume_from_checkpoint="latest",
                                     dataloader_num_workers=2, **settings))
    assert f"Resuming from {os.path.join(resumed, f'checkpoint-{half}')}" in result.stderr

    final_checkpoint = f"checkpoint-{half * 2}"
    for folder in (f"{final_checkpoint}/unet", f"{final_checkpoint}/unet_ema", "unet"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))


def test_sigterm_saves_a_checkpoint_and_latest_resumes_exactly(image_folder, tiny_unet_config, tmp_path):
    settings = dict(train_batch_size=1, max_train_steps=70, checkpointing_steps=5, lr_scheduler="linear")
    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, base_args(image_folder, tiny_unet_config, interrupted, **settings))
    wait_for_path(os.path.join(interrupted, "checkpoint-5"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)

    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(interrupted))
    assert 5 <= stop_step < 70, "the signal arrived after the run had finished: the test needs more steps"
    assert not os.path.exists(os.path.join(interrupted, "model_index.json"))

    train(SCRIPT, base_args(image_folder, tiny_unet_config, interrupted, resume_from_checkpoint="latest", **settings))
    # `latest` with no checkpoint yet starts a new run and says so.
    straight = str(tmp_path / "straight")
    result = train(SCRIPT, base_args(image_folder, tiny_unet_config, straight, resume_from_checkpoint="latest",
                                     **settings))
    assert "no checkpoint" in result.stderr and "starting a new run" in result.stderr
    assert_same_weights(os.path.join(straight, "unet"), os.path.join(interrupted, "unet"))


def test_sigint_exits_130(image_folder, tiny_unet_config, tmp_path):
    out = str(tmp_path / "out")
    process = start_python(SCRIPT, base_args(image_folder, tiny_unet_config, out, train_batch_size=1,
                                             max_train_steps=200, checkpointing_steps=3))
    wait_for_path(os.path.join(out, "checkpoint-3"), process)
    status, _, stderr = send_signal_and_wait(process, signal.SIGINT)
    assert status == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert max(int(name.split("-")[1]) for name in checkpoints(out)) >= 3


KILL_AT_RENAME = """
import os, runpy, signal, sys
real_replace = os.replace
def replace(source, target, *args, **kwargs):
    if os.path.basename(source) == ".partial-checkpoint-4":
        os.kill(os.getpid(), signal.SIGKILL)  # the hardest moment: every file written, nothing renamed yet
    return real_replace(source, target, *args, **kwargs)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(image_folder, tiny_unet_config, tmp_path):
    out = str(tmp_path / "out")
    args = base_args(image_folder, tiny_unet_config, out, train_batch_size=1, checkpointing_steps=2,
                     max_train_steps=6)
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), SCRIPT)
    result = run([sys.executable, "-c", KILL_AT_RENAME, script] + args, check=False)
    assert result.returncode == -signal.SIGKILL
    assert checkpoints(out) == {"checkpoint-2", ".partial-checkpoint-4"}
    before = snapshot(os.path.join(out, "checkpoint-2"))

    resumed = train(SCRIPT, args + ["--resume_from_checkpoint", "latest"])
    assert f"Resuming from {os.path.join(out, 'checkpoint-2')}" in resumed.stderr
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert snapshot(os.path.join(out, "checkpoint-2")) == before

    # Resuming at --max_train_steps trains nothing, says so, and (re)writes the final outputs.
    shutil.rmtree(os.path.join(out, "unet"))
    again = train(SCRIPT, args + ["--resume_from_checkpoint", "latest"])
    assert "nothing to train" in again.stderr
    assert_same_weights(os.path.join(out, "checkpoint-6", "unet"), os.path.join(out, "unet"))


def test_two_processes(image_folder, tiny_unet_config, tmp_path):
    """CPU DDP over gloo: trains, checkpoints, and resumes exactly on 2 processes; exits cleanly."""
    settings = dict(max_train_steps=4, checkpointing_steps=2, use_ema=True, eval_batch_size=3)
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(image_folder, tiny_unet_config, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert checkpoints(straight) == {"checkpoint-2", "checkpoint-4"}
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {"random_states_0.pkl", "random_states_1.pkl"}
    assert os.path.isfile(os.path.join(straight, "samples", "epoch_0000.png"))

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    launch(SCRIPT, base_args(image_folder, tiny_unet_config, resumed, resume_from_checkpoint="checkpoint-2",
                             **settings), num_processes=2)
    assert_same_weights(os.path.join(straight, "checkpoint-4", "unet"), os.path.join(resumed, "checkpoint-4", "unet"))
    assert_same_weights(os.path.join(straight, "unet"), os.path.join(resumed, "unet"))


def test_local_parquet_dataset_with_config_file_override_and_wandb_offline(parquet_dataset, tiny_unet_config, tmp_path,
                                                                           yaml_file):
    out = str(tmp_path / "out")
    config = yaml_file({
        "dataset_name": parquet_dataset,
        "image_column": "pixels",
        "model_config_name_or_path": tiny_unet_config,
        "resolution": 16,
        "output_dir": out,
        "train_batch_size": 1,
        "num_epochs": 1,
        "ddpm_num_inference_steps": 2,
        "eval_batch_size": 1,
        "learning_rate": "1e-3",
        "checkpointing_steps": 1,
    })
    # The file says batch 1 (5 steps); the command line says 5 (1 step) and wins.
    env = script_env(WANDB_DIR=str(tmp_path), WANDB_MODE="offline")
    launch(SCRIPT, ["--config", config, "--train_batch_size", "5", "--logger", "wandb"], env=env)
    assert checkpoints(out) == {"checkpoint-1"}
    # wandb in offline mode wrote its run file.
    runs = [name for name in os.listdir(tmp_path / "wandb") if name.startswith("offline-run-")]
    assert runs and any(name.endswith(".wandb") for name in os.listdir(tmp_path / "wandb" / runs[0]))


def test_diffusers_docs_command_runs_unchanged(tmp_path):
    """The diffusers docs' command line, with a local dataset path: parses, loads the data, builds the default
    (upstream-size) UNet and trains; a SIGTERM after the first step keeps the test short."""
    import datasets

    from conftest import _shape_images

    data = tmp_path / "dataset"
    datasets.Dataset.from_dict({"image": _shape_images(2)}).save_to_disk(str(data))
    out = str(tmp_path / "ddpm-ema-flowers-64")
    process = start_python(SCRIPT, [
        f"--dataset_name={data}", "--resolution=64", f"--output_dir={out}", "--train_batch_size=32",
        "--num_epochs=50", "--gradient_accumulation_steps=1", "--learning_rate=1e-4", "--lr_warmup_steps=500",
        "--mixed_precision=no",
    ])
    wait_for_path(os.path.join(out, "logs"), process)
    status, _, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "50 epochs of 1 steps" in stderr
    assert checkpoints(out) == {"checkpoint-1"}


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, non-zero exit, no traceback, output_dir untouched (SPEC §7)
# --------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "missing model config": ({"model_config_name_or_path": "/nonexistent/unet.json"}, "--model_config_name_or_path"),
    "model config folder without config.json": ({"model_config_name_or_path": "{empty_dir}"}, "config.json"),
    "model config that is not JSON": ({"model_config_name_or_path": "{garbage_json}"}, "--model_config_name_or_path"),
    "dataset folder that is not a dataset": ({"train_data_dir": None, "dataset_name": "{empty_dir}"}, "--dataset_name"),
    "missing dataset": ({"train_data_dir": None, "dataset_name": "/nonexistent/dataset"}, "--dataset_name"),
    "missing train_data_dir": ({"train_data_dir": "/nonexistent/images"}, "--train_data_dir"),
    "no data at all": ({"train_data_dir": None}, "--train_data_dir"),
    "empty image folder": ({"train_data_dir": "{empty_dir}"}, "holds no images"),
    "resolution 0": ({"resolution": 0}, "--resolution"),
    "checkpointing_steps 0": ({"checkpointing_steps": 0}, "--checkpointing_steps"),
    "max_train_steps -1": ({"max_train_steps": -1}, "--max_train_steps"),
    "gradient_accumulation_steps 0": ({"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps"),
    "checkpoints_total_limit 0": ({"checkpoints_total_limit": 0}, "--checkpoints_total_limit"),
    "learning_rate 0": ({"learning_rate": 0}, "--learning_rate"),
    "missing checkpoint": ({"resume_from_checkpoint": "checkpoint-999"}, "--resume_from_checkpoint"),
    "resolution not an int": ({"resolution": "big"}, "--resolution"),
    "unknown lr scheduler": ({"lr_scheduler": "sometimes"}, "--lr_scheduler"),
    "missing config file": ({"config": "/nonexistent/config.yaml"}, "--config"),
    "config with unknown key": ({"config": "{bad_config}"}, "'learning_rat'"),
    "dataset without the image column": ({"train_data_dir": None, "dataset_name": "{parquet}"}, "--image_column"),
    "only corrupt images": ({"train_data_dir": "{corrupt_only}"}, "none of the 1 images"),
}


# Found only once the dataset or model config is read (after the Accelerator exists): these run as a process; the
# rest fail while the arguments are checked and run in-process through the script's entry point.
FOUND_AFTER_LOADING = {"model config that is not JSON", "dataset folder that is not a dataset",
                       "dataset without the image column", "only corrupt images"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_error(case, image_folder, tiny_unet_config, parquet_dataset, tmp_path, capsys):
    overrides, expected = BAD_INPUTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt_only").mkdir()
    (tmp_path / "corrupt_only" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    (tmp_path / "garbage.json").write_text("{not json")
    values = {"empty_dir": str(tmp_path / "empty"), "bad_config": str(tmp_path / "bad.yaml"),
              "parquet": parquet_dataset, "garbage_json": str(tmp_path / "garbage.json"),
              "corrupt_only": str(tmp_path / "corrupt_only")}
    overrides = {k: v.format(**values) if isinstance(v, str) else v for k, v in overrides.items()}

    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    args = base_args(image_folder, tiny_unet_config, str(out), **overrides)
    if case in FOUND_AFTER_LOADING:
        result = run_python(SCRIPT, args)
        status, stderr = result.returncode, result.stderr
    else:
        status, stderr = fail_in_process("train_unconditional", args, capsys)
    assert_one_line_error(status, stderr, [expected])
    assert snapshot(str(out)) == before
