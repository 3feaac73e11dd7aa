"""Rules every latent-space script must apply identically (checked in-process: they fail before any model loads)."""

import pytest

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
