"""Rules every latent-space script must apply identically (checked in-process: they fail before any model loads)."""

import pytest
from PIL import Image

from helpers import assert_one_line_error, fail_in_process, sd_folder_layout, snapshot

# The least each script's parser needs. The rule is checked before the data paths; some scripts read the model
# folder first (its architecture sets their defaults), so MODEL is a folder laid out like an SD pipeline.
MODEL = "{model}"
REQUIRED = {
    "train_text_to_image": ["--pretrained_model_name_or_path", MODEL, "--train_data_dir", "/x/data"],
    "train_dreambooth_lora": ["--pretrained_model_name_or_path", MODEL, "--instance_data_dir", "/x/data",
                              "--instance_prompt", "a photo of sks dog"],
    "train_controlnet": ["--pretrained_model_name_or_path", MODEL, "--train_data_dir", "/x/data"],
    "train_instruct_pix2pix": ["--pretrained_model_name_or_path", MODEL, "--train_data_dir", "/x/data"],
    "textual_inversion": ["--pretrained_model_name_or_path", MODEL, "--train_data_dir", "/x/data",
                          "--placeholder_token", "<cat-toy>", "--initializer_token", "toy"],
}


@pytest.mark.parametrize("script", list(REQUIRED))
@pytest.mark.parametrize("resolution", [60, 100])
def test_resolution_must_be_a_multiple_of_8(script, resolution, tmp_path, capsys):
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    model = sd_folder_layout(tmp_path / "sd")
    args = [arg.format(model=model) for arg in REQUIRED[script]] + ["--resolution", resolution, "--output_dir", out]
    status, stderr = fail_in_process(script, args, capsys)
    assert_one_line_error(status, stderr, ["--resolution must be a multiple of 8", f"got {resolution}"])
    assert snapshot(str(out)) == before


# SPEC §9: the bucket flags are checked by the one shared rule in every latent script, before any model loads.
@pytest.mark.parametrize("script", list(REQUIRED))
@pytest.mark.parametrize("flags, expected", [
    (["--aspect_ratio_buckets", "64,100;64,64"], ["--aspect_ratio_buckets", "64,100", "multiple of 8"]),
    (["--use_aspect_ratio_buckets", "--bucket_min_resolution", "1024"], ["--bucket_min_resolution", "<= --resolution"]),
])
def test_bucket_flags_are_checked_alike_before_loading(script, flags, expected, tmp_path, capsys):
    model = sd_folder_layout(tmp_path / "sd")
    args = [arg.format(model=model) for arg in REQUIRED[script]] + ["--resolution", 512, *flags]
    status, stderr = fail_in_process(script, args + ["--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(status, stderr, expected)
    assert not (tmp_path / "out").exists()


# Caption dropout (--proportion_empty_prompts) in every captioned script, with the same range rule.
@pytest.mark.parametrize("script", [name for name in REQUIRED if name != "textual_inversion"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_proportion_empty_prompts_must_be_a_probability(script, value, tmp_path, capsys):
    model = sd_folder_layout(tmp_path / "sd")
    args = [arg.format(model=model) for arg in REQUIRED[script]] + ["--proportion_empty_prompts", value]
    status, stderr = fail_in_process(script, args + ["--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(status, stderr, ["--proportion_empty_prompts", str(value)])


# SPEC §12: a base model whose family has no row in a script's FAMILY_DEFAULTS is refused in one line, before any
# model loads, naming the model, its family and what the script trains.
@pytest.mark.parametrize("script", [name for name in REQUIRED if name != "train_dreambooth_lora"])
def test_a_family_the_script_does_not_train_is_one_line(script, tmp_path, capsys):
    from helpers import write_json

    flux = tmp_path / "flux"
    for part in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "transformer", "scheduler"):
        (flux / part).mkdir(parents=True)
    write_json(str(flux / "model_index.json"), {"_class_name": "FluxPipeline"})
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    args = [str(data) if arg == "/x/data" else arg.format(model=flux) for arg in REQUIRED[script]]
    status, stderr = fail_in_process(script, args + ["--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(status, stderr, [str(flux), "is a FLUX.1 model", f"{script}.py does not train",
                                           "Stable Diffusion, SDXL"])
    assert not (tmp_path / "out").exists()
