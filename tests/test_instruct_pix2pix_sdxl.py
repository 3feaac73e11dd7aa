"""train_instruct_pix2pix.py on an SDXL base model: what differs from SD (two text encoders, the pooled embedding and
its conditioning dropout, time ids from each sample's real size and crop or the crop flags, the VAE precision rule,
the SDXL flags, the StableDiffusionXLInstructPix2PixPipeline output), launched as users launch it, plus in-process
checks of the data, the cache, the loss and the bad-input contract. The SD behaviour itself is tested in
test_instruct_pix2pix.py."""

import os
import shutil
import signal
from argparse import Namespace

import pytest
import torch
from conftest import MIXED_ASPECT_BUCKETS
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
from PIL import Image
from test_instruct_pix2pix import (  # noqa: F401
    base_args,
    mixed_aspect_pairs,
    tiny_sd,
    validation_image,
    write_parquet_dataset,
)

from trainkit.families import FAMILIES

SCRIPT = "train_instruct_pix2pix.py"
SD, SDXL = FAMILIES["sd"], FAMILIES["sdxl"]
# Upstream's documented train_instruct_pix2pix_sdxl.py command line, scaled down for a CPU: batch 4 -> 2,
# accumulation 4 -> 2, resolution 256 -> 64, 15000 steps -> 8, checkpoints every 5000 -> 2 steps.
UPSTREAM_FLAGS = ["--resolution=64", "--random_flip", "--train_batch_size=2", "--gradient_accumulation_steps=2",
                  "--gradient_checkpointing", "--max_train_steps=8", "--checkpointing_steps=2",
                  "--checkpoints_total_limit=1", "--learning_rate=5e-05", "--max_grad_norm=1", "--lr_warmup_steps=0",
                  "--conditioning_dropout_prob=0.05", "--seed=42", "--use_ema"]


@pytest.fixture(scope="module")
def sdxl_pairs(tmp_path_factory):
    """8 examples of 40x32 (not square: a random crop has room to move): 4 batches of 2 per epoch."""
    return write_parquet_dataset(str(tmp_path_factory.mktemp("sdxl_pairs")), 8, seed=5, size=(40, 32))


def _script():
    import train_instruct_pix2pix

    return train_instruct_pix2pix


def _args(model, data, output_dir, *extra):
    return _script().parse_args([f"--pretrained_model_name_or_path={model}", f"--dataset_name={data}",
                                 f"--output_dir={output_dir}", *extra])


# --------------------------------------------------------------------------------------------------------------------
# Launched runs
# --------------------------------------------------------------------------------------------------------------------


def test_upstream_sdxl_command_line_trains_an_sdxl_editing_pipeline_and_resumes_exactly_after_sigterm(
        tiny_sdxl, sdxl_pairs, validation_image, tmp_path):
    """Upstream's SDXL command line with only the script name changed (scaled down; GA 2, EMA, random crops and
    flips, conditioning dropout), validating every 8 steps through --val_image_url_or_path: 8 steps straight write a
    StableDiffusionXLInstructPix2PixPipeline (8-channel UNet holding the EMA weights) that loads with the SDXL API
    and edits an image, and keep only the newest checkpoint. The same run stopped by SIGTERM keeps one checkpoint (the
    stop step's), and `--resume_from_checkpoint latest` ends bit for bit like the straight run (without validation:
    validation does not disturb training), again keeping only the newest checkpoint."""
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    straight = str(tmp_path / "straight")
    model_flags = [f"--pretrained_model_name_or_path={tiny_sdxl}", f"--dataset_name={sdxl_pairs}"]
    result = launch(SCRIPT, model_flags + UPSTREAM_FLAGS + [
        f"--output_dir={straight}", f"--val_image_url_or_path={validation_image}", "--validation_prompt=make it red",
        "--num_validation_images=1", "--validation_steps=8", "--validation_inference_steps=2"])
    assert "8 examples, 4 epochs of 2 steps, 8 steps in all, batch 2 per device, total batch 4" in result.stderr
    assert checkpoints(straight) == {"checkpoint-8"}
    with open(os.path.join(straight, "model_index.json")) as file:
        assert '"StableDiffusionXLInstructPix2PixPipeline"' in file.read()
    assert load_weights(os.path.join(straight, "unet"))["conv_in.weight"].shape[1] == 8
    assert_same_weights(os.path.join(straight, "unet"), os.path.join(straight, "checkpoint-8", "unet_ema"))
    assert sorted(os.listdir(os.path.join(straight, "validation"))) == [
        "final", "step_000001", "step_000008"]
    with open(os.path.join(straight, "README.md")) as file:
        card = file.read()
    assert "StableDiffusionXLInstructPix2PixPipeline.from_pretrained" in card and "stable-diffusion-xl" in card

    pipeline = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(straight)
    assert pipeline.unet.config.in_channels == 8
    edited = pipeline("make it red", image=Image.open(validation_image).convert("RGB").resize((64, 64)),
                      num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert edited.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(edited)).all())

    interrupted = str(tmp_path / "interrupted")
    process = start_python(SCRIPT, model_flags + UPSTREAM_FLAGS + [f"--output_dir={interrupted}"])
    wait_for_path(os.path.join(interrupted, "checkpoint-2"), process)
    status, stdout, stderr = send_signal_and_wait(process, signal.SIGTERM)
    assert status == 143, stderr[-3000:]
    assert "Continue with --resume_from_checkpoint latest" in stdout
    (stopped,) = checkpoints(interrupted)
    assert 2 <= int(stopped.split("-")[1]) < 8, "the signal arrived after the run had finished"
    assert not os.path.exists(os.path.join(interrupted, "model_index.json"))

    train(SCRIPT, model_flags + UPSTREAM_FLAGS + [f"--output_dir={interrupted}", "--resume_from_checkpoint=latest"])
    assert checkpoints(interrupted) == {"checkpoint-8"}
    for folder in ("checkpoint-8/unet", "checkpoint-8/unet_ema", "unet", "unet_raw"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(interrupted, folder))


def test_two_processes_with_the_cache_and_another_vae(tiny_sdxl, other_vae, sdxl_pairs, validation_image, tmp_path):
    """CPU DDP over gloo on SDXL with --cache_latents --cache_text_embeddings (filled by both ranks) and
    --pretrained_vae_model_name_or_path: trains, checkpoints every rank's state, validates with the dropped models
    loaded again (images split across ranks), saves the given VAE in the pipeline and exits cleanly."""
    import datasets

    out = str(tmp_path / "out")
    result = launch(SCRIPT, base_args(
        tiny_sdxl, out, parquet=sdxl_pairs, train_batch_size=1, max_train_steps=2, checkpointing_steps=1,
        use_ema=True, center_crop=True, random_flip=True, conditioning_dropout_prob=0.3, cache_latents=True,
        cache_text_embeddings=True, feature_cache_dir=str(tmp_path / "cache"),
        pretrained_vae_model_name_or_path=other_vae, val_image_url=validation_image,
        validation_prompt="make it blue", num_validation_images=2, validation_steps=2), num_processes=2)
    assert "terminate called" not in result.stderr
    assert "8 examples, 1 epochs of 4 steps, 2 steps in all" in result.stderr
    # 8 examples: 16 distinct images; the distinct prompts and the empty one.
    prompts = len(set(datasets.load_dataset(sdxl_pairs)["train"]["edit_prompt"]) | {""})
    assert "latents: 0 of 16 cached" in result.stderr and f"text_embeddings: 0 of {prompts} cached" in result.stderr
    assert checkpoints(out) == {"checkpoint-1", "checkpoint-2"}
    assert set(os.listdir(os.path.join(out, "checkpoint-2"))) >= {"random_states_0.pkl", "random_states_1.pkl"}
    assert sorted(os.listdir(os.path.join(out, "validation"))) == ["final", "step_000001", "step_000002"]
    assert sorted(os.listdir(os.path.join(out, "validation", "final"))) == ["00.png", "01.png", "original.png"]
    assert_same_weights(os.path.join(out, "vae"), other_vae)


def _cache_files(cache_dir):
    """{latent entry path: mtime}."""
    found = {}
    for root, _, files in os.walk(os.path.join(cache_dir, "latents")):
        for name in files:
            if name.endswith(".safetensors"):
                found[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mtime_ns
    return found


def test_buckets_with_the_cache_resume_exactly_and_the_pipeline_edits_a_non_square_image(
        tiny_sdxl, mixed_aspect_pairs, tmp_path):
    """Generated buckets (--use_aspect_ratio_buckets --bucket_divisibility 16 at 64: 48x80, 80x48, 64x64 and, for the
    small image, 32x32, so 4 batches of at most 2 per epoch) with --cache_latents --cache_text_embeddings, flips,
    both dropouts, GA 1: 6 steps straight == its checkpoint-3 (mid-epoch) resumed to 6 on the filled cache, bit for
    bit. The cache holds each image at its bucket's size; the output loads as StableDiffusionXLInstructPix2PixPipeline
    and edits an image at height 64, width 96."""
    from diffusers import StableDiffusionXLInstructPix2PixPipeline
    from safetensors.torch import load_file

    cache = str(tmp_path / "cache")
    settings = {"use_aspect_ratio_buckets": True, "bucket_divisibility": 16, "center_crop": True, "random_flip": True,
                "cache_latents": True, "cache_text_embeddings": True, "feature_cache_dir": cache,
                "conditioning_dropout_prob": 0.2, "proportion_empty_prompts": 0.3, "max_train_steps": 6,
                "checkpointing_steps": 3}
    straight = str(tmp_path / "straight")
    result = launch(SCRIPT, base_args(tiny_sdxl, straight, data=mixed_aspect_pairs, **settings))
    assert "6 examples, 2 epochs of 4 steps" in result.stderr and "latents: 0 of 12 cached" in result.stderr
    assert checkpoints(straight) == {"checkpoint-3", "checkpoint-6"}
    sizes = {tuple(8 * side for side in load_file(path)["latent_dist"].shape[-2:]) for path in _cache_files(cache)}
    assert sizes == {(48, 80), (80, 48), (64, 64), (32, 32)}

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(straight, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    result = train(SCRIPT, base_args(tiny_sdxl, resumed, data=mixed_aspect_pairs, resume_from_checkpoint="latest",
                                     **settings))
    assert "latents: 12 of 12 cached" in result.stderr
    for folder in ("checkpoint-6/unet", "unet"):
        assert_same_weights(os.path.join(straight, folder), os.path.join(resumed, folder))

    pipeline = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(straight)
    wide = Image.new("RGB", (96, 64), (200, 40, 40))
    edited = pipeline("make it blue", image=wide, height=64, width=96, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert edited.shape == (1, 64, 96, 3) and bool(torch.isfinite(torch.from_numpy(edited)).all())


# --------------------------------------------------------------------------------------------------------------------
# In-process: time ids, the cache, conditioning dropout of the pooled embedding, the VAE dtype
# --------------------------------------------------------------------------------------------------------------------


def test_time_ids_come_from_the_real_size_and_crop_unless_the_crop_flags_are_given(tiny_sdxl, sdxl_pairs, tmp_path):
    """Each sample's time ids are (original height, width, crop top, left, resolution, resolution): the crop that was
    really taken in the resized image (seen in the flipped image when flipped), checked against the pixels; an
    explicit --crops_coords_top_left_h/w replaces its coordinate in every sample, as upstream."""
    from trainkit.randomness import RunState

    script = _script()
    args = _args(tiny_sdxl, sdxl_pairs, str(tmp_path), "--resolution=16", "--random_flip")
    assert args.family is SDXL and args.validation_steps == 100 and args.validation_epochs is None
    assert args.tracker_project_name == "instruct-pix2pix-xl"
    dataset = script.load_edit_dataset(args)
    tokenizers = script.load_models(args)[1]
    examples = script.EditExamples(dataset, tokenizers, args, RunState(seed=3))
    seen = set()
    for epoch in range(3):
        for index in range(4):
            item = examples[(epoch, index)]
            image = dataset[index]["edited_image"]
            assert item["original_size"].tolist() == [32, 40]
            top, left = item["crop_top_left"].tolist()
            resized = script.resize_short_side(image, 16)  # 20 x 16: only the left can move
            flipped = resized.transpose(Image.FLIP_LEFT_RIGHT)
            expected = script.to_model_range(flipped.crop((left, top, left + 16, top + 16)))
            unflipped = script.to_model_range(resized.crop((left, top, left + 16, top + 16)))
            assert torch.equal(item["edited_pixel_values"], expected) or (
                torch.equal(item["edited_pixel_values"], unflipped))
            seen.add((top, left))
            assert [ids.tolist() for ids in SDXL.tokenize(tokenizers, dataset[index]["edit_prompt"])] == [
                [item["input_ids"].tolist()], [item["input_ids_2"].tolist()]]
    assert len({left for _, left in seen}) > 2 and {top for top, _ in seen} == {0}

    batch = {"original_size": torch.tensor([[32, 40], [64, 80]]), "crop_top_left": torch.tensor([[0, 3], [5, 1]])}
    pooled = torch.zeros(2, 16)
    time_ids = script.added_conditions(batch, pooled, args)["time_ids"]
    assert time_ids.tolist() == [[32, 40, 0, 3, 16, 16], [64, 80, 5, 1, 16, 16]]
    args.crops_coords_top_left_h, args.crops_coords_top_left_w = 0, 0  # upstream's default, given explicitly
    assert script.added_conditions(batch, pooled, args)["time_ids"][:, 2:4].tolist() == [[0, 0], [0, 0]]
    args.crops_coords_top_left_w = None
    assert script.added_conditions(batch, pooled, args)["time_ids"][:, 2:4].tolist() == [[0, 3], [0, 1]]
    args.family = SD
    assert script.added_conditions(batch, None, args) is None  # SD: no added conditions


class _FakeAccelerator(Namespace):
    """What FeatureCache.fill needs of an Accelerator, for one process."""

    def __init__(self):
        super().__init__(device=torch.device("cpu"), is_main_process=True, process_index=0, num_processes=1)

    def wait_for_everyone(self):
        pass


class _RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records what training_loss feeds it, predicts zeros."""

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        self.seen = {"sample": sample, "encoder_hidden_states": encoder_hidden_states, **added_cond_kwargs}
        return (torch.zeros_like(sample[:, :4]),)


def test_cache_equals_fresh_encodings_and_a_dropped_prompt_drops_the_pooled_embedding(tiny_sdxl, sdxl_pairs,
                                                                                        tmp_path):
    """With --cache_latents --cache_text_embeddings (centre crop, flips), the batches the UNet sees equal those of
    fresh encodings within fp32 rounding: both latents, both encoders' hidden states, the pooled embedding, the time
    ids (from the original size kept in the cache), and the empty prompt (from the cache) that conditioning dropout
    puts in place of a dropped prompt, hidden states and pooled embedding both, as the pipeline's classifier-free
    guidance sees it."""
    from diffusers import DDPMScheduler
    from torch.utils.data import default_collate
    from trainkit.randomness import RunState

    script = _script()
    args = _args(tiny_sdxl, sdxl_pairs, str(tmp_path / "out"), "--resolution=16", "--center_crop", "--random_flip",
                 "--conditioning_dropout_prob=0.3", f"--feature_cache_dir={tmp_path / 'cache'}")
    dataset = script.load_edit_dataset(args)
    _, tokenizers, text_encoders, vae, _ = script.load_models(args)
    scheduler = DDPMScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler")
    keys = [(1, index) for index in range(4)]
    draws = torch.tensor([0.1, 0.9, 0.95, 0.3])  # p = 0.3 (u < 2p drops the prompt): dropped, kept, kept, dropped

    def fed(examples, vae, text_encoders, empty):
        batch = {**default_collate([examples[key] for key in keys]), "dropout_draw": draws}
        unet = _RecordingUNet()
        with torch.no_grad():
            script.training_loss(unet, vae, text_encoders, scheduler, batch, torch.Generator().manual_seed(0), args,
                                 torch.float32, empty, vae.config.scaling_factor if vae else 0.13025)
        return unet.seen

    with torch.no_grad():
        empty = SDXL.encode_prompt(text_encoders, SDXL.tokenize(tokenizers, [""]))
    fresh = fed(script.EditExamples(dataset, tokenizers, args, RunState(seed=3)), vae, text_encoders, empty)

    accelerator = _FakeAccelerator()
    cached_examples = script.EditExamples(dataset, tokenizers, args, RunState(seed=3))
    script.cache_latents(accelerator, cached_examples, vae, args, torch.float32)
    cached_empty = script.cache_text_embeddings(accelerator, cached_examples, text_encoders, tokenizers, args,
                                                torch.float32)
    assert "pixel_values" not in str(cached_examples[keys[0]].keys())
    cached = fed(cached_examples, None, None, cached_empty)

    assert fresh.keys() == cached.keys() == {"sample", "encoder_hidden_states", "text_embeds", "time_ids"}
    assert torch.equal(fresh["time_ids"], cached["time_ids"])
    assert fresh["time_ids"][:, :2].tolist() == [[32, 40]] * 4 and fresh["time_ids"][:, 2:4].tolist() == [[0, 2]] * 4
    for name in ("sample", "encoder_hidden_states", "text_embeds"):
        torch.testing.assert_close(cached[name], fresh[name], rtol=0, atol=1e-5)
    for row, dropped in enumerate([True, False, False, True]):
        assert torch.equal(fresh["text_embeds"][row], empty[1][0]) == dropped, row
        assert torch.equal(fresh["encoder_hidden_states"][row], empty[0][0]) == dropped, row
    assert fresh["encoder_hidden_states"].shape[-1] == 32 + 24 and fresh["text_embeds"].shape[-1] == 16


def _bucketed(model, data, output_dir, *extra):
    args = _script().parse_args([f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}",
                                 f"--output_dir={output_dir}", "--resolution=64", *extra])
    _script().validate_args(args)
    return args


def _tokenizers(model):
    from transformers import CLIPTokenizer

    return [CLIPTokenizer.from_pretrained(model, subfolder=name) for name in ("tokenizer", "tokenizer_2")]


def test_bucketed_time_ids_carry_the_true_size_the_real_crop_and_the_bucket(tiny_sdxl, mixed_aspect_pairs, tmp_path):
    """Generated buckets, random crops and flips: each sample's time ids hold its edited image's true (height,
    width), the crop really taken at its bucket's size (checked against the pixels, seen in the flipped image when
    flipped) and the bucket as the target size; --crops_coords_top_left_h still wins."""
    from torch.utils.data import default_collate
    from trainkit.randomness import RunState

    script = _script()
    args = _bucketed(tiny_sdxl, mixed_aspect_pairs, str(tmp_path), "--use_aspect_ratio_buckets",
                     "--bucket_divisibility=16", "--random_flip")
    dataset = script.load_edit_dataset(args)
    examples = script.EditExamples(dataset, _tokenizers(tiny_sdxl), args, RunState(seed=3))
    crops = set()
    for epoch in range(3):
        for index in range(len(dataset)):
            item, image = examples[(epoch, index)], dataset[index]["edited_image"]
            bucket = examples.target(index)
            assert bucket == args.buckets.assign(image.height, image.width)
            assert item["original_size"].tolist() == [image.height, image.width]
            assert item["target_size"].tolist() == list(bucket)
            assert item["edited_pixel_values"].shape == (3, *bucket)
            top, left = item["crop_top_left"].tolist()
            resized = script.resize_to_cover(image.convert("RGB"), bucket)
            views = [resized, resized.transpose(Image.FLIP_LEFT_RIGHT)]
            assert any(torch.equal(item["edited_pixel_values"], script.to_model_range(
                view.crop((left, top, left + bucket[1], top + bucket[0])))) for view in views), (epoch, index)
            crops.add((top, left))
    assert len(crops) > 3, "the random crops never moved"

    items = [examples[(0, index)] for index in range(2)]
    batch = default_collate([{key: item[key] for key in ("original_size", "crop_top_left", "target_size")}
                             for item in items])
    time_ids = script.added_conditions(batch, torch.zeros(2, 16), args)["time_ids"]
    assert time_ids.tolist() == [[*item["original_size"].tolist(), *item["crop_top_left"].tolist(),
                                  *item["target_size"].tolist()] for item in items]
    args.crops_coords_top_left_h = 0
    time_ids = script.added_conditions(batch, torch.zeros(2, 16), args)["time_ids"]
    assert time_ids[:, 2].tolist() == [0, 0] and time_ids[:, 4:].tolist() == batch["target_size"].tolist()


def test_bucketed_cache_pairs_every_latent_mask_and_caption_with_its_sample_and_rekeys_only_changed_buckets(
        tiny_sdxl, mixed_aspect_pairs, tmp_path):
    """--cache_latents --cache_text_embeddings with MIXED_ASPECT_BUCKETS, centre crops, flips, --masked_loss and
    --proportion_empty_prompts: over two epochs in the bucketed (shuffled) order, and again in a new dataset reading
    the filled cache as a resumed run does, every cached sample holds the latents of its own images at its bucket's
    size, its own mask and its own (or the empty) prompt's embeddings, as fresh encodings give them. A bucket list
    that moves only the portrait pairs to another bucket computes exactly their 4 images again."""
    from trainkit.randomness import RunState

    script = _script()
    cache = str(tmp_path / "cache")
    flags = ["--center_crop", "--random_flip", "--masked_loss", "--proportion_empty_prompts=0.5",
             f"--feature_cache_dir={cache}"]
    args = _bucketed(tiny_sdxl, mixed_aspect_pairs, str(tmp_path / "out"),
                     f"--aspect_ratio_buckets={MIXED_ASPECT_BUCKETS}", *flags)
    dataset = script.load_edit_dataset(args)
    _, tokenizers, text_encoders, vae, _ = script.load_models(args)
    accelerator = _FakeAccelerator()
    fresh = script.EditExamples(dataset, tokenizers, args, RunState(seed=3))

    def cached_examples(args):
        examples = script.EditExamples(dataset, tokenizers, args, RunState(seed=3))
        script.cache_latents(accelerator, examples, vae, args, torch.float32)
        script.cache_text_embeddings(accelerator, examples, text_encoders, tokenizers, args, torch.float32)
        return examples

    def assert_paired(cached, keys):
        for key in keys:
            expected, item = fresh[key], cached[key]
            with torch.no_grad():
                for name in ("original", "edited"):
                    latents = vae.encode(expected[f"{name}_pixel_values"][None]).latent_dist.parameters[0]
                    torch.testing.assert_close(item[f"{name}_latent_dist"], latents, rtol=0, atol=1e-4)
                states, pooled = SDXL.encode_prompt(text_encoders, [expected[name][None] for name in ("input_ids",
                                                                                                      "input_ids_2")])
            torch.testing.assert_close(item["encoder_hidden_states"], states[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(item["pooled_prompt_embeds"], pooled[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(item["loss_mask"], expected["loss_mask"], rtol=0, atol=1e-6)
            for name in ("original_size", "crop_top_left", "target_size"):
                assert torch.equal(item[name], expected[name]), (key, name)

    examples = cached_examples(args)
    entries = _cache_files(cache)
    assert len(entries) == 12
    loader, sampler = script.build_dataloader(examples, args, examples.run_state, accelerator)
    keys = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        keys += [key for batch in sampler for key in batch]
    assert_paired(examples, keys)
    assert any(fresh.drops_prompt(*key) for key in keys) and not all(fresh.drops_prompt(*key) for key in keys)
    assert_paired(cached_examples(args), keys[6:])  # the cache as a resumed run reads it: nothing recomputed
    assert _cache_files(cache) == entries

    moved = _bucketed(tiny_sdxl, mixed_aspect_pairs, str(tmp_path / "out"), "--aspect_ratio_buckets=64,96;104,64;64,64",
                      *flags)
    cached_examples(moved)
    now = _cache_files(cache)
    assert len(now) == 16 and all(now[path] == mtime for path, mtime in entries.items())


def test_vae_precision_follows_upstream():
    """SDXL's own VAE runs in --vae_precision (default fp32, the SDXL family's upcast rule, whatever the mixed
    precision); a VAE from --pretrained_vae_model_name_or_path runs in the mixed-precision dtype (--vae_precision
    ignored, as upstream); SD's VAE always runs in the mixed-precision dtype."""

    def dtype(sdxl, vae_precision=None, vae=None, weight_dtype=torch.float16):
        args = Namespace(vae_precision=vae_precision, pretrained_vae_model_name_or_path=vae)
        return (SDXL if sdxl else SD).vae_dtype(args, weight_dtype)

    assert dtype(True) == torch.float32 and dtype(True, "fp32") == torch.float32
    assert dtype(True, "fp16", weight_dtype=torch.float32) == torch.float16
    assert dtype(True, "bf16") == torch.bfloat16
    assert dtype(True, vae="madebyollin/sdxl-vae-fp16-fix") == torch.float16
    assert dtype(True, "fp32", vae="madebyollin/sdxl-vae-fp16-fix") == torch.float16
    assert dtype(False) == torch.float16


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any Accelerator or model (SPEC §7)
# --------------------------------------------------------------------------------------------------------------------

BAD_SDXL_ARGUMENTS = {
    "vae_precision not fp16/fp32/bf16": ({"vae_precision": "fp8"}, ["--vae_precision", "fp8"]),
    "missing VAE": ({"pretrained_vae_model_name_or_path": "/nonexistent/vae"},
                    ["--pretrained_vae_model_name_or_path", "/nonexistent/vae", "does not exist"]),
    "negative crop": ({"crops_coords_top_left_h": -1}, ["--crops_coords_top_left_h", "-1"]),
    "validation_steps 0": ({"validation_steps": 0}, ["--validation_steps"]),
    "missing validation image": ({"val_image_url_or_path": "/nonexistent/a.png", "validation_prompt": "make it red"},
                                 ["--val_image_url_or_path", "/nonexistent/a.png", "does not exist"]),
    "two different validation images": ({"val_image_url_or_path": "a.png", "val_image_url": "b.png",
                                         "validation_prompt": "make it red"},
                                        ["--val_image_url", "--val_image_url_or_path"]),
    "validation image without prompt": ({"val_image_url_or_path": "{image}"},
                                        ["--val_image_url", "--validation_prompt"]),
    "missing dataset": ({"parquet": "/nonexistent/data"}, ["--dataset_name", "/nonexistent/data"]),
    "max_train_steps 0": ({"max_train_steps": 0}, ["--max_train_steps"]),
    "resolution not a multiple of 8": ({"resolution": 60}, ["--resolution", "multiple of 8"]),
    "conditioning_dropout_prob above 1": ({"conditioning_dropout_prob": 1.5}, ["--conditioning_dropout_prob"]),
    "cache_latents with a random crop": ({"cache_latents": True}, ["--cache_latents needs --center_crop"]),
    "SDXL folder without text_encoder_2": ({"model": "{broken}"}, ["--pretrained_model_name_or_path",
                                                                   "text_encoder_2"]),
    "vae_precision on SD": ({"model": "{sd}", "vae_precision": "fp16"}, ["--vae_precision", "SDXL only", "{sd}"]),
    "crop flag on SD": ({"model": "{sd}", "crops_coords_top_left_w": 4}, ["--crops_coords_top_left_w", "SDXL only"]),
    "malformed aspect_ratio_buckets": ({"aspect_ratio_buckets": "64,x"}, ["--aspect_ratio_buckets", "height,width"]),
    "proportion_empty_prompts above 1": ({"proportion_empty_prompts": 2}, ["--proportion_empty_prompts", "2"]),
}


@pytest.mark.parametrize("case", list(BAD_SDXL_ARGUMENTS))
def test_bad_sdxl_argument_gets_one_line_error(case, tiny_sdxl, tiny_sd, sdxl_pairs, validation_image, tmp_path,
                                               capsys):
    import shutil

    overrides, expected = BAD_SDXL_ARGUMENTS[case]
    broken = tmp_path / "broken"
    if case == "SDXL folder without text_encoder_2":
        shutil.copytree(tiny_sdxl, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    values = {"image": validation_image, "broken": str(broken), "sd": tiny_sd}
    overrides = {key: value.format(**values) if isinstance(value, str) else value for key, value in overrides.items()}
    expected = [text.format(**values) for text in expected]
    out = tmp_path / "existing_output"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(str(out))
    model = overrides.pop("model", tiny_sdxl)
    status, stderr = fail_in_process("train_instruct_pix2pix", base_args(
        model, str(out), **{"parquet": sdxl_pairs, **overrides}), capsys)
    assert_one_line_error(status, stderr, expected)
    assert snapshot(str(out)) == before
