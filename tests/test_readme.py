"""README's commands are the ones CI and users run."""

import os
import re

from helpers import REPO


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    return re.findall(r"```bash\n(python3 -m venv .venv &&[^\n]+)\n```", text)


def test_ci_runs_the_readme_test_command_verbatim():
    commands = readme_commands()
    assert len(commands) == 2, "README must show the main-job command and the test command"
    ci_script = open(os.path.join(REPO, ".ci", "run")).read()
    assert commands[1] in ci_script.splitlines()


def test_main_job_command_uses_files_that_exist():
    main_job = readme_commands()[0]
    for path in re.findall(r"(\S+\.(?:py|yaml|txt|lock))", main_job):
        assert os.path.isfile(os.path.join(REPO, path)), path


def test_demo_config_trains_with_the_script(tmp_path):
    """The main job's config, shortened: its keys are valid flags and the run writes a grid and a pipeline."""
    from helpers import launch

    from make_shapes import make_shapes

    data = make_shapes(str(tmp_path / "shapes"), count=40)
    out = tmp_path / "demo"
    launch("train_unconditional.py", [
        "--config", os.path.join(REPO, "configs", "shapes_demo.yaml"), "--train_data_dir", data,
        "--model_config_name_or_path", os.path.join(REPO, "configs", "unet_shapes_32px.json"),
        "--output_dir", out, "--max_train_steps", "3", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "4",
    ])
    assert (out / "samples" / "epoch_0000.png").is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
