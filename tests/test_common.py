"""The shared module: noise, loss targets and weights, checkpoint safety, preemption, --config."""

import os
import signal
import types

import pytest
import torch
from helpers import REPO

from trainkit import checkpointing, cli, distributed, feature_cache, objectives, randomness

# --------------------------------------------------------------------------------------------------------------------
# Randomness, noise, loss
# --------------------------------------------------------------------------------------------------------------------


def test_derived_seeds_depend_on_every_key_and_nothing_else():
    assert randomness.derive_seed(0, 1, 2) == randomness.derive_seed(0, 1, 2)
    seeds = {randomness.derive_seed(0, 1, 2), randomness.derive_seed(1, 1, 2), randomness.derive_seed(0, 2, 2),
             randomness.derive_seed(0, 1, 3), randomness.derive_seed(0, 1, 2, 0)}
    assert len(seeds) == 5
    assert 0 <= randomness.derive_seed(-5, 2**70) < 2**63


def test_noise_offset_shifts_each_channel_and_perturbation_keeps_target():
    latents = torch.zeros(4, 3, 32, 32)
    plain = objectives.sample_noise(latents, randomness.make_generator("cpu", 1))
    offset = objectives.sample_noise(latents, randomness.make_generator("cpu", 1), noise_offset=1.0)
    assert torch.equal(plain, objectives.sample_noise(latents, randomness.make_generator("cpu", 1)))
    # The offset adds one value per (sample, channel): the per-channel means move, the spatial pattern does not.
    shift = (offset - plain).flatten(2)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-6)
    assert shift[..., 0].abs().mean() > 0.3

    perturbed = objectives.perturb_noise(plain, 0.1, randomness.make_generator("cpu", 2))
    assert 0.05 < (perturbed - plain).std() < 0.15
    assert objectives.perturb_noise(plain, 0.0, None) is plain


def test_loss_targets_follow_the_prediction_type():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    assert objectives.loss_target(scheduler, "epsilon", clean, noise, timesteps) is noise
    assert objectives.loss_target(scheduler, "sample", clean, noise, timesteps) is clean
    velocity = objectives.loss_target(scheduler, "v_prediction", clean, noise, timesteps)
    alpha = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(velocity, alpha * noise - sigma * clean, atol=1e-5)
    with pytest.raises(ValueError):
        objectives.loss_target(scheduler, "x0", clean, noise, timesteps)


def test_min_snr_weights_clip_high_snr_timesteps_only():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([1, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    weights = objectives.min_snr_loss_weights(scheduler, timesteps, 5.0, "epsilon")
    assert snr[0] > 5 and torch.isclose(weights[0], 5.0 / snr[0])
    assert snr[2] < 5 and torch.isclose(weights[2], torch.tensor(1.0))
    v_weights = objectives.min_snr_loss_weights(scheduler, timesteps, 5.0, "v_prediction")
    assert torch.allclose(v_weights, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_weighted_loss_is_a_weighted_mean_of_per_sample_errors():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert objectives.diffusion_loss(prediction, target).item() == pytest.approx(2.5)
    assert objectives.diffusion_loss(prediction, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    state = randomness.RunState(seed=3)
    sampler = randomness.EpochSampler(10, state, stream=1)
    first = list(sampler)
    assert sorted(index for _, index in first) == list(range(10)) and {epoch for epoch, _ in first} == {0}
    assert list(randomness.EpochSampler(10, randomness.RunState(seed=3), stream=1)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert [index for _, index in second] != [index for _, index in first]
    assert {epoch for epoch, _ in second} == {1}


def test_timestep_bias_shifts_the_sampled_distribution_and_none_keeps_uniform_sampling():
    def fraction(weights, low, high, count=20000):
        drawn = objectives.sample_timesteps(count, 1000, randomness.make_generator("cpu", 5), "cpu", weights)
        return ((drawn >= low) & (drawn < high)).float().mean().item()

    # `none`: no weights, and the very draws of plain uniform sampling (SD runs are unchanged by the feature).
    assert objectives.timestep_bias_weights("none", 1000) is None
    assert torch.equal(objectives.sample_timesteps(8, 1000, randomness.make_generator("cpu", 5), "cpu", None),
                       torch.randint(0, 1000, (8,), generator=randomness.make_generator("cpu", 5)))
    assert fraction(None, 750, 1000) == pytest.approx(0.25, abs=0.02)
    # x3 on the last quarter: 0.75 / (0.75 + 0.75) = half of the draws land there.
    later = objectives.timestep_bias_weights("later", 1000, multiplier=3.0, portion=0.25)
    assert later.sum().item() == pytest.approx(1.0) and later[999] == pytest.approx(3 * later[0])
    assert fraction(later, 750, 1000) == pytest.approx(0.5, abs=0.02)
    earlier = objectives.timestep_bias_weights("earlier", 1000, multiplier=3.0, portion=0.5)
    assert fraction(earlier, 0, 500) == pytest.approx(0.75, abs=0.02)
    # A multiplier below 1 biases away: [200, 500) at x0.1.
    ranged = objectives.timestep_bias_weights("range", 1000, multiplier=0.1, begin=200, end=500)
    assert fraction(ranged, 200, 500) == pytest.approx(0.03 / 0.73, abs=0.01)
    # Restorable: the same generator state draws the same biased timesteps.
    assert torch.equal(objectives.sample_timesteps(16, 1000, randomness.make_generator("cpu", 9), "cpu", later),
                       objectives.sample_timesteps(16, 1000, randomness.make_generator("cpu", 9), "cpu", later))
    with pytest.raises(cli.InputError, match="--timestep_bias_end 2000 is past the scheduler's 1000"):
        objectives.timestep_bias_weights("range", 1000, begin=0, end=2000)


@pytest.mark.parametrize("values, message", [
    ({"strategy": "range", "begin": 500, "end": 500}, "--timestep_bias_begin < --timestep_bias_end, got 500 and 500"),
    ({"strategy": "range", "begin": -1}, "--timestep_bias_begin must be >= 0"),
    ({"portion": 0.0}, "--timestep_bias_portion must be in (0, 1], got 0.0"),
    ({"portion": 1.5, "strategy": "none"}, "--timestep_bias_portion must be in (0, 1], got 1.5"),
    ({"multiplier": 0.0}, "--timestep_bias_multiplier must be > 0"),
])
def test_timestep_bias_checks_name_the_flag(values, message):
    settings = {"strategy": "later", "multiplier": 2.0, "begin": 0, "end": 1000, "portion": 0.25, **values}
    with pytest.raises(cli.InputError) as error:
        objectives.check_timestep_bias(**settings)
    assert message in str(error.value)
    objectives.check_timestep_bias("range", 2.0, 100, 200, 1.0)  # valid


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------


def make_checkpoints(folder, *names):
    for name in names:
        os.makedirs(os.path.join(folder, name))
        open(os.path.join(folder, name, "state.bin"), "w").write(name)


def test_flow_matching_draws_upstreams_timesteps_sigmas_inputs_and_weighted_loss():
    """FLUX.1's flow matching as upstream's train_dreambooth_lora_flux.py computes it, from a restorable generator:
    u from compute_density_for_timestep_sampling -> index into the scheduler's timesteps -> the sigma of that timestep
    (upstream looks it up by value), x = (1 - sigma) latents + sigma noise, target noise - latents, and the per-sample
    mean of compute_loss_weighting_for_sd3's weights times the squared error."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # shifted training sigmas, as FLUX.1 [schnell]'s
    latents, noise, prediction = (torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3))
    for scheme in objectives.FLOW_WEIGHTING_SCHEMES:
        timesteps, sigmas = objectives.sample_flow_matching_sigmas(scheduler, 4, scheme, torch.Generator().manual_seed(5),
                                                               "cpu", 0.0, 1.0, 1.29)
        again = objectives.sample_flow_matching_sigmas(scheduler, 4, scheme, torch.Generator().manual_seed(5), "cpu")
        assert torch.equal(timesteps, again[0]) and torch.equal(sigmas, again[1])
        u = compute_density_for_timestep_sampling(scheme, 4, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(5))
        expected_timesteps = scheduler.timesteps[(u * 1000).long()]
        expected_sigmas = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()]
                                       for t in expected_timesteps]).reshape(4, 1, 1, 1)
        assert torch.equal(timesteps, expected_timesteps) and torch.equal(sigmas, expected_sigmas)

        noisy, target = objectives.flow_matching_inputs(latents, noise, sigmas)
        assert torch.equal(noisy, (1.0 - sigmas) * latents + sigmas * noise) and torch.equal(target, noise - latents)
        weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
        upstream = torch.mean((weighting * (prediction - target) ** 2).reshape(4, -1), 1).mean()
        loss = objectives.flow_matching_loss(prediction, target, sigmas, scheme)
        torch.testing.assert_close(loss, upstream, rtol=1e-6, atol=0)
        ones = torch.ones(4, 1, 6, 6)
        assert torch.equal(objectives.flow_matching_loss(prediction, target, sigmas, scheme, mask=ones), loss)
    # The schemes differ: logit_normal concentrates timesteps mid-way, sigma_sqrt and cosmap weight the loss.
    uniform = objectives.sample_flow_matching_sigmas(scheduler, 4000, "none", torch.Generator().manual_seed(0), "cpu")[1]
    logit = objectives.sample_flow_matching_sigmas(scheduler, 4000, "logit_normal", torch.Generator().manual_seed(0),
                                               "cpu")[1]
    assert logit.std() < uniform.std()



def test_latest_ignores_partial_and_unrelated_folders(tmp_path):
    folder = str(tmp_path)
    assert checkpointing.resolve_resume_checkpoint(folder, "latest") is None
    make_checkpoints(folder, "checkpoint-2", "checkpoint-10", ".partial-checkpoint-12", "checkpoint-x", "logs")
    assert checkpointing.resolve_resume_checkpoint(folder, "latest") == os.path.join(folder, "checkpoint-10")
    assert checkpointing.resolve_resume_checkpoint(folder, "checkpoint-2") == os.path.join(folder, "checkpoint-2")
    absolute = os.path.join(folder, "checkpoint-2")
    assert checkpointing.resolve_resume_checkpoint("/elsewhere", absolute) == absolute
    assert checkpointing.checkpoint_step(absolute + "/") == 2
    for missing in ("checkpoint-3", ".partial-checkpoint-12", "logs"):
        with pytest.raises(cli.InputError, match="--resume_from_checkpoint"):
            checkpointing.resolve_resume_checkpoint(folder, missing)


def test_rotation_keeps_the_newest_and_clears_partial_writes(tmp_path):
    folder = str(tmp_path)
    make_checkpoints(folder, "checkpoint-2", "checkpoint-4", "checkpoint-10", ".partial-checkpoint-12")
    checkpointing.rotate_checkpoints(folder, 2)
    assert sorted(os.listdir(folder)) == ["checkpoint-10", "checkpoint-4"]
    checkpointing.rotate_checkpoints(folder, None)
    assert sorted(os.listdir(folder)) == ["checkpoint-10", "checkpoint-4"]


class FakeAccelerator:
    """What save_checkpoint needs from accelerate, on one process; save_state writes one file."""

    is_main_process = True
    num_processes = 1

    def __init__(self, fail=False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def print(self, *args):
        print(*args)

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "model.bin"), "w").write("weights")
        if self.fail:
            raise OSError("disk full")


def test_save_checkpoint_is_atomic_and_rotates_after_success(tmp_path):
    folder = str(tmp_path)
    make_checkpoints(folder, "checkpoint-2", "checkpoint-4")
    path = checkpointing.save_checkpoint(FakeAccelerator(), folder, 6, total_limit=2)
    assert path == os.path.join(folder, "checkpoint-6")
    assert sorted(os.listdir(folder)) == ["checkpoint-4", "checkpoint-6"]

    with pytest.raises(OSError):
        checkpointing.save_checkpoint(FakeAccelerator(fail=True), folder, 8, total_limit=1)
    # The failed write is not a checkpoint, and nothing was rotated away because of it.
    assert checkpointing.resolve_resume_checkpoint(folder, "latest") == os.path.join(folder, "checkpoint-6")
    assert {"checkpoint-4", "checkpoint-6"} <= set(os.listdir(folder))

    # Saving a step that exists (after resuming from an older checkpoint) replaces it whole.
    checkpointing.save_checkpoint(FakeAccelerator(), folder, 4, total_limit=None)
    assert sorted(os.listdir(os.path.join(folder, "checkpoint-4"))) == ["model.bin"]
    assert not [name for name in os.listdir(folder) if name.startswith(checkpointing.PARTIAL_PREFIX)]


def test_checkpointer_saves_on_schedule_and_once_more_when_stopped(tmp_path, capsys):
    folder = str(tmp_path)
    preemption = types.SimpleNamespace(stop_requested=lambda: 0)
    checkpointer = checkpointing.Checkpointer(FakeAccelerator(), folder, 2, None, preemption)
    for step in (1, 2, 3):
        checkpointer.save_if_due(step)
        assert checkpointer.stop_if_requested(step) == 0
    assert sorted(os.listdir(folder)) == ["checkpoint-2"]

    preemption.stop_requested = lambda: 143
    checkpointer.save_if_due(4)
    written = os.stat(os.path.join(folder, "checkpoint-4", "model.bin")).st_mtime_ns
    assert checkpointer.stop_if_requested(4) == 143  # just saved: not written twice
    assert os.stat(os.path.join(folder, "checkpoint-4", "model.bin")).st_mtime_ns == written
    assert checkpointer.stop_if_requested(5) == 143  # mid-interval: the stop step gets its own checkpoint
    assert sorted(os.listdir(folder)) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert f"checkpoint saved to {os.path.join(folder, 'checkpoint-5')}" in capsys.readouterr().out


def test_preemption_flag_is_set_by_signals_and_maps_to_exit_status():
    previous = {signum: signal.getsignal(signum) for signum in checkpointing.PreemptionHandler.EXIT_STATUS}
    try:
        handler = checkpointing.PreemptionHandler(types.SimpleNamespace(num_processes=1))
        assert handler.stop_requested() == 0
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.stop_requested() == 130
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.stop_requested() == 143
        # A second Ctrl-C interrupts at once.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)


# --------------------------------------------------------------------------------------------------------------------
# --config
# --------------------------------------------------------------------------------------------------------------------


def make_parser():
    parser = cli.ArgumentParser(prog="train.py")
    parser.add_argument("--model", required=True)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mode", choices=["a", "b"], default="a")
    parser.add_argument("--prompts", nargs="+", default=None)
    parser.add_argument("--flag", action="store_true")
    return parser


def test_config_values_apply_and_command_line_wins(yaml_file):
    path = yaml_file("model: tiny\nlearning_rate: 1e-3\nsteps: 5\nmode: b\nprompts: [x, y]\nflag: true\n")
    args = cli.parse_args_with_config(make_parser(), ["--config", path, "--steps", "7"])
    assert (args.model, args.learning_rate, args.steps, args.mode, args.prompts, args.flag) == \
        ("tiny", 1e-3, 7, "b", ["x", "y"], True)


@pytest.mark.parametrize("text, message", [
    ("model: m\nstep: 3\n", "unknown key 'step'"),
    ("model: m\nsteps: many\n", "invalid value 'many'"),
    ("model: m\nmode: c\n", "'c' is not one of"),
    ("model: m\nflag: 1\n", "must be true or false"),
    ("- a\n- b\n", "must hold a mapping"),
    ("model: [unclosed\n", "cannot read"),
])
def test_config_errors_are_one_line_and_name_the_key(yaml_file, capsys, text, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args_with_config(make_parser(), ["--config", yaml_file(text)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


def test_missing_config_file_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args_with_config(make_parser(), ["--config", "/nonexistent.yaml", "--model", "m"])
    assert "--config: file '/nonexistent.yaml' does not exist" in capsys.readouterr().err


def test_epoch_arithmetic_matches_what_accelerate_hands_each_rank():
    # 7 batches over 2 ranks: 4 batches each (accelerate evens them out); accumulation 2 gives 2 steps per epoch.
    assert randomness.steps_per_epoch(7, 2, 2) == 2
    # A partial accumulation at the end of an epoch still steps: 3 batches at accumulation 2 are 2 steps.
    assert randomness.steps_per_epoch(3, 1, 2) == 2
    assert randomness.steps_per_epoch(8, 1, 1) == 8
    # After 5 steps of 2 per epoch: epoch 2, skipping the batches of its first step.
    assert randomness.resume_position(5, 2, 3) == (2, 3)
    assert randomness.resume_position(4, 2, 3) == (2, 0)
    assert randomness.resume_position(0, 4, 1) == (0, 0)


# --------------------------------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------------------------------


class _Rank:
    """What FeatureCache.fill needs of an Accelerator: one rank of a group whose others never ran (a node that does
    not share the cache folder)."""

    def __init__(self, index, count):
        self.process_index, self.num_processes, self.is_main_process = index, count, index == 0

    def wait_for_everyone(self):
        pass


def test_feature_cache_keys_split_partial_files_and_settings(tmp_path):
    settings = {"vae": "abc", "resolution": 64}
    cache = feature_cache.FeatureCache(str(tmp_path), "latents", settings)
    assert cache.folder == feature_cache.FeatureCache(str(tmp_path), "latents", dict(settings)).folder
    assert cache.folder != feature_cache.FeatureCache(str(tmp_path), "latents", {**settings, "resolution": 32}).folder

    inputs = {feature_cache.fingerprint("image", index): torch.full((2,), float(index)) for index in range(5)}
    encoded = []

    def encode(values):
        encoded.extend(float(value[0]) for value in values)
        return [{"latent_dist": value * 2} for value in values]

    # A crash mid-write leaves only a .partial file: the entry is still missing.
    first = next(iter(inputs))
    os.makedirs(os.path.dirname(cache.path(first)))
    with open(cache.path(first) + ".1234.partial", "wb") as file:
        file.write(b"half an entry")
    assert cache.missing(inputs) == list(inputs)

    # Rank 1 of 2 computes its share (keys 1 and 3) in one batch of 2, then, as its node does not see rank 0's
    # entries, the rest.
    cache.fill(_Rank(1, 2), inputs, encode, batch_size=2)
    assert encoded[:2] == [1.0, 3.0] and sorted(encoded) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert cache.missing(inputs) == []
    assert torch.equal(cache.load(feature_cache.fingerprint("image", 3))["latent_dist"], torch.full((2,), 6.0))
    encoded.clear()
    cache.fill(_Rank(0, 2), inputs, encode, batch_size=2)
    assert encoded == []
    assert os.path.isfile(os.path.join(cache.folder, "settings.json"))


def test_fingerprints_follow_content(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4), "red").save(path)
    before = feature_cache.image_fingerprint({"path": str(path), "bytes": None})
    assert feature_cache.image_fingerprint({"path": str(path), "bytes": None}) == before
    Image.new("RGB", (4, 4), "blue").save(path)
    assert feature_cache.image_fingerprint({"path": str(path), "bytes": None}) != before
    # Images held in the dataset are keyed by their bytes, wherever they came from.
    assert feature_cache.image_fingerprint({"bytes": b"png", "path": "x.png"}) == feature_cache.image_fingerprint({"bytes": b"png"})

    model = torch.nn.Linear(3, 2)
    fingerprint = feature_cache.model_fingerprint(model)
    assert feature_cache.model_fingerprint(model) == fingerprint
    with torch.no_grad():
        model.bias[0] += 1e-6
    assert feature_cache.model_fingerprint(model) != fingerprint
    assert feature_cache.model_fingerprint(model.to(torch.bfloat16)) != feature_cache.model_fingerprint(model.float())


def test_fsdp_is_refused_in_one_line_naming_the_deepspeed_configs_to_use():
    """accelerate runs FSDP only on GPUs, so no launch on a CPU reaches this check; it is called here with what it
    reads of the Accelerator."""
    from accelerate.utils import DistributedType

    fsdp = types.SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(cli.InputError) as refused:
        distributed.adopt_engine_settings(fsdp, 2, 1.0, supports_zero3=True)
    assert str(refused.value) == ("PyTorch FSDP is not supported yet; use configs/launch/deepspeed_zero2.yaml, or "
                                  "configs/launch/deepspeed_zero3.yaml to shard the weights too")
    with pytest.raises(cli.InputError) as refused:
        distributed.adopt_engine_settings(fsdp, 2, 1.0)
    assert str(refused.value) == "PyTorch FSDP is not supported yet; use configs/launch/deepspeed_zero2.yaml"
    for path in ("configs/launch/deepspeed_zero2.yaml", "configs/launch/deepspeed_zero3.yaml"):
        assert os.path.exists(os.path.join(REPO, path))

    plain = types.SimpleNamespace(distributed_type=DistributedType.NO,
                                  state=types.SimpleNamespace(deepspeed_plugin=None))
    assert distributed.adopt_engine_settings(plain, 2, 1.0) is None


def test_a_loaded_models_fingerprint_reads_no_weight_but_follows_its_weight_files(tmp_path, monkeypatch):
    """Issue 25 #7: a model loaded through the family loaders is keyed on its weight files (path, size, time), not on
    a read of every weight at every start (9.5 GB of T5 for FLUX.1); a changed weight file still changes the key."""
    from argparse import Namespace

    from safetensors.torch import load_file, save_file
    from tiny_sd import build_tiny_sd

    from trainkit.families import loading

    folder = build_tiny_sd(str(tmp_path / "tiny_sd"))
    args = Namespace(pretrained_model_name_or_path=folder, revision=None, variant=None,
                     pretrained_vae_model_name_or_path=None)
    def fingerprint_unread(model):
        with monkeypatch.context() as patch:
            patch.setattr(type(model), "state_dict", lambda self: pytest.fail("the weights were read"))
            return feature_cache.model_fingerprint(model)

    before = fingerprint_unread(loading.load_vae(args))
    assert fingerprint_unread(loading.load_vae(args)) == before
    # Another variant of the same files, or the same weights in another dtype, is another key.
    other_variant = feature_cache.remember_source(loading.load_vae(args), f"{folder}/vae", "fp16")
    assert fingerprint_unread(other_variant) != before
    assert fingerprint_unread(loading.load_vae(args).to(torch.bfloat16)) != before
    # Rewrite the weight file with one weight changed: a new key.
    weights = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    assert fingerprint_unread(loading.load_vae(args)) != before
    # A text encoder loaded part by part is keyed the same way.
    from transformers import CLIPTextModel

    encoder = loading.load_part(args, "text_encoder", CLIPTextModel.from_pretrained)
    assert getattr(encoder, feature_cache.SOURCE_ATTRIBUTE)[0] == os.path.join(folder, "text_encoder")


def test_whole_model_without_zero3_is_the_unwrapped_model_where_it_is():
    """Issue 25 #9: savers ask for the gathered ZeRO-3 copy on the CPU (`device="cpu"`); without ZeRO-3 there is no
    copy, and `device` moves nothing: the prepared model's own module comes back, same parameters, same device. (The
    ZeRO-3 copy itself is checked by the ZeRO-3 launches in test_distributed.py: each checkpoint's gathered weights
    load and equal the final ones.)"""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        prepared, _ = accelerator.prepare(model, optimizer)
        for device in (None, "cpu", "meta"):  # "meta" would leave an empty module, had it been moved
            whole = distributed.whole_model(accelerator, prepared, device=device)
            assert whole is model and whole.weight.device.type == "cpu"
            assert whole is distributed.whole_model(accelerator, prepared)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
