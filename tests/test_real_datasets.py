"""The shared layer of SPEC §9 (trainkit.bucketing): bucket assignment, the bucketed batch order and its sharding across
ranks, the resize/crop geometry, loss masks and the masked loss. In-process and fast; each script's use of it (its
dataset, cache, resume) is tested in that script's test module."""

import argparse

import pytest
import torch
from trainkit import bucketing, cli, objectives, randomness
from PIL import Image


def bucket_args(*argv, resolution=512):
    parser = argparse.ArgumentParser()
    bucketing.add_bucket_arguments(parser)
    args = parser.parse_args(list(argv))
    args.resolution = resolution
    bucketing.check_bucket_flags(args)
    return args


def test_without_the_flags_there_are_no_buckets():
    assert bucket_args().buckets is None


def test_generated_buckets_come_from_diffusers_and_do_not_upscale():
    from diffusers.training_utils import generate_aspect_ratio_buckets

    buckets = bucket_args("--use_aspect_ratio_buckets").buckets
    # The top rung is diffusers' ladder for --resolution, at sides that are multiples of --bucket_divisibility.
    top = generate_aspect_ratio_buckets(512, divisibility=64)
    assert set(top) <= set(buckets.all()) and all(h % 64 == 0 and w % 64 == 0 for h, w in buckets.all())
    # A large image goes to the top rung's nearest aspect ratio; its bucket is never bigger than the image.
    for height, width in [(1024, 1024), (768, 1024), (1024, 768), (2000, 1000), (600, 1200)]:
        bucket = buckets.assign(height, width)
        assert bucket in top and bucket[0] <= height and bucket[1] <= width
        ratios = [abs(h / w - height / width) for h, w in top]
        assert abs(bucket[0] / bucket[1] - height / width) == pytest.approx(min(ratios), abs=1e-9)
    assert buckets.assign(1000, 1500)[0] < buckets.assign(1500, 1000)[0]  # landscape is wide, portrait tall
    # A small image goes to a smaller rung that fits inside it instead of being upscaled to ~512^2 pixels.
    small = buckets.assign(300, 400)
    assert small[0] <= 300 and small[1] <= 400 and small[0] * small[1] < 512 * 512 / 2
    # Smaller than every rung (the smallest is --resolution / 2): the smallest rung's nearest bucket.
    assert bucket_args("--use_aspect_ratio_buckets", "--bucket_min_resolution", "384").buckets.assign(100, 100) == (
        384, 384)


def test_an_explicit_list_is_used_as_given():
    buckets = bucket_args("--aspect_ratio_buckets", "64,96;96,64;64,64", resolution=64).buckets
    assert buckets.all() == [(64, 64), (64, 96), (96, 64)]
    # Nearest aspect ratio, even for a small image (upstream upscales it; an explicit list is the user's choice).
    assert buckets.assign(64, 100) == (64, 96) and buckets.assign(40, 40) == (64, 64) and buckets.assign(300, 190) == (
        96, 64)


@pytest.mark.parametrize("argv, expected", [
    (["--aspect_ratio_buckets", "64,96;96"], ["--aspect_ratio_buckets", "'64,96;96'", "height,width"]),
    (["--aspect_ratio_buckets", "64,x"], ["--aspect_ratio_buckets", "height,width"]),
    (["--aspect_ratio_buckets", "64,0"], ["--aspect_ratio_buckets", "positive"]),
    (["--aspect_ratio_buckets", "64,100"], ["--aspect_ratio_buckets", "64,100", "multiple of 8"]),
    (["--use_aspect_ratio_buckets", "--bucket_min_resolution", "1024"], ["--bucket_min_resolution", "<= --resolution"]),
    (["--aspect_ratio_buckets", "64,64", "--bucket_min_resolution", "256"],
     ["--bucket_min_resolution", "--aspect_ratio_buckets"]),
    (["--bucket_min_resolution", "256"], ["--bucket_min_resolution", "--use_aspect_ratio_buckets"]),
    (["--use_aspect_ratio_buckets", "--bucket_divisibility", "12"], ["--bucket_divisibility", "multiple of 8"]),
    (["--validation_height", "100"], ["--validation_height", "multiple of 8"]),
])
def test_bad_bucket_flags_get_one_line_errors(argv, expected):
    with pytest.raises(cli.InputError) as error:
        bucket_args(*argv)
    message = str(error.value)
    assert "\n" not in message and all(part in message for part in expected), message


def test_bucketed_batches_never_mix_cover_every_sample_once_and_depend_only_on_seed_and_epoch():
    buckets_of_samples = [(64, 96)] * 5 + [(96, 64)] * 3 + [(64, 64)]
    batches = bucketing.bucket_batches(buckets_of_samples, 2, seed=7, stream=3, epoch=0)
    assert all(len({buckets_of_samples[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(9))  # nothing dropped
    # 5 -> 2+2+1, 3 -> 2+1, 1 -> 1: a bucket's remainder is a smaller batch of its own.
    assert sorted(len(batch) for batch in batches) == [1, 1, 1, 2, 2, 2]
    assert batches == bucketing.bucket_batches(buckets_of_samples, 2, seed=7, stream=3, epoch=0)
    others = [bucketing.bucket_batches(buckets_of_samples, 2, seed=7, stream=3, epoch=epoch) for epoch in (1, 2, 3)]
    assert any(other != batches for other in others)
    # Shuffled across buckets: over a few epochs the first batch does not always come from one bucket.
    firsts = {buckets_of_samples[bucketing.bucket_batches(buckets_of_samples, 2, 7, 3, epoch)[0][0]] for epoch in range(8)}
    assert len(firsts) > 1


def test_the_batch_sampler_shards_whole_batches_across_ranks_as_accelerate_does():
    from accelerate.data_loader import BatchSamplerShard

    buckets_of_samples = [(64, 96)] * 5 + [(96, 64)] * 4 + [(64, 64)] * 2
    sampler = bucketing.BucketBatchSampler(buckets_of_samples, 2, randomness.RunState(seed=0), stream=1)
    sampler.set_epoch(3)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 6
    assert all(epoch == 3 for batch in batches for epoch, _ in batch)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in range(2)]
    # Every rank gets as many batches (an odd count is topped up with whole batches from the epoch's start), each
    # batch whole and from one bucket, and together the ranks see every sample.
    assert len(shards[0]) == len(shards[1]) == 3
    seen = [index for shard in shards for batch in shard for _, index in batch]
    assert set(seen) == set(range(len(buckets_of_samples)))
    for shard in shards:
        assert all(len({buckets_of_samples[index] for _, index in batch}) == 1 for batch in shard)
    assert shards[0] == batches[0::2] and shards[1] == batches[1::2]


def test_cover_and_crop_geometry_matches_the_square_transform():
    # For a square target, covering is "short side to the resolution", as every script's square resize does.
    for width, height in [(100, 60), (60, 100), (77, 77), (513, 300)]:
        short = min(width, height)
        assert bucketing.cover_size(width, height, 64, 64) == (
            max(64, round(width * 64 / short)), max(64, round(height * 64 / short)))
    assert bucketing.cover_size(200, 100, 64, 96) == (128, 64)  # the height binds: 2:1 image into a 3:2 bucket
    assert bucketing.cover_size(100, 200, 64, 96) == (96, 192)  # the width binds
    generator = torch.Generator().manual_seed(0)
    top, left = bucketing.crop_origin(128, 64, 64, 96, center=False, generator=generator)
    assert top == 0 and 0 <= left <= 32
    assert bucketing.crop_origin(128, 70, 64, 96, center=True, generator=None) == (3, 16)


def test_masks_come_from_the_alpha_channel_or_a_mask_file_of_the_same_size(tmp_path):
    image = Image.new("RGBA", (8, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0, 0))
    mask = bucketing.load_mask(image)
    assert mask.mode == "L" and mask.size == (8, 4) and mask.getpixel((0, 0)) == 0 and mask.getpixel((1, 0)) == 255
    path = str(tmp_path / "a.mask.png")
    Image.new("L", (8, 4), 128).save(path)
    assert bucketing.mask_path_for(str(tmp_path / "a.png")) == path
    assert bucketing.load_mask(image.convert("RGB"), path).getpixel((3, 3)) == 128
    Image.new("L", (4, 4), 128).save(path)
    with pytest.raises(cli.InputError, match=r"a\.mask\.png is 4x4 but a\.png is 8x4"):
        bucketing.load_mask(image, path, name="a.png")
    with pytest.raises(cli.InputError, match="no alpha channel and no mask"):
        bucketing.load_mask(image.convert("RGB"), name="a.png")


def test_image_size_reads_the_header_as_datasets_decodes_it(tmp_path):
    from datasets import Image as ImageFeature

    image = Image.new("RGB", (40, 24))
    exif = image.getexif()
    exif[0x0112] = 6  # stored on its side: displayed 24 wide, 40 tall
    path = str(tmp_path / "rotated.jpg")
    image.save(path, exif=exif)
    decoded = ImageFeature().decode_example({"path": path, "bytes": None})
    assert bucketing.image_size({"path": path, "bytes": None}) == (decoded.height, decoded.width) == (40, 24)
    assert bucketing.image_size({"path": None, "bytes": open(path, "rb").read()}) == (40, 24)


def test_mask_files_are_not_training_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    Image.new("L", (8, 8)).save(tmp_path / "cat.mask.png")
    Image.new("L", (8, 8)).save(tmp_path / "lonely.mask.png")  # no image beside it: an image of its own
    assert [path.split("/")[-1] for path in cli.image_files(str(tmp_path))] == ["cat.png", "lonely.mask.png"]


def test_masked_loss_equals_the_unmasked_loss_for_an_all_ones_mask_and_ignores_masked_out_pixels():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 8, 12, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 8, 12, generator=generator)
    ones = bucketing.mask_to_latents(torch.ones(2, 1, 64, 96))
    assert ones.shape == (2, 1, 8, 12)
    weights = torch.tensor([0.5, 2.0])
    assert torch.equal(objectives.diffusion_loss(prediction, target, mask=ones), objectives.diffusion_loss(prediction, target))
    assert torch.equal(objectives.diffusion_loss(prediction, target, weights, mask=ones),
                       objectives.diffusion_loss(prediction, target, weights))
    # The left half of the image trains, the right half is ignored: no gradient reaches the right half, and the loss
    # is the mean error over the left half alone.
    pixels = torch.zeros(2, 1, 64, 96)
    pixels[..., :48] = 1
    mask = bucketing.mask_to_latents(pixels)
    loss = objectives.diffusion_loss(prediction, target, mask=mask)
    loss.backward()
    assert torch.count_nonzero(prediction.grad[..., 6:]) == 0 and torch.count_nonzero(prediction.grad[..., :6]) > 0
    left = ((prediction[..., :6] - target[..., :6]) ** 2).mean()
    assert torch.allclose(loss, left)
    # A partially covered latent pixel gets a fractional weight (the mean of its 8x8 block).
    pixels[..., :52] = 1
    assert bucketing.mask_to_latents(pixels)[0, 0, 0, 6] == 0.5


class _Keys(torch.utils.data.Dataset):
    """A dataset whose examples are the (epoch, index) keys the samplers give it."""

    def __len__(self):
        return 12

    def __getitem__(self, key):
        return key


@pytest.fixture
def accelerate_state_reset():
    """prepare_data_loader creates accelerate's process state; later in-process tests of the same worker (such as
    helpers.fail_in_process) must find none."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("bucketed", [False, True])
def test_a_resumed_epoch_on_a_sharded_loader_follows_its_own_order(bucketed, accelerate_state_reset):
    """Rank 1 of 2, resumed one batch into epoch 2 (accelerate's sharding, then skip_first_batches): after
    randomness.set_epoch it yields what the uninterrupted epoch 2 gives that rank from its second batch on, for both
    samplers. (accelerate's own set_epoch does not reach a sampler behind these wrappers.)"""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    def loader_and_sampler():
        run_state = randomness.RunState(seed=5)
        if bucketed:
            sampler = bucketing.BucketBatchSampler([(64, 96)] * 6 + [(96, 64)] * 6, 2, run_state, stream=1)
            loader = torch.utils.data.DataLoader(_Keys(), batch_sampler=sampler, collate_fn=list)
        else:
            sampler = randomness.EpochSampler(12, run_state, stream=1)
            loader = torch.utils.data.DataLoader(_Keys(), batch_size=2, sampler=sampler, collate_fn=list)
        return prepare_data_loader(loader, num_processes=2, process_index=1, put_on_device=False), sampler

    loader, sampler = loader_and_sampler()
    randomness.set_epoch(loader, sampler, 2)
    straight = list(loader)
    loader, sampler = loader_and_sampler()
    resumed_loader = skip_first_batches(loader, 1)
    randomness.set_epoch(resumed_loader, sampler, 2)
    assert list(resumed_loader) == straight[1:]
    loader, sampler = loader_and_sampler()
    randomness.set_epoch(loader, sampler, 0)
    assert list(loader) != straight  # the order does depend on the epoch
