"""textual_inversion.py on a tiny local SDXL model: upstream textual_inversion_sdxl.py's command line, both encoders.

Launched runs (each costs ~15 s of imports; folded so that the file stays near 100 s):
- `main_run`: the upstream SDXL command line scaled down (64 px, 8 steps, accumulation 2) with checkpoints,
  --save_steps, validation and --save_as_full_pipeline; its outputs are loaded, checked and resumed from;
- a resume of its mid-epoch checkpoint-6 (exact, rotation before and after the resume);
- a resume of its checkpoint-4 on --cache_latents (cached == fresh within fp32 rounding);
- a 2-process run with accumulation 1, and a 2-process resume of it (exact);
- a run with generated aspect-ratio buckets on mixed-aspect images, whose outputs generate at a bucket's shape;
- a SIGTERM-stopped run, its resume and the same run straight (exact).
"""

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MIXED_ASPECT_IMAGES
from helpers import (
    assert_one_line_error,
    checkpoints,
    fail_in_process,
    launch,
    send_signal_and_wait,
    snapshot,
    start_python,
    train,
    wait_for_path,
)

SCRIPT = "textual_inversion.py"
TOKEN = "<cat-toy>"
EMBEDS = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
ENCODERS = ("text_encoder", "text_encoder_2")
DIMS = (32, 24)  # the hidden sizes of tiny_sd.build_tiny_sdxl's two encoders


def upstream_args(model, data, output_dir, **extra):
    """textual_inversion_sdxl.py's README command line, scaled down (resolution, steps, accumulation) for CPU."""
    args = [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--learnable_property=object",
        f"--placeholder_token={TOKEN}", "--initializer_token=toy", "--resolution=64", "--train_batch_size=1",
        "--gradient_accumulation_steps=2", "--max_train_steps=8", "--learning_rate=5.0e-04", "--scale_lr",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--save_as_full_pipeline", f"--output_dir={output_dir}",
        # Additions for the tiny run: each image once an epoch (7 batches = 4 steps), a seed, cheap validation.
        "--repeats=1", "--seed=0", "--logging_steps=1", "--validation_inference_steps=2",
    ]
    for key, value in extra.items():
        args += [f"--{key}"] if value is True else [f"--{key}={value}"]
    return args


MAIN = dict(num_vectors=2, save_steps=4, checkpointing_steps=2, checkpoints_total_limit=3,
            validation_prompt=f"a photo of {TOKEN}", validation_steps=4, num_validation_images=1)


@pytest.fixture(scope="module")
def main_run(tiny_sdxl, image_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sdxl_main") / "out")
    result = launch(SCRIPT, upstream_args(tiny_sdxl, image_folder, out, **MAIN))
    return out, result


def learned(folder, name):
    state = load_file(os.path.join(folder, name))
    assert list(state) == [TOKEN]
    return state[TOKEN]


def token_embedding(folder):
    """The token embedding matrix of a saved CLIP text encoder folder."""
    state = load_file(os.path.join(folder, "model.safetensors"))
    (key,) = [key for key in state if key.endswith("token_embedding.weight")]
    return state[key]


def assert_same_outputs(folder_a, folder_b, names=EMBEDS):
    for name in names:
        assert torch.equal(learned(folder_a, name), learned(folder_b, name)), f"{name}: {folder_a} vs {folder_b}"


def render(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(f"a photo of {TOKEN}", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


def test_upstream_sdxl_command_trains_both_encoders_and_the_outputs_load(main_run, tiny_sdxl):
    out, result = main_run
    assert "7 images x 1 repeats = 7 samples" in result.stderr
    assert "learning rate 0.001" in result.stderr  # --scale_lr: 5e-4 x accumulation 2
    from transformers import CLIPTokenizer

    toy = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer").encode("toy", add_special_tokens=False)[0]
    # Both encoders learned their new rows, starting from their own embedding of the initializer.
    for name, encoder, dim in zip(EMBEDS, ENCODERS, DIMS):
        rows = learned(out, name)
        assert rows.shape == (2, dim)
        base = token_embedding(os.path.join(tiny_sdxl, encoder))
        assert not torch.equal(rows, base[toy].repeat(2, 1)), f"{name}: the new vectors did not train"
        # --save_as_full_pipeline: every other row of the matrix is bit-identical, the new rows are the learned ones.
        full = token_embedding(os.path.join(out, encoder))
        assert full.shape == (base.shape[0] + 2, dim)
        assert torch.equal(full[: base.shape[0]], base), f"{encoder}: rows other than the placeholder's changed"
        assert torch.equal(full[base.shape[0]:], rows)

    # --save_steps copies of both files, equal to what the checkpoints hold; rotation kept the last three checkpoints.
    assert checkpoints(out) == {"checkpoint-4", "checkpoint-6", "checkpoint-8"}
    for step in (4, 8):
        for stem in ("learned_embeds", "learned_embeds_2"):
            assert os.path.isfile(os.path.join(out, f"{stem}-steps-{step}.safetensors"))
    assert_same_outputs(out, os.path.join(out, "checkpoint-8"))
    for stem, name in zip(("learned_embeds", "learned_embeds_2"), EMBEDS):
        assert torch.equal(learned(out, f"{stem}-steps-8.safetensors"), learned(out, name))
    assert sorted(os.listdir(os.path.join(out, "validation"))) == ["step_4_0.png", "step_8_0.png"]
    card = open(os.path.join(out, "README.md")).read()
    assert "StableDiffusionXLPipeline" in card and "learned_embeds_2.safetensors" in card
    assert "stable-diffusion-xl" in card

    # Loaded the SDXL way: the first file into text_encoder, the second into text_encoder_2; both resolve <cat-toy>
    # to the trained vectors, and the image equals the saved full pipeline's.
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.load_textual_inversion(out)
    pipeline.load_textual_inversion(out, weight_name=EMBEDS[1], text_encoder=pipeline.text_encoder_2,
                                    tokenizer=pipeline.tokenizer_2)
    for tokenizer, encoder, name in ((pipeline.tokenizer, pipeline.text_encoder, EMBEDS[0]),
                                     (pipeline.tokenizer_2, pipeline.text_encoder_2, EMBEDS[1])):
        assert pipeline.maybe_convert_prompt(f"a {TOKEN}", tokenizer) == f"a {TOKEN} {TOKEN}_1"
        ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), learned(out, name))
    image = render(pipeline)
    assert image.shape == (1, 64, 64, 3)
    full_pipeline = StableDiffusionXLPipeline.from_pretrained(out)
    assert TOKEN in full_pipeline.tokenizer.get_vocab() and TOKEN in full_pipeline.tokenizer_2.get_vocab()
    torch.testing.assert_close(torch.from_numpy(render(full_pipeline)), torch.from_numpy(image))


def test_resume_is_exact_with_accumulation_and_rotates(main_run, tiny_sdxl, image_folder, tmp_path):
    """Accumulation 2, 4 steps an epoch (the last from one batch): checkpoint-6 is mid-epoch. The resumed run ends bit
    for bit like the straight one in both files; of the older checkpoints beside it, the oldest goes once checkpoint-8
    is written (--checkpoints_total_limit 3)."""
    straight, _ = main_run
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    for name in ("checkpoint-6", "checkpoint-4", "checkpoint-2"):
        shutil.copytree(os.path.join(straight, "checkpoint-6"), os.path.join(resumed, name))
    result = train(SCRIPT, upstream_args(tiny_sdxl, image_folder, resumed, resume_from_checkpoint="latest", **MAIN))
    assert f"Resuming from {os.path.join(resumed, 'checkpoint-6')}" in result.stderr
    assert checkpoints(resumed) == {"checkpoint-4", "checkpoint-6", "checkpoint-8"}
    assert_same_outputs(straight, resumed)
    assert_same_outputs(os.path.join(straight, "checkpoint-8"), os.path.join(resumed, "checkpoint-8"))


def test_sigterm_saves_a_checkpoint_and_latest_resumes_exactly(tiny_sdxl, image_folder, tmp_path):
    """Both encoders' new rows, random crops (each crop in the time ids): SIGTERM -> a checkpoint at the stop step,
    exit 143, no final embeddings; resume latest == straight in both files, bit for bit."""
    settings = dict(num_vectors=2, train_batch_size=1, gradient_accumulation_steps=1, max_train_steps=30,
                    checkpointing_steps=3, save_steps=100)
    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, upstream_args(tiny_sdxl, image_folder, interrupted, **settings))
    wait_for_path(os.path.join(interrupted, "checkpoint-3"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Received SIGTERM" in stderr and "Continue with --resume_from_checkpoint latest" in stdout
    stop_step = max(int(name.split("-")[1]) for name in checkpoints(interrupted))
    assert 3 <= stop_step < 30, "the signal arrived after the run had finished: the test needs more steps"
    assert not os.path.exists(os.path.join(interrupted, EMBEDS[0]))

    train(SCRIPT, upstream_args(tiny_sdxl, image_folder, interrupted, resume_from_checkpoint="latest", **settings))
    straight = str(tmp_path / "straight")
    train(SCRIPT, upstream_args(tiny_sdxl, image_folder, straight, **settings))
    assert_same_outputs(straight, interrupted)


def test_cached_latents_match_fresh_encodings(main_run, tiny_sdxl, image_folder, tmp_path):
    """From the same checkpoint-4, steps 5-8 on --cache_latents (both flip orientations are cached, and with seed 0
    these steps draw both; validation loads the dropped VAE again) end like the straight run's fresh encodings within
    fp32 rounding."""
    straight, _ = main_run
    out = str(tmp_path / "cached")
    os.makedirs(out)
    shutil.copytree(os.path.join(straight, "checkpoint-4"), os.path.join(out, "checkpoint-4"))
    cache = str(tmp_path / "cache")
    result = train(SCRIPT, upstream_args(tiny_sdxl, image_folder, out, resume_from_checkpoint="latest",
                                         cache_latents=True, feature_cache_dir=cache, **MAIN))
    assert "latents: 0 of 7 cached" in result.stderr
    for name in EMBEDS:
        torch.testing.assert_close(learned(out, name), learned(straight, name), rtol=0, atol=2e-6)
    assert os.listdir(os.path.join(out, "validation")) == ["step_8_0.png"]


def test_two_processes_resume_exactly(tiny_sdxl, image_folder, tmp_path):
    """CPU DDP over gloo with both text encoders prepared; accumulation 1; validation split across ranks; the VAE
    from --pretrained_vae_model_name_or_path (a VAE folder of its own)."""
    settings = dict(gradient_accumulation_steps=1, max_train_steps=4, checkpointing_steps=2,
                    validation_prompt=f"a {TOKEN}", validation_steps=4, num_validation_images=2,
                    pretrained_vae_model_name_or_path=os.path.join(tiny_sdxl, "vae"))
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, upstream_args(tiny_sdxl, image_folder, straight, **settings), num_processes=2)
    assert "terminate called" not in result.stderr
    assert set(os.listdir(os.path.join(straight, "checkpoint-2"))) >= {"random_states_1.pkl", *EMBEDS}
    assert sorted(os.listdir(os.path.join(straight, "validation"))) == ["step_4_0.png", "step_4_1.png"]
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    launch(SCRIPT, upstream_args(tiny_sdxl, image_folder, resumed, resume_from_checkpoint="checkpoint-2", **settings),
           num_processes=2)
    assert_same_outputs(straight, resumed)


def test_generated_buckets_train_and_both_embeddings_generate_at_a_bucket_shape(tiny_sdxl, mixed_aspect_folder,
                                                                                tmp_path):
    """--use_aspect_ratio_buckets --bucket_divisibility 16 at 64 px, accumulation 1, random crops: landscape,
    portrait and square buckets, and the 40 x 40 image in a smaller one instead of being upscaled. Both files load
    with load_textual_inversion into StableDiffusionXLPipeline, which then generates at 64 x 96."""
    out = str(tmp_path / "out")
    args = upstream_args(tiny_sdxl, mixed_aspect_folder, out, use_aspect_ratio_buckets=True, bucket_divisibility=16,
                         gradient_accumulation_steps=1, max_train_steps=3)
    result = launch(SCRIPT, [arg for arg in args if arg != "--save_as_full_pipeline"])
    buckets = result.stderr.split("Aspect-ratio buckets (height x width: images): ")[1].split(";")[0]
    assert "32x32: 1" in buckets and sum(int(part.split(": ")[1]) for part in buckets.split(", ")) == 6, buckets
    assert len(buckets.split(", ")) >= 3, buckets
    card = open(os.path.join(out, "README.md")).read()
    assert "aspect-ratio buckets" in card

    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.load_textual_inversion(out)
    pipeline.load_textual_inversion(out, weight_name=EMBEDS[1], text_encoder=pipeline.text_encoder_2,
                                    tokenizer=pipeline.tokenizer_2)
    for tokenizer, encoder, name in ((pipeline.tokenizer, pipeline.text_encoder, EMBEDS[0]),
                                     (pipeline.tokenizer_2, pipeline.text_encoder_2, EMBEDS[1])):
        ids = tokenizer.convert_tokens_to_ids([TOKEN])
        assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), learned(out, name))
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(f"a photo of {TOKEN}", num_inference_steps=2, height=64, width=96, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 96, 3)


def test_bucketed_time_ids_carry_the_true_size_the_real_crop_and_the_bucket(tiny_sdxl, mixed_aspect_folder):
    """In-process: with an explicit bucket list and random crops, each sample's time ids are (its image's true
    height, width, the top-left of the crop its pixels show in the image resized to cover the bucket, the bucket's
    height, width)."""
    from argparse import Namespace

    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import textual_inversion as script
    from trainkit import bucketing, families, randomness

    names = [name for name, _, _ in MIXED_ASPECT_IMAGES]
    paths = [os.path.join(mixed_aspect_folder, f"{name}.png") for name in names]
    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
    args = Namespace(learnable_property="object", resolution=64, center_crop=False, repeats=1,
                     family=families.FAMILIES["sdxl"],
                     placeholder_token=TOKEN, initializer_token="toy", num_vectors=1, masked_loss=False,
                     buckets=bucketing.Buckets(explicit=[(64, 96), (96, 64), (64, 64)]))
    encoders = [CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")]
    for tokenizer, encoder in zip(tokenizers, encoders):
        script.add_placeholder_tokens(args, tokenizer, encoder)
    dataset = script.TextualInversionDataset(paths, tokenizers, TOKEN, args, randomness.RunState(seed=0))
    buckets = {"land_0": (64, 96), "land_1": (64, 96), "port_0": (96, 64), "port_1": (96, 64), "square_0": (64, 64),
               "small_0": (64, 64)}
    for epoch in (0, 1):
        samples = [dataset[(epoch, index)] for index in range(len(paths))]
        for (name, width, height), sample in zip(MIXED_ASPECT_IMAGES, samples):
            batch = torch.utils.data.default_collate([sample])
            _, added = script.encode_batch(encoders, batch, args, torch.float32)
            (top, left), (bucket_height, bucket_width) = sample["crop_top_left"].tolist(), buckets[name]
            assert added["time_ids"].tolist() == [[height, width, top, left, bucket_height, bucket_width]], name
            # The pixels are that crop of the image resized to cover the bucket (flipped or not).
            image = script._load_rgb(paths[names.index(name)])
            cover = image.resize(bucketing.cover_size(width, height, bucket_height, bucket_width),
                                 resample=script.Image.BICUBIC)
            crop = cover.crop((left, top, left + bucket_width, top + bucket_height))
            expected = script.image_tensor(crop, script.Framing(None, crop.size, None, (0, 0), buckets[name]), False)
            assert any(torch.equal(sample["pixel_values"], candidate) for candidate in (expected, expected.flip(-1)))


def test_time_ids_come_from_each_image_s_real_size_and_crop(tiny_sdxl, tmp_path):
    """In-process: the UNet's time ids are (original h, w, crop top, left, target h, w) of each sample's own image
    (EXIF orientation applied), the crop in the frame resized to the resolution on the shorter side; no crop without
    --center_crop. Gradients of the conditioning reach the new rows of both encoders and no other row."""
    from argparse import Namespace

    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import textual_inversion as script
    from trainkit import families, randomness

    wide, tall = str(tmp_path / "wide.png"), str(tmp_path / "tall.jpg")
    Image.new("RGB", (40, 20), "red").save(wide)
    image = Image.new("RGB", (30, 20), "blue")  # stored 30 wide, 20 high; displayed rotated: 20 wide, 30 high
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tall, exif=exif)

    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
    args = Namespace(learnable_property="object", resolution=16, center_crop=True, repeats=1,
                     family=families.FAMILIES["sdxl"],
                     placeholder_token=TOKEN, initializer_token="toy", num_vectors=1)
    encoders = [CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")]
    bases = [encoder.get_input_embeddings().weight.detach().clone() for encoder in encoders]
    embeddings = [script.add_placeholder_tokens(args, t, e) for t, e in zip(tokenizers, encoders)]
    # The new row of each encoder starts as that encoder's own embedding of the initializer.
    for tokenizer, base, embedding in zip(tokenizers, bases, embeddings):
        toy = tokenizer.encode("toy", add_special_tokens=False)[0]
        assert len(tokenizer) == base.shape[0] + 1 and tokenizer.convert_tokens_to_ids(TOKEN) == base.shape[0]
        assert torch.equal(embedding.new_rows.detach(), base[toy:toy + 1])
    for encoder, embedding in zip(encoders, embeddings):  # as main does: only the new rows train
        encoder.requires_grad_(False)
        embedding.new_rows.requires_grad_(True)
    run_state = randomness.RunState(seed=0)

    def batch(center_crop):
        args.center_crop = center_crop
        dataset = script.TextualInversionDataset([wide, tall], tokenizers, TOKEN, args, run_state)
        return torch.utils.data.default_collate([dataset[(0, 0)], dataset[(0, 1)]])

    # Centre crop: wide 40 x 20 -> central 20 x 20 at left 10, x 16/20 in the resized frame; tall (displayed 20 wide,
    # 30 high) -> top 5 x 16/20 = 4.
    cropped = batch(center_crop=True)
    assert cropped["pixel_values"].shape == (2, 3, 16, 16)
    hidden, added = script.encode_batch(encoders, cropped, args, torch.float32)
    assert added["time_ids"].tolist() == [[20, 40, 0, 8, 16, 16], [30, 20, 4, 0, 16, 16]]
    assert hidden.shape == (2, 77, 32 + 24) and added["text_embeds"].shape == (2, 16)
    (hidden.sum() + added["text_embeds"].sum()).backward()
    for embedding in embeddings:
        assert embedding.new_rows.grad is not None and embedding.new_rows.grad.abs().sum() > 0
        assert embedding.base.grad is None

    # Plain resize: the whole image, no crop.
    _, added = script.encode_batch(encoders, batch(center_crop=False), args, torch.float32)
    assert added["time_ids"].tolist() == [[20, 40, 0, 0, 16, 16], [30, 20, 0, 0, 16, 16]]


# --------------------------------------------------------------------------------------------------------------------
# Bad input (SPEC §7), in-process: all are found before an Accelerator exists
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_variant(tiny_sdxl, tmp_path_factory):
    """The tiny SDXL model with `<only-1>` added to tokenizer/ alone and `<only-2>` to tokenizer_2/ alone: a word
    that is new (or one token) in one tokenizer and not in the other."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("sdxl_variant")
    for name in os.listdir(tiny_sdxl):
        source = os.path.join(tiny_sdxl, name)
        if name.startswith("tokenizer"):
            tokenizer = CLIPTokenizer.from_pretrained(source)
            tokenizer.add_tokens(["<only-1>" if name == "tokenizer" else "<only-2>"])
            tokenizer.save_pretrained(str(folder / name))
        elif os.path.isdir(source):
            os.symlink(source, folder / name)
        else:
            shutil.copy(source, folder / name)
    return str(folder)


SDXL_BAD_INPUTS = {
    "placeholder already in tokenizer": ({"placeholder_token": "<only-1>"},
                                         "the tokenizer already has the token '<only-1>'"),
    "placeholder already in tokenizer_2": ({"placeholder_token": "<only-2>"},
                                           "the tokenizer_2 already has the token '<only-2>'"),
    "initializer not one token in tokenizer_2": ({"initializer_token": "<only-1>"}, "the tokenizer_2 splits it"),
    "initializer not one token in tokenizer": ({"initializer_token": "<only-2>"}, "the tokenizer splits it"),
    "tokenizer_name on SDXL": ({"tokenizer_name": "{model}/tokenizer"}, "--tokenizer_name cannot apply to the SDXL"),
    "missing VAE": ({"pretrained_vae_model_name_or_path": "/nonexistent/vae"}, "--pretrained_vae_model_name_or_path"),
    "SDXL folder without tokenizer_2": ({"pretrained_model_name_or_path": "{broken}"},
                                        "is not an SDXL pipeline folder (missing tokenizer_2/)"),
    "checkpoint without learned_embeds_2 (an SD one)": ({"resume_from_checkpoint": "{sd_checkpoint}"},
                                                        "holds no learned_embeds_2.safetensors"),
}


@pytest.mark.parametrize("case", list(SDXL_BAD_INPUTS))
def test_bad_sdxl_input_gets_one_line_error(case, tokenizer_variant, image_folder, tmp_path, capsys):
    overrides, expected = SDXL_BAD_INPUTS[case]
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tokenizer_variant):
        if name != "tokenizer_2":
            os.symlink(os.path.join(tokenizer_variant, name), broken / name)
    sd_checkpoint = tmp_path / "sd" / "checkpoint-2"
    sd_checkpoint.mkdir(parents=True)
    save_file({TOKEN: torch.zeros(1, 32)}, str(sd_checkpoint / EMBEDS[0]))
    values = {"model": tokenizer_variant, "broken": str(broken), "sd_checkpoint": str(sd_checkpoint)}
    overrides = {key: value.format(**values) for key, value in overrides.items()}

    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    args = upstream_args(tokenizer_variant, image_folder, str(out))
    args = [arg for arg in args if arg.split("=")[0].lstrip("-") not in overrides]
    args += [f"--{key}={value}" for key, value in overrides.items()]
    status, stderr = fail_in_process("textual_inversion", args, capsys)
    assert_one_line_error(status, stderr, [expected])
    assert snapshot(str(out)) == before
