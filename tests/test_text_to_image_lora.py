"""train_text_to_image.py in LoRA mode (--rank N): upstream's train_text_to_image_lora.py and
train_text_to_image_lora_sdxl.py test command lines with the script name changed and --rank 4 added, the output
loaded and rendered by the pipelines, exact resume (accumulation 2, 2 processes) with the real-dataset features, the
LoRA-mode defaults, and the flags refused in one line."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import assert_one_line_error, checkpoints, fail_in_process, launch, snapshot, train
from test_text_to_image import _images, base_args, metadata_folder, tiny_sd  # noqa: F401

SCRIPT = "train_text_to_image.py"
WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def captioned_dataset(tmp_path_factory):
    """A local dataset folder for --dataset_name (imagefolder with metadata.jsonl), standing in for upstream's
    hf-internal-testing/dummy_image_text_data: 4 images with an `image` and a `text` column."""
    folder = tmp_path_factory.mktemp("captioned_dataset")
    rows = []
    for index, image in enumerate(_images(4, seed=3)):
        image.save(folder / f"pic_{index}.png")
        rows.append({"file_name": f"pic_{index}.png", "text": f"a prompt number {index}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(folder)


def upstream_args(script_args):
    return script_args.split()


def lora_metadata(path):
    with safe_open(path, framework="pt") as file:
        return json.loads(file.metadata()["lora_adapter_metadata"])


def assert_same_file(a, b):
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{len(different)}/{len(first)} tensors differ: {a} vs {b}: {different[:3]}"


def render(pipeline, **kwargs):
    return pipeline("a prompt", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
                    **kwargs).images[0]


# --------------------------------------------------------------------------------------------------------------------
# Upstream's test command lines (examples/text_to_image/test_text_to_image_lora.py), --rank 4 added
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_sd_lora_command_lines_rotate_resume_and_load_into_the_pipeline(tiny_sd, captioned_dataset, tmp_path):
    """test_text_to_image_lora_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints: 4 steps
    (checkpoint-2, checkpoint-4), then resumed from checkpoint-4 to 8 with --checkpoints_total_limit 2 (checkpoint-6,
    checkpoint-8 left). Only the adapters are written (fp32, rank, alpha and upstream's targets in the metadata);
    the file loads into StableDiffusionPipeline and changes what it renders, and so does a checkpoint's copy by
    itself. (Exact resume: the 2-process test below.)"""
    out = str(tmp_path / "out")
    common = f"""
        --pretrained_model_name_or_path {tiny_sd}
        --dataset_name {captioned_dataset}
        --resolution 64
        --center_crop
        --random_flip
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --lr_warmup_steps 0
        --checkpointing_steps=2
        --seed=0
        --num_validation_images=0
        --rank 4
        """
    train(SCRIPT, upstream_args(f"{common} --max_train_steps 4 --output_dir {out}"))
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}
    train(SCRIPT, upstream_args(f"{common} --max_train_steps 8 --output_dir {out} "
                                "--resume_from_checkpoint=checkpoint-4 --checkpoints_total_limit=2"))
    assert checkpoints(out) == {"checkpoint-6", "checkpoint-8"}
    assert_same_file(os.path.join(out, "checkpoint-8", WEIGHTS), os.path.join(out, WEIGHTS))
    # Only the adapters are written: no pipeline, no UNet copy.
    assert not os.path.exists(os.path.join(out, "unet")) and not os.path.exists(os.path.join(out, "model_index.json"))

    state = load_file(os.path.join(out, WEIGHTS))
    assert state and all(key.startswith("unet.") and ".lora." in key for key in state)
    assert all(value.dtype == torch.float32 for value in state.values())
    metadata = lora_metadata(os.path.join(out, WEIGHTS))
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 4)
    assert set(metadata["unet.target_modules"]) == {"to_k", "to_q", "to_v", "to_out.0"}

    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    base = render(pipeline)
    pipeline.load_lora_weights(out)
    trained = render(pipeline)
    assert trained.shape == (64, 64, 3) and not torch.equal(torch.from_numpy(base), torch.from_numpy(trained))
    pipeline.unload_lora_weights()
    pipeline.load_lora_weights(os.path.join(out, "checkpoint-6"))
    assert render(pipeline).shape == (64, 64, 3)

    card = open(os.path.join(out, "README.md")).read()
    assert "LoRA adapters (rank 4)" in card and "load_lora_weights" in card and "- lora" in card


def test_upstream_sdxl_lora_text_encoder_command_line_trains_both_encoders_and_loads(tiny_sdxl, captioned_dataset,
                                                                                     tmp_path):
    """test_text_to_image_lora_sdxl_text_encoder_checkpointing_checkpoints_total_limit: 6 steps, a checkpoint every
    2, the newest 2 kept; LoRA on the UNet and both text encoders (unet.*, text_encoder.*, text_encoder_2.* keys, the
    CLIP layers in the text_model. layout), loaded by StableDiffusionXLPipeline (through DiffusionPipeline, as
    upstream's test) and rendering."""
    out = str(tmp_path / "out")
    launch(SCRIPT, upstream_args(f"""
        --pretrained_model_name_or_path {tiny_sdxl}
        --dataset_name {captioned_dataset}
        --resolution 64
        --train_batch_size 1
        --gradient_accumulation_steps 1
        --max_train_steps 6
        --learning_rate 5.0e-04
        --scale_lr
        --lr_scheduler constant
        --train_text_encoder
        --lr_warmup_steps 0
        --output_dir {out}
        --checkpointing_steps=2
        --checkpoints_total_limit=2
        --rank 4
        """))
    assert checkpoints(out) == {"checkpoint-4", "checkpoint-6"}
    state = load_file(os.path.join(out, WEIGHTS))
    assert all("lora" in key for key in state)
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert all(key.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for key in state)
    # Every adapter trained (B starts at zero), except those of text_encoder's last layer: SDXL conditions on its
    # penultimate hidden states, so that layer gets no gradient (DDP is told to expect it).
    untrained = {key for key, value in state.items() if ".up." in key and not value.abs().sum()}
    assert untrained and all(key.startswith("text_encoder.text_model.encoder.layers.1.") for key in untrained)

    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_sdxl)
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    base = render(pipeline, height=64, width=64)
    pipeline.load_lora_weights(out)
    trained = render(pipeline, height=64, width=64)
    assert trained.shape == (64, 64, 3) and not torch.equal(torch.from_numpy(base), torch.from_numpy(trained))
    # Both text encoders carry the trained adapters.
    for name in ("text_encoder", "text_encoder_2"):
        assert any("lora" in key for key in getattr(pipeline, name).state_dict()), name


# --------------------------------------------------------------------------------------------------------------------
# Exact resume with accumulation 2 on 2 processes, with the real-dataset features and the LoRA flags
# --------------------------------------------------------------------------------------------------------------------


def test_two_processes_accumulation_buckets_masks_cache_and_text_encoder_resume_exactly(tiny_sd, mixed_aspect_folder,
                                                                                         tmp_path):
    """2 processes, accumulation 2, --aspect_ratio_buckets with --masked_loss, caption dropout, random flips over
    cached latents, text-encoder LoRA with DoRA, alpha 8, dropout 0.1 and two --lora_layers: 6 one-image batches per
    epoch, 3 per rank, 2 steps. 3 steps straight == checkpoint-1 (mid-epoch) resumed to 3, bit for bit. Validation
    images (every --validation_epochs) and at the end, the kohya copy (with the true alpha), a model card naming the
    setup, and the file loads into the pipeline."""
    from conftest import MIXED_ASPECT_BUCKETS

    settings = {"rank": 4, "lora_alpha": 8, "lora_dropout": 0.1, "use_dora": True, "lora_layers": "to_q,to_v",
                "train_text_encoder": True, "aspect_ratio_buckets": MIXED_ASPECT_BUCKETS, "masked_loss": True,
                "proportion_empty_prompts": 0.3, "center_crop": True, "random_flip": True, "cache_latents": True,
                "feature_cache_dir": str(tmp_path / "cache"), "train_batch_size": 1,
                "gradient_accumulation_steps": 2, "max_train_steps": 3, "checkpointing_steps": 1,
                "validation_prompt": "a wide shape", "num_validation_images": 2, "validation_epochs": 2,
                "output_kohya_format": True,
                "learning_rate": 1e-3}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, straight, **settings), num_processes=2)
    assert "6 examples, 2 epochs of 2 steps, 3 steps in all" in result.stderr
    assert checkpoints(straight) == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    # Validation every 2nd epoch (epoch 0) and at the end, the 2 images split across the ranks.
    assert sorted(os.listdir(os.path.join(straight, "validation"))) == ["epoch_0000", "final"]
    for name in ("epoch_0000", "final"):
        assert sorted(os.listdir(os.path.join(straight, "validation", name))) == ["00.png", "01.png"], name

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    launch(SCRIPT, base_args(tiny_sd, mixed_aspect_folder, resumed, resume_from_checkpoint="latest", **settings),
           num_processes=2)
    for name in (os.path.join("checkpoint-3", WEIGHTS), WEIGHTS, "pytorch_lora_weights_kohya.safetensors"):
        assert_same_file(os.path.join(straight, name), os.path.join(resumed, name))

    metadata = lora_metadata(os.path.join(straight, WEIGHTS))
    assert (metadata["unet.r"], metadata["unet.lora_alpha"], metadata["unet.use_dora"]) == (4, 8, True)
    assert set(metadata["unet.target_modules"]) == {"to_q", "to_v"}
    assert metadata["text_encoder.lora_alpha"] == 8
    kohya = load_file(os.path.join(straight, "pytorch_lora_weights_kohya.safetensors"))
    alphas = {key: value for key, value in kohya.items() if key.endswith(".alpha")}
    assert any(key.startswith("lora_te_") for key in alphas) and any(key.startswith("lora_unet_") for key in alphas)
    assert all(value.item() == 8 for value in alphas.values())
    card = open(os.path.join(straight, "README.md")).read()
    assert "| LoRA rank, alpha, dropout, DoRA, layers | 4, 8, 0.1, True, to_q,to_v |" in card
    assert "| text encoder LoRA | True |" in card and "- dora" in card and "| aspect-ratio buckets |" in card

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipeline.load_lora_weights(straight)
    image = render(pipeline, height=64, width=96)
    assert image.shape == (64, 96, 3) and torch.isfinite(torch.from_numpy(image)).all()


# --------------------------------------------------------------------------------------------------------------------
# In-process: LoRA mode's defaults and the flags refused in one line
# --------------------------------------------------------------------------------------------------------------------


def test_debug_loss_batches_carry_each_images_file_name(tiny_sd, captioned_dataset):
    """--debug_loss (upstream SDXL LoRA's): each example of an image read from a file carries the file's name, which
    the loop logs the loss under (loss_for_<name>); without the flag, no name."""
    import argparse

    import train_text_to_image
    from transformers import CLIPTokenizer

    from test_text_to_image import _namespace
    from trainkit.randomness import RunState

    args = _namespace(dataset_name=captioned_dataset, debug_loss=True)
    dataset = train_text_to_image.load_captioned_dataset(args)
    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")]
    examples = train_text_to_image.CaptionedImages(dataset, tokenizers, args, RunState(seed=0))
    assert sorted(examples[(0, index)]["filename"] for index in range(4)) == [f"pic_{i}.png" for i in range(4)]
    quiet = train_text_to_image.CaptionedImages(dataset, tokenizers, argparse.Namespace(**{**vars(args),
                                                                                           "debug_loss": False}),
                                                RunState(seed=0))
    assert "filename" not in quiet[(0, 0)]


def _parse(model, *extra):
    import train_text_to_image

    return train_text_to_image.parse_args(["--pretrained_model_name_or_path", model, "--train_data_dir", "/x",
                                           *extra])


def test_lora_mode_takes_upstream_lora_scripts_defaults(tiny_sd, tiny_sdxl):
    """With --rank the flags left out take train_text_to_image_lora.py's / train_text_to_image_lora_sdxl.py's
    defaults; without it, full fine-tuning's stay."""
    defaults = ("output_dir", "validation_epochs", "tracker_project_name", "resolution", "learning_rate",
                "num_validation_images", "train_batch_size", "lr_warmup_steps")
    sd = _parse(tiny_sd, "--rank", "4")
    assert [getattr(sd, name) for name in defaults] == [
        "sd-model-finetuned-lora", 1, "text2image-fine-tune", 512, 1e-4, 4, 16, 500]
    assert (sd.lora_alpha, sd.lora_dropout, sd.train_text_encoder, sd.use_dora) == (4, 0.0, False, False)
    sdxl = _parse(tiny_sdxl, "--rank", "8")
    assert [getattr(sdxl, name) for name in defaults] == [
        "sd-model-finetuned-lora", 1, "text2image-fine-tune", 1024, 1e-4, 4, 16, 500]
    assert sdxl.lora_alpha == 8
    full = _parse(tiny_sdxl)
    assert (full.rank, full.output_dir, full.tracker_project_name) == (None, "sdxl-model-finetuned",
                                                                      "text2image-fine-tune-sdxl")
    assert _parse(tiny_sd, "--rank", "4", "--output_dir", "mine", "--validation_epochs", "3").output_dir == "mine"


BAD_ARGUMENTS = {
    "EMA in LoRA mode": (["--rank", "4", "--use_ema"], ["--use_ema applies to full fine-tuning only", "--rank 4"]),
    "offload_ema in LoRA mode": (["--rank", "4", "--offload_ema"], ["--offload_ema applies to full fine-tuning"]),
    "non_ema_revision in LoRA mode": (["--rank", "4", "--non_ema_revision", "main"],
                                      ["--non_ema_revision applies to full fine-tuning only"]),
    "lora_alpha without rank": (["--lora_alpha", "8"], ["--lora_alpha applies to LoRA mode only", "add --rank"]),
    "train_text_encoder without rank": (["--train_text_encoder"], ["--train_text_encoder applies to LoRA mode only"]),
    "output_kohya_format without rank": (["--output_kohya_format"], ["--output_kohya_format applies to LoRA mode"]),
    "rank 0": (["--rank", "0"], ["--rank must be > 0, got 0"]),
    "lora_alpha 0": (["--rank", "4", "--lora_alpha", "0"], ["--lora_alpha must be > 0"]),
    "lora_dropout 1": (["--rank", "4", "--lora_dropout", "1"], ["--lora_dropout must be in [0, 1)"]),
    "lora_layers naming no UNet layer": (["--rank", "4", "--lora_layers", "to_k,no_such_layer"],
                                         ["--lora_layers: 'no_such_layer' names no Linear or Conv2d layer", "UNet"]),
    "text encoder LoRA with cached text embeddings": (
        ["--rank", "4", "--train_text_encoder", "--cache_text_embeddings"],
        ["--cache_text_embeddings cannot be used with --train_text_encoder"]),
    "resume a full fine-tune checkpoint in LoRA mode": (["--rank", "4", "--resume_from_checkpoint", "latest"],
                                                        ["checkpoint-2", "holds no pytorch_lora_weights.safetensors"]),
    "resume a LoRA checkpoint without --rank": (["--resume_from_checkpoint", "checkpoint-3"],
                                                ["checkpoint-3", "holds no unet/", "add the --rank"]),
    "resume a text-encoder LoRA checkpoint without it": (["--rank", "4", "--resume_from_checkpoint", "checkpoint-3"],
                                                        ["trained the text encoder", "add --train_text_encoder"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_gets_one_line_error_before_loading(case, tiny_sd, metadata_folder, tmp_path, capsys):  # noqa: F811
    """SPEC §7: one line naming the flag, exit 2, no traceback, before any model loads, output_dir untouched (it
    holds a full fine-tune checkpoint-2 and a text-encoder LoRA checkpoint-3)."""
    extra, expected = BAD_ARGUMENTS[case]
    out = tmp_path / "existing_output"
    (out / "checkpoint-2" / "unet").mkdir(parents=True)
    (out / "checkpoint-3").mkdir()
    from safetensors.torch import save_file

    save_file({"text_encoder.text_model.layer.lora_A.weight": torch.zeros(1)}, str(out / "checkpoint-3" / WEIGHTS))
    if "latest" in extra:
        shutil.rmtree(out / "checkpoint-3")
    before = snapshot(str(out))
    args = base_args(tiny_sd, metadata_folder, str(out)) + extra
    status, stderr = fail_in_process("train_text_to_image", args, capsys)
    assert status == 2
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before
