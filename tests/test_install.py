"""The install contract (SPEC §10): the requirements files, the lock and the installed environment agree, and a
known-incompatible installed pair stops a run in one line."""

import os
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import REPO, assert_one_line_error, fail_in_process, sd_folder_layout, snapshot

LOCK = os.path.join(REPO, "requirements.lock")
# Installed by `python -m venv` itself, not by the requirements.
VENV_TOOLS = {"pip", "setuptools", "wheel"}


def requirements(path):
    """Every requirement in a requirements file, following `-r` includes."""
    found = []
    for line in open(path):
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            found += requirements(os.path.join(os.path.dirname(path), line[3:].strip()))
        else:
            found.append(Requirement(line))
    return found


def locked_versions(environment):
    """{package: version} of the lock's lines that apply to `environment` (a marker environment)."""
    pins = {}
    for line in open(LOCK):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pin = Requirement(line)
        if pin.marker is None or pin.marker.evaluate(environment):
            (specifier,) = pin.specifier  # one exact pin per line
            assert specifier.operator == "==", line
            assert canonicalize_name(pin.name) not in pins, f"two pins of {pin.name} for one environment"
            pins[canonicalize_name(pin.name)] = specifier.version
    return pins


def python_environment(version):
    environment = default_environment()
    environment.update(python_version=version, python_full_version=f"{version}.0")
    return environment


def test_lock_names_the_command_that_remakes_it():
    header = "".join(open(LOCK).readlines()[:3])
    assert "uv pip compile requirements-dev.txt" in header and "-o requirements.lock" in header


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_lock_satisfies_every_requirement(python):
    """Each requirement of requirements.txt and requirements-dev.txt has a pin inside its range, for every Python the
    lock was resolved for: the two cannot drift apart unnoticed."""
    environment = python_environment(python)
    pins = locked_versions(environment)
    for requirement in requirements(os.path.join(REPO, "requirements-dev.txt")):
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: remake the lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement}: remake the lock"


def test_requirements_exclude_the_broken_transformers_peft_pair():
    """transformers 5.24 needs a peft that is not released: requirements.txt alone must not resolve to it."""
    transformers = next(r for r in requirements(os.path.join(REPO, "requirements.txt")) if r.name == "transformers")
    assert not transformers.specifier.contains("5.24.0") and transformers.specifier.contains("5.23.0")


def test_environment_is_the_lock():
    """Every installed distribution is pinned in the lock at the installed version (a local build label such as
    +cpu aside), and every requirement is installed: what the tests ran on is what the lock says."""
    pins = locked_versions(default_environment())
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    off_lock = {
        name: (version, pins.get(name))
        for name, version in installed.items()
        if name not in VENV_TOOLS and (name not in pins or version.split("+")[0] != pins[name])
    }
    assert not off_lock, f"installed (version, locked): {off_lock}"
    for requirement in requirements(os.path.join(REPO, "requirements-dev.txt")):
        assert canonicalize_name(requirement.name) in installed, f"{requirement.name} is not installed"


def test_pip_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------------------
# A known-incompatible installed pair: one line before any model loads (versions simulated in-process)
# --------------------------------------------------------------------------------------------------------------------

def simulate_versions(monkeypatch, **versions):
    real_version = metadata.version

    def version(name):
        return versions.get(name, None) or real_version(name)

    monkeypatch.setattr(metadata, "version", version)


def test_incompatible_pair_stops_a_text_encoder_lora_run_in_one_line(monkeypatch, tmp_path, capsys):
    simulate_versions(monkeypatch, transformers="5.24.0", peft="0.21.2")
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    args = ["--pretrained_model_name_or_path", sd_folder_layout(tmp_path / "sd"), "--instance_data_dir", "/x/data", "--instance_prompt", "sks",
            "--output_dir", out, "--train_text_encoder"]
    status, stderr = fail_in_process("train_dreambooth_lora", args, capsys)
    assert_one_line_error(status, stderr, ["transformers 5.24.0", "peft 0.21.2", 'pip install "transformers<5.24"'])
    assert snapshot(str(out)) == before


def test_incompatible_pair_check_names_only_broken_features(monkeypatch):
    from trainkit import cli
    from trainkit.cli import InputError

    simulate_versions(monkeypatch, transformers="5.24.0", peft="0.21.2")
    with pytest.raises(InputError, match="transformers 5.24.0 with peft 0.21.2"):
        cli.check_compatible_versions("text-encoder LoRA")
    cli.check_compatible_versions("UNet LoRA")  # not broken by the pair
    for transformers, peft in (("5.23.0", "0.21.2"), ("5.24.0", "0.22.0"), ("5.25.0.dev0", "0.22.1")):
        simulate_versions(monkeypatch, transformers=transformers, peft=peft)
        cli.check_compatible_versions("text-encoder LoRA")
    simulate_versions(monkeypatch, transformers="5.25.0.dev0", peft="0.21.2")
    with pytest.raises(InputError):
        cli.check_compatible_versions("text-encoder LoRA")
