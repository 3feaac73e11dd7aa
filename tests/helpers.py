"""Launch the training scripts the way users do, and compare what they write."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
LAUNCH_TIMEOUT = 600


def script_path(name):
    return os.path.join(REPO, name)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(script, args, num_processes=1, accelerate_config=None):
    """`accelerate launch [...] script args` as a user types it (2 processes: CPU DDP over gloo, SPEC §9)."""
    command = [os.path.join(BIN, "accelerate"), "launch"]
    if accelerate_config is not None:
        command += ["--config_file", accelerate_config]
    if num_processes > 1:
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        command += ["--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command + [script_path(script)] + [str(arg) for arg in args]


def script_env(**extra):
    env = dict(os.environ)
    env.update({"ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run(command, cwd=None, env=None, check=True, timeout=LAUNCH_TIMEOUT):
    result = subprocess.run(command, cwd=cwd, env=env or script_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)}\nexited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
            f"stderr:\n{result.stderr[-6000:]}"
        )
    return result


def launch(script, args, num_processes=1, check=True, env=None, cwd=None):
    return run(launch_command(script, args, num_processes), cwd=cwd, env=env, check=check)


def train(script, args, check=True, env=None, cwd=None):
    """`python script args`, the other way users start a single-process run: `launch` without the accelerate CLI in
    front, which costs ~5 s of CPU per run (it imports torch and transformers). For the repeated runs inside a test;
    each module's first runs, the 2-process and DeepSpeed runs go through `accelerate launch`."""
    return run_python(script, args, check=check, env=env, cwd=cwd)


def run_python(script, args, check=False, env=None, cwd=None):
    """`python script args`: the plain way, used where the script's own exit status matters."""
    return run([sys.executable, script_path(script)] + [str(a) for a in args], cwd=cwd, env=env, check=check)


def fail_in_process(module, args, capsys):
    """`module.main(args)` through the scripts' own entry point (`cli.run_main`), inside the test process:
    for the input errors a script finds before it creates an Accelerator (asserted), so before any model or dataset
    loads. Returns (exit status, stderr); a launched run would cost ~15 s of imports per case."""
    import importlib

    import pytest
    from accelerate.state import PartialState
    from trainkit.cli import run_main

    script = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: script.main([str(arg) for arg in args]))
    assert not PartialState._shared_state, f"{module} created an Accelerator before failing: launch this case instead"
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(status, stderr, expected):
    """SPEC §7: non-zero exit, no traceback, and the last line is the only error line, holding every `expected`."""
    assert status != 0
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines()
                   if "error" in line.lower() and all(text in line for text in expected)]
    assert len(error_lines) == 1, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == error_lines[0]


def start_python(script, args, env=None, cwd=None):
    return subprocess.Popen(
        [sys.executable, script_path(script)] + [str(a) for a in args],
        cwd=cwd, env=env or script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_path(path, process, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process exited {process.returncode} before {path} appeared\n{err[-4000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.01)


def send_signal_and_wait(process, signum=signal.SIGTERM, timeout=300):
    process.send_signal(signum)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def load_weights(folder):
    """The safetensors weights of a diffusers model folder (unet/, unet_ema/, ...)."""
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def assert_same_weights(folder_a, folder_b):
    a, b = load_weights(folder_a), load_weights(folder_b)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)}/{len(a)} tensors differ: {folder_a} vs {folder_b}: {different[:3]}"


def assert_different_weights(folder_a, folder_b):
    a, b = load_weights(folder_a), load_weights(folder_b)
    assert any(not torch.equal(a[key], b[key]) for key in a), f"{folder_a} and {folder_b} hold identical weights"


def pipeline_from(pipeline_class_name, model):
    """The diffusers pipeline `pipeline_class_name` loaded from the folder `model`, its progress bars off."""
    import diffusers

    pipeline = getattr(diffusers, pipeline_class_name).from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def lora_rank_and_alpha(pipeline_class_name, folder):
    """(rank, alpha) of the transformer LoRA in `folder`, from the file's metadata as the pipeline users load it with
    reads it."""
    import diffusers

    _, metadata = getattr(diffusers, pipeline_class_name).lora_state_dict(folder, return_lora_metadata=True)
    return metadata["transformer.r"], metadata["transformer.lora_alpha"]


def lora_parts(weights):
    """The models a LoRA file adapts: its keys' first parts (transformer, text_encoder, ...)."""
    return {key.split(".")[0] for key in weights}


def checkpoints(output_dir):
    return {name for name in os.listdir(output_dir) if "checkpoint" in name}


def snapshot(folder):
    """Every file under `folder` with its size, mtime and bytes: to prove a failed run left it untouched."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.stat(path)
            content = open(path, "rb").read() if os.path.isfile(path) else None
            state[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns, content)
    return state


def sd_folder_layout(folder):
    """An empty folder laid out like an SD pipeline (model_index.json and the part folders, no weights): enough for
    the checks a script makes before it loads any model."""
    for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        os.makedirs(os.path.join(folder, part), exist_ok=True)
    write_json(os.path.join(folder, "model_index.json"), {"_class_name": "StableDiffusionPipeline"})
    return str(folder)


def write_json(path, value):
    with open(path, "w") as file:
        json.dump(value, file)
    return path
