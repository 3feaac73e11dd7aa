"""Restorable randomness and data order: seeds derived from (seed, stream, epoch, index), the epoch sampler, and where a
resumed run continues, so that N steps straight and N/2 + resume + N/2 draw exactly the same (SPEC §5).
"""

import math
import os

import numpy as np
import torch


def derive_seed(*keys):
    """A well-mixed 63-bit seed from integers (run seed, stream, epoch, index, rank, ...).

    Randomness derived this way depends only on where it is used, not on how much randomness was drawn before, so a
    resumed run draws exactly what the uninterrupted run drew, whatever the data loader workers did.
    """
    # The key count goes first: SeedSequence treats trailing zeros as absent, so (a, b) would equal (a, b, 0).
    entropy = [len(keys)] + [int(key) % (1 << 64) for key in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_generator(device, *keys):
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def resolve_seed(seed, accelerator):
    """The run's base seed: `--seed` if given, otherwise one drawn on the main process and shared with all ranks."""
    if seed is not None:
        return seed
    from accelerate.utils import broadcast_object_list

    drawn = [int.from_bytes(os.urandom(4), "little")]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn, from_process=0)
    return drawn[0]


def run_seed(args, accelerator):
    """The run's base seed, known before the data is built: a resumed run's is its checkpoint's (the RunState every
    script registers first; accelerate restores it again with the rest of the state), otherwise `resolve_seed`. A
    --max_train_samples subset, and so the bucketed batches and the number of steps per epoch, depend on it."""
    saved = os.path.join(args.resume_path, "custom_checkpoint_0.pkl") if args.resume_path else None
    if saved and os.path.isfile(saved):
        state = torch.load(saved, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "seed" in state:
            return state["seed"]
    return resolve_seed(args.seed, accelerator)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) pairs: a shuffle of range(num_samples) that depends only on the run seed and the epoch.

    Every rank computes the same order (accelerate then gives each rank its share of each batch), a resumed run
    recomputes it, and the dataset receives the epoch with each index to derive per-sample augmentation randomness.
    Start each epoch with `set_epoch(loader, sampler, epoch)` (below).
    """

    def __init__(self, num_samples, run_state, stream, shuffle=True):
        self.num_samples, self.run_state, self.stream, self.shuffle = num_samples, run_state, stream, shuffle
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            generator = make_generator("cpu", self.run_state.seed, self.stream, self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        return iter([(self.epoch, index) for index in order])


def set_epoch(loader, sampler, epoch):
    """Start an epoch on the (prepared, maybe skipping) data loader and on its sampler (`EpochSampler` or
    `BucketBatchSampler`). accelerate's `loader.set_epoch` does not reach a sampler behind its sharding wrapper on
    2+ processes (a batch sampler) or behind `skip_first_batches` on top of it (a resumed epoch): without the
    second call such an epoch would silently replay epoch 0's order."""
    loader.set_epoch(epoch)
    sampler.set_epoch(epoch)


def steps_per_epoch(num_batches, num_processes, gradient_accumulation_steps):
    """Optimizer steps in one epoch: accelerate gives each rank ceil(batches / processes) batches, and the last,
    possibly partial, accumulation of an epoch still makes a step."""
    return math.ceil(math.ceil(num_batches / num_processes) / gradient_accumulation_steps)


def resume_position(global_step, steps_per_epoch, gradient_accumulation_steps):
    """(epoch, batches of it to skip) where a run that has made `global_step` optimizer steps continues."""
    epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    return epoch, steps_into_epoch * gradient_accumulation_steps


class RunState:
    """Values a resumed run must take from its checkpoint rather than from the command line (the base seed)."""

    def __init__(self, seed):
        self.seed = seed

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state):
        self.seed = state["seed"]
