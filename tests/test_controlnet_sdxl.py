"""train_controlnet.py on an SDXL base model (upstream's train_controlnet_sdxl.py command line): what differs from SD.

Launched runs are few (each costs ~15 s of imports): the upstream command line scaled down (its output loaded into
StableDiffusionXLControlNetPipeline), the same command stopped by SIGTERM and resumed, which must equal it bit for bit,
and one 2-process run on the feature cache. Time ids, cache equivalence and bad inputs are checked in-process."""

import glob
import os
import random
import shutil
import signal
from argparse import Namespace

import pytest
import torch
from PIL import Image

from helpers import (
    assert_one_line_error,
    assert_same_weights,
    checkpoints,
    fail_in_process,
    launch,
    load_weights,
    send_signal_and_wait,
    snapshot,
    start_python,
    train,
    wait_for_path,
)
from conftest import MIXED_ASPECT_BUCKETS
from test_controlnet import fill_example, write_paired_folder, write_parquet_dataset
from trainkit import families

SCRIPT = "train_controlnet.py"
PROMPTS = ["red circle with blue background", "cyan circle with brown floral background"]


@pytest.fixture(scope="module")
def fill_sdxl(tmp_path_factory):
    """A fill50k-like parquet dataset folder: 4 landscape examples (40x32), so that the real crop is not (0, 0);
    4 batches of 1 at accumulation 2 = 2 steps per epoch (a checkpoint at step 3 falls mid-epoch)."""
    folder = str(tmp_path_factory.mktemp("fill_sdxl"))
    write_parquet_dataset(folder, 4, seed=11, size=(40, 32))
    return folder


@pytest.fixture(scope="module")
def conditioning_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conditioning")
    paths = []
    for index in (1, 2):
        path = str(folder / f"conditioning_image_{index}.png")
        fill_example(random.Random(200 + index), 64)[1].save(path)
        paths.append(path)
    return paths


def upstream_command(model, output_dir, data, images, max_train_steps, checkpoints_total_limit, validation=True):
    """The upstream SDXL example's command line, scaled down (resolution 1024 -> 64, 15000 steps -> a few, validation
    every 100 -> 2 steps, accumulation 4 -> 2), with rotation on and the tiny model's fast validation settings."""
    command = [
        f"--pretrained_model_name_or_path={model}",
        f"--output_dir={output_dir}",
        f"--dataset_name={data}",
        "--resolution=64",
        "--learning_rate=1e-5",
        f"--max_train_steps={max_train_steps}",
        "--train_batch_size=1",
        "--gradient_accumulation_steps=2",
        "--report_to=wandb",
        "--seed=42",
        "--checkpointing_steps=1", f"--checkpoints_total_limit={checkpoints_total_limit}", "--logging_steps=1",
    ]
    if validation:
        command += ["--validation_image", *images, "--validation_prompt", *PROMPTS, "--validation_steps=2",
                    "--num_validation_images=1", "--validation_inference_steps=2"]
    return command


def test_upstream_command_output_loads_into_sdxl_pipeline_and_resumes_exactly(tiny_sdxl, fill_sdxl,
                                                                             conditioning_images, tmp_path):
    """The upstream SDXL command (wandb offline) trains 5 steps with validation on both pairs, rotates checkpoints,
    writes a ControlNet that StableDiffusionXLControlNetPipeline loads and generates with; stopped by SIGTERM and
    resumed (accumulation 2), it rotates on and ends bit for bit like the straight run."""
    out = str(tmp_path / "out")
    result = launch(SCRIPT, upstream_command(tiny_sdxl, out, fill_sdxl, conditioning_images, 5, 3),
                    cwd=str(tmp_path))
    assert "4 examples, 3 epochs of 2 steps" in result.stderr
    assert checkpoints(out) == {"checkpoint-3", "checkpoint-4", "checkpoint-5"}
    assert "Removing old checkpoint" in result.stderr
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "README.md", "images_0.png", "images_1.png",
                 "checkpoint-3/controlnet/config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    card = open(os.path.join(out, "README.md")).read()
    assert "StableDiffusionXLControlNetPipeline" in card and "stable-diffusion-xl" in card
    for name in ("step_000002", "final"):
        for pair in (0, 1):
            grid = Image.open(os.path.join(out, "validation", name, f"pair_{pair:02d}.png"))
            assert grid.size == (2 * 64, 64), (name, grid.size)
    # wandb (offline, in the working directory as upstream) received the validation images.
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "*.png"))

    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    controlnet = ControlNetModel.from_pretrained(out)
    assert controlnet.config.addition_embed_type == "text_time"
    weights = load_weights(out)
    zero_convs = [key for key in weights if key.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert any(weights[key].abs().sum() > 0 for key in zero_convs)
    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl, controlnet=controlnet,
                                                                   add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    conditioning = Image.open(conditioning_images[0]).convert("RGB")
    images = pipeline("red circle", image=conditioning, num_inference_steps=2, height=64, width=64,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    plain.set_progress_bar_config(disable=True)
    without = plain("red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert not (images == without).all()

    # The same command (without validation, keeping 1 checkpoint) stopped by SIGTERM once checkpoint-1 exists: it
    # checkpoints the step it is in and exits 143; resumed with `latest` it rotates on (each new checkpoint replaces
    # the last) and ends bit for bit like the straight run (which rendered validation images in between).
    resumed = str(tmp_path / "resumed")
    command = upstream_command(tiny_sdxl, resumed, fill_sdxl, conditioning_images, 5, 1, validation=False)
    process = start_python(SCRIPT, command, cwd=str(tmp_path))
    wait_for_path(os.path.join(resumed, "checkpoint-1"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Continue with --resume_from_checkpoint latest" in stdout
    (stopped,) = checkpoints(resumed)
    assert stopped != "checkpoint-5", "the signal arrived after the run had finished"
    result = train(SCRIPT, command + ["--resume_from_checkpoint=latest"], cwd=str(tmp_path))
    assert f"Resuming from {os.path.join(resumed, stopped)}" in result.stderr
    assert checkpoints(resumed) == {"checkpoint-5"}
    assert_same_weights(os.path.join(out, "checkpoint-5", "controlnet"),
                        os.path.join(resumed, "checkpoint-5", "controlnet"))
    assert_same_weights(out, resumed)


def test_two_processes_on_the_feature_cache(tiny_sdxl, fill_sdxl, conditioning_images, tmp_path):
    """CPU DDP over gloo on SDXL with both encoders' embeddings and the latents cached (split across the ranks),
    random flips and prompt dropout: trains, renders the final validation pairs split across the ranks (the dropped
    VAE and encoders loaded again), checkpoints every rank's RNG state, exits cleanly."""
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    result = launch(SCRIPT, [
        f"--pretrained_model_name_or_path={tiny_sdxl}", f"--output_dir={out}", f"--dataset_name={fill_sdxl}",
        "--resolution=64", "--train_batch_size=1", "--max_train_steps=2", "--checkpointing_steps=1", "--seed=0",
        "--random_flip", "--proportion_empty_prompts=0.5", "--cache_latents", "--cache_text_embeddings",
        f"--feature_cache_dir={cache}", "--validation_image", *conditioning_images, "--validation_prompt", *PROMPTS,
        "--num_validation_images=1", "--validation_inference_steps=2",
    ], num_processes=2)
    assert "terminate called" not in result.stderr
    assert "latents: 0 of 4 cached" in result.stderr
    assert checkpoints(out) == {"checkpoint-1", "checkpoint-2"}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(os.path.join(out, "checkpoint-2")))
    for pair in (0, 1):
        assert os.path.isfile(os.path.join(out, "validation", "final", f"pair_{pair:02d}.png"))
    from diffusers import ControlNetModel

    ControlNetModel.from_pretrained(out)


@pytest.fixture(scope="module")
def paired_folder(mixed_aspect_folder, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("paired_mixed_sdxl"))
    write_paired_folder(mixed_aspect_folder, folder)
    return folder


def test_buckets_on_the_feature_cache_resume_exactly_and_generate_non_square(tiny_sdxl, paired_folder,
                                                                             tmp_path):
    """SDXL with three aspect-ratio buckets and --cache_latents (random flips): 6 images in 3 batches of 2 -> 3
    steps per epoch; the cache holds each image at its bucket's size; resumed from the mid-epoch checkpoint-2 on
    the filled cache it ends bit for bit like the straight run; the ControlNet drives
    StableDiffusionXLControlNetPipeline at 64x96."""
    cache = str(tmp_path / "cache")
    command = [f"--pretrained_model_name_or_path={tiny_sdxl}", f"--train_data_dir={paired_folder}",
               "--resolution=64", f"--aspect_ratio_buckets={MIXED_ASPECT_BUCKETS}", "--train_batch_size=2",
               "--max_train_steps=4", "--checkpointing_steps=2", "--seed=1", "--random_flip", "--cache_latents",
               f"--feature_cache_dir={cache}", "--learning_rate=1e-4"]
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, command + [f"--output_dir={straight}"])
    assert "6 examples, 2 epochs of 3 steps" in result.stderr and "latents: 0 of 6 cached" in result.stderr
    from safetensors.torch import load_file

    entries = [load_file(path) for path in glob.glob(os.path.join(cache, "latents", "*", "*", "*.safetensors"))]
    assert sorted(tuple(entry["latent_dist"].shape[-2:]) for entry in entries) == \
        [(8, 8), (8, 8), (8, 12), (8, 12), (12, 8), (12, 8)]

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch(SCRIPT, command + [f"--output_dir={resumed}", "--resume_from_checkpoint=latest"])
    assert "latents: 6 of 6 cached" in result.stderr
    assert_same_weights(os.path.join(straight, "checkpoint-4", "controlnet"),
                        os.path.join(resumed, "checkpoint-4", "controlnet"))
    assert_same_weights(straight, resumed)

    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl, controlnet=ControlNetModel.from_pretrained(straight), add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    conditioning = Image.open(os.path.join(paired_folder, "conditioning", "land_0.png")).convert("RGB")
    images = pipeline("a wide shape", image=conditioning, num_inference_steps=2, height=64, width=96,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 96, 3)


# --------------------------------------------------------------------------------------------------------------------
# In-process: time ids, the ControlNet's added conditions, cache equivalence
# --------------------------------------------------------------------------------------------------------------------


class _OneProcess:
    device, process_index, num_processes, is_main_process = torch.device("cpu"), 0, 1, True

    def wait_for_everyone(self):
        pass


def _args(data, cache_dir, **overrides):
    args = dict(dataset_name=data, train_data_dir=None, dataset_config_name=None, cache_dir=None,
                image_column="image", conditioning_image_column="conditioning_image", caption_column="text",
                resolution=16, random_crop=False, random_flip=True, proportion_empty_prompts=0.4,
                image_interpolation_mode=None, max_train_samples=None, feature_cache_dir=cache_dir,
                train_batch_size=2, family=families.FAMILIES["sdxl"], crops_coords_top_left_h=None,
                crops_coords_top_left_w=None, noise_offset=0, snr_gamma=None, pretrained_vae_model_name_or_path=None)
    args.update(overrides)
    return Namespace(**args)


def test_time_ids_come_from_the_real_crop_unless_the_crop_flags_are_given(fill_sdxl, tmp_path):
    """40x32 images at 16 px: resized to 20x16, original size (32, 40); the crop top-left is the real one (random
    crops: several lefts, top 0; a flip mirrors the left), and --crops_coords_top_left_h/_w replace it when given."""
    import train_controlnet as script
    from trainkit.randomness import RunState
    from transformers import CLIPTokenizer

    from tiny_sd import write_tokenizer

    tokenizer = write_tokenizer(str(tmp_path / "tokenizer"))
    assert isinstance(tokenizer, CLIPTokenizer)
    args = _args(fill_sdxl, str(tmp_path / "cache"), random_crop=True)
    dataset = script.ControlNetExamples(script.load_controlnet_dataset(args), [tokenizer, tokenizer], args,
                                        RunState(0))
    items = [dataset[(epoch, index)] for epoch in range(4) for index in range(len(dataset))]
    assert all(item["original_size"].tolist() == [32, 40] for item in items)
    lefts = {item["crop_top_left"][1].item() for item in items}
    assert all(item["crop_top_left"][0].item() == 0 for item in items) and len(lefts) > 1 and lefts <= set(range(5))
    assert "input_ids_2" in items[0]
    # The real crop of the pixels: the conditioning image is cropped where the time ids say.
    assert script.size_and_crop(Image.new("RGB", (40, 32)), 16, (1.0, 0.0), False) == ((32, 40), (0, 4))
    assert script.size_and_crop(Image.new("RGB", (40, 32)), 16, (1.0, 0.0), True) == ((32, 40), (0, 0))

    batch = {"original_size": torch.tensor([[32, 40], [32, 40]]), "crop_top_left": torch.tensor([[0, 3], [0, 1]])}
    pooled = torch.zeros(2, 16)
    real = script.added_conditions(batch, pooled, args)
    assert real["time_ids"].tolist() == [[32, 40, 0, 3, 16, 16], [32, 40, 0, 1, 16, 16]]
    assert real["text_embeds"] is pooled
    given = script.added_conditions(batch, pooled, _args(fill_sdxl, None, crops_coords_top_left_h=0,
                                                         crops_coords_top_left_w=0))
    assert given["time_ids"].tolist() == [[32, 40, 0, 0, 16, 16]] * 2
    only_top = script.added_conditions(batch, pooled, _args(fill_sdxl, None, crops_coords_top_left_h=5))
    assert only_top["time_ids"].tolist() == [[32, 40, 5, 3, 16, 16], [32, 40, 5, 1, 16, 16]]
    assert script.added_conditions(batch, None, _args(fill_sdxl, None, family=families.FAMILIES["sd"])) is None


def test_bucketed_time_ids_carry_the_true_size_the_real_crop_and_the_bucket(paired_folder, tmp_path):
    """With buckets and random crops: each example's time-id inputs are its image's true (height, width), the crop
    actually taken from the resized image and its bucket; the crop flags still win where given."""
    import train_controlnet as script
    from trainkit.bucketing import Buckets
    from trainkit.randomness import RunState

    from tiny_sd import write_tokenizer

    tokenizer = write_tokenizer(str(tmp_path / "tokenizer"))
    args = _args(None, None, train_data_dir=paired_folder, resolution=64, random_crop=True, random_flip=False,
                 buckets=Buckets(explicit=[(64, 96), (96, 64), (64, 64)]), masked_loss=False)
    examples, plan = script.load_training_rows(args)
    dataset = script.ControlNetExamples(examples, [tokenizer, tokenizer], args, RunState(0), plan)
    crops = set()
    for epoch in range(3):
        for index in range(len(dataset)):
            item, image = dataset[(epoch, index)], examples[index]["image"]
            bucket = plan.target(index)
            assert item["original_size"].tolist() == [image.height, image.width]
            assert item["target_size"].tolist() == list(bucket)
            resized = script.crop_geometry(image.width, image.height, bucket, (0.5, 0.5))[0]
            top, left = item["crop_top_left"].tolist()
            assert 0 <= top <= resized[1] - bucket[0] and 0 <= left <= resized[0] - bucket[1]
            crops.add((image.width, top, left))
    assert len({crop for crop in crops if crop[0] == 112}) > 1  # land_1 (112x72) is cropped at random

    batch = torch.utils.data.default_collate([dataset[(0, index)] for index in range(len(dataset))
                                              if plan.target(index) == (96, 64)])
    rows = script.added_conditions(batch, torch.zeros(2, 16), args)["time_ids"].tolist()
    assert rows == [size + crop + [96, 64] for size, crop in zip(batch["original_size"].tolist(),
                                                                 batch["crop_top_left"].tolist())]
    given = script.added_conditions(batch, torch.zeros(2, 16), _args(None, None, crops_coords_top_left_h=0,
                                                                     crops_coords_top_left_w=0))
    assert [row[2:] for row in given["time_ids"].tolist()] == [[0, 0, 96, 64]] * 2


def test_cached_examples_and_loss_equal_fresh_ones(tiny_sdxl, fill_sdxl, tmp_path):
    """Every cached example holds what the (fp32) SDXL VAE and both text encoders make of the uncached example
    (hidden states of both, pooled embedding), the same time-id inputs (flipped crops too) and conditioning pixels;
    the loss of a cached batch equals the fresh one within fp32 rounding; the ControlNet receives the same added
    conditions (pooled text, time ids) as the UNet."""
    import train_controlnet as script
    from trainkit.randomness import RunState

    args = _args(fill_sdxl, str(tmp_path / "cache"), pretrained_model_name_or_path=tiny_sdxl, revision=None,
                 variant=None, tokenizer_name=None, prediction_type=None, controlnet_model_name_or_path=None)
    noise_scheduler, tokenizers, text_encoders, vae, unet = script.load_models(args)
    assert len(tokenizers) == len(text_encoders) == 2 and type(text_encoders[1]).__name__.endswith("Projection")
    assert args.family.vae_dtype(args, torch.float16) == torch.float32
    examples = script.load_controlnet_dataset(args)
    fresh = script.ControlNetExamples(examples, tokenizers, args, RunState(3))
    cached = script.ControlNetExamples(examples, tokenizers, args, RunState(3))
    script.cache_latents(_OneProcess(), cached, vae, args, torch.float32)
    script.cache_text_embeddings(_OneProcess(), cached, text_encoders, args, torch.float32)

    empty = 0
    with torch.no_grad():
        for epoch in range(3):
            for index in range(len(fresh)):
                expected, example = fresh[(epoch, index)], cached[(epoch, index)]
                assert torch.equal(example["conditioning_pixel_values"], expected["conditioning_pixel_values"])
                assert torch.equal(example["original_size"], expected["original_size"])
                assert torch.equal(example["crop_top_left"], expected["crop_top_left"])
                latent_dist = vae.encode(expected["pixel_values"][None]).latent_dist.parameters[0]
                torch.testing.assert_close(example["latent_dist"], latent_dist, rtol=1e-4, atol=5e-5)
                hidden, pooled = args.family.encode_prompt(text_encoders, [expected["input_ids"][None],
                                                                           expected["input_ids_2"][None]])
                torch.testing.assert_close(example["encoder_hidden_states"], hidden[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(example["pooled_prompt_embeds"], pooled[0], rtol=1e-5, atol=1e-5)
                empty += tokenizers[0].decode(expected["input_ids"], skip_special_tokens=True) == ""
    assert hidden.shape[-1] == 32 + 24 and 0 < empty < 12, empty

    controlnet = script.build_controlnet(args, unet)
    seen = {}

    def spy(module, positional, keywords):
        seen[type(module).__name__] = keywords["added_cond_kwargs"]

    hooks = [model.register_forward_pre_hook(spy, with_kwargs=True) for model in (controlnet, unet)]
    collate = torch.utils.data.default_collate
    losses = []
    for dataset in (fresh, cached):
        batch = collate([dataset[(1, index)] for index in range(len(dataset))])
        losses.append(script.training_loss(controlnet, unet, vae, text_encoders, noise_scheduler, batch,
                                           torch.Generator().manual_seed(0), args, torch.float32,
                                           vae.config.scaling_factor))
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    cond, unet_cond = seen["ControlNetModel"], seen["UNet2DConditionModel"]
    assert torch.equal(cond["time_ids"], unet_cond["time_ids"]) and cond["time_ids"].shape == (4, 6)
    assert torch.equal(cond["text_embeds"], unet_cond["text_embeds"])


# --------------------------------------------------------------------------------------------------------------------
# Bad input (SPEC §7), in-process: all found before an Accelerator exists
# --------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "SD ControlNet on SDXL": ({"controlnet_model_name_or_path": "{sd_controlnet}"}, [
        "--controlnet_model_name_or_path", "{sd_controlnet}", "{sdxl}", "cross_attention_dim", "addition_embed_type"]),
    "SDXL ControlNet on SD": ({"controlnet_model_name_or_path": "{sdxl_controlnet}", "model": "{sd}"}, [
        "--controlnet_model_name_or_path", "{sdxl_controlnet}", "{sd}", "addition_embed_type"]),
    "crop flag on SD": ({"crops_coords_top_left_h": 4, "model": "{sd}"},
                        ["--crops_coords_top_left_h", "SDXL", "{sd}"]),
    "negative crop": ({"crops_coords_top_left_w": -1}, ["--crops_coords_top_left_w", ">= 0"]),
    "missing VAE": ({"pretrained_vae_model_name_or_path": "/nonexistent/vae"},
                    ["--pretrained_vae_model_name_or_path", "/nonexistent/vae"]),
    "SDXL folder without text_encoder_2": ({"model": "{broken_sdxl}"},
                                           ["--pretrained_model_name_or_path", "text_encoder_2/"]),
    "NPU flash attention": ({"enable_npu_flash_attention": True}, ["--enable_npu_flash_attention", "torch_npu"]),
    "unknown interpolation": ({"image_interpolation_mode": "sinc"}, ["--image_interpolation_mode", "sinc"]),
    "validation prompt without image": ({"validation_prompt": ["a"]}, ["--validation_image"]),
    "resolution not a multiple of 8": ({"resolution": 60}, ["--resolution", "multiple of 8"]),
}


@pytest.fixture(scope="module")
def bad_input_models(tiny_sdxl, tmp_path_factory):
    """An SD pipeline, ControlNets initialised from the SD and the SDXL UNet, an SDXL folder missing text_encoder_2/."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from tiny_sd import build_tiny_sd

    folder = tmp_path_factory.mktemp("bad_input_models")
    sd = build_tiny_sd(str(folder / "sd"))
    paths = {"sd": sd, "sdxl": tiny_sdxl, "sd_controlnet": str(folder / "sd_controlnet"),
             "sdxl_controlnet": str(folder / "sdxl_controlnet"), "broken_sdxl": str(folder / "broken_sdxl")}
    for model, name in ((sd, "sd_controlnet"), (tiny_sdxl, "sdxl_controlnet")):
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        ControlNetModel.from_unet(unet).save_pretrained(paths[name])
    shutil.copytree(tiny_sdxl, paths["broken_sdxl"], ignore=shutil.ignore_patterns("text_encoder_2"))
    return paths


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_error(case, bad_input_models, fill_sdxl, conditioning_images, tmp_path, capsys):
    overrides, expected = BAD_INPUTS[case]

    def fill(value):
        return value.format(**bad_input_models) if isinstance(value, str) else value

    overrides = {key: fill(value) for key, value in overrides.items()}
    model = overrides.pop("model", bad_input_models["sdxl"])
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    args = [f"--pretrained_model_name_or_path={model}", f"--output_dir={out}", f"--dataset_name={fill_sdxl}",
            "--resolution=64"]
    for key, value in overrides.items():
        if value is True:
            args.append(f"--{key}")
        elif isinstance(value, list):
            args += [f"--{key}", *value]
        else:
            args.append(f"--{key}={value}")
    status, stderr = fail_in_process("train_controlnet", args, capsys)
    assert_one_line_error(status, stderr, [fill(text) for text in expected])
    assert snapshot(str(out)) == before
