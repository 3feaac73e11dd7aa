"""Checkpoint safety: atomic `checkpoint-N` writes, rotation after a complete save, `latest` that never sees a partial
checkpoint, resume, and the preemption flag every rank agrees on at an optimizer-step boundary (SPEC §5).
"""

import logging
import os
import re
import shutil
import signal
import sys

import torch

from trainkit.cli import InputError

logger = logging.getLogger(__name__)


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


# Checkpoints are written under this prefix and renamed when complete; the name does not contain "checkpoint-N"
# at its start, so neither `latest` nor the diffusers-style `startswith("checkpoint")` listings ever see one.
PARTIAL_PREFIX = ".partial-"


def list_checkpoints(output_dir):
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def resolve_resume_checkpoint(output_dir, value):
    """The checkpoint folder `--resume_from_checkpoint value` names, or None to start fresh.

    `latest` picks the newest complete checkpoint (None when there is none); a `checkpoint-N` name is looked up in
    `output_dir`, a path is used as given. A named checkpoint that does not exist is an InputError.
    """
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    for candidate in (value, os.path.join(output_dir, os.path.basename(os.path.normpath(value)))):
        if os.path.isdir(candidate) and CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(candidate))):
            return candidate
    raise InputError(
        f"--resume_from_checkpoint {value!r}: no such checkpoint (expected a checkpoint-N folder in {output_dir!r}"
        " or a path to one, or 'latest')"
    )


def checkpoint_step(path):
    return int(CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(path))).group(1))


def save_checkpoint(accelerator, output_dir, step, total_limit=None):
    """Write `output_dir/checkpoint-{step}` atomically and return its path.

    Every rank calls this (accelerate's save_state runs on every rank). The state is written under a partial name,
    flushed to disk, and renamed by the main process; only then are old checkpoints beyond `total_limit` removed.
    A crash at any point leaves the previous checkpoints intact and no `checkpoint-N` that is incomplete.
    """
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    partial_path = os.path.join(output_dir, f"{PARTIAL_PREFIX}checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial_path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(partial_path)
        if os.path.exists(final_path):
            # Re-saving a step (e.g. after resuming from an older checkpoint): retire the old copy first.
            retired = os.path.join(output_dir, f"{PARTIAL_PREFIX}retired-checkpoint-{step}")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final_path, retired)
            os.replace(partial_path, final_path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(partial_path, final_path)
        _fsync_dir(output_dir)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final_path


def resume_from_checkpoint(accelerator, args, run_state):
    """Restore `args.resume_path` (resolved by validation from --resume_from_checkpoint) into the prepared objects
    and return the optimizer step to continue from; 0 for a new run, which `latest` without a checkpoint says."""
    if args.resume_path is None:
        if args.resume_from_checkpoint == "latest":
            _main_log(accelerator, f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}, "
                                   "starting a new run")
        return 0
    _main_log(accelerator, f"Resuming from {args.resume_path}")
    accelerator.load_state(args.resume_path)
    if args.seed is not None and args.seed != run_state.seed:
        _main_log(accelerator, f"--seed {args.seed} ignored: the checkpoint's run uses seed {run_state.seed}",
                  logging.WARNING)
    return checkpoint_step(args.resume_path)


class Checkpointer:
    """The checkpoint side of the training loop, identical in every script: `checkpoint-N` every
    `--checkpointing_steps`, and on a preemption request a checkpoint at the current step (unless one was just
    written) and the exit status to return. Every rank calls both methods after every optimizer step."""

    def __init__(self, accelerator, output_dir, checkpointing_steps, total_limit, preemption):
        self.accelerator, self.output_dir = accelerator, output_dir
        self.checkpointing_steps, self.total_limit, self.preemption = checkpointing_steps, total_limit, preemption
        self.last_step, self.last_path = None, None

    def save(self, step):
        self.last_path = save_checkpoint(self.accelerator, self.output_dir, step, self.total_limit)
        self.last_step = step
        _main_log(self.accelerator, f"Saved {self.last_path}")
        return self.last_path

    def save_if_due(self, step):
        if step % self.checkpointing_steps == 0:
            self.save(step)

    def stop_if_requested(self, step):
        """0 to go on; otherwise the exit status (143 or 130), after the checkpoint of `step` is on disk."""
        status = self.preemption.stop_requested()
        if status:
            if self.last_step != step:
                self.save(step)
            self.accelerator.print(
                f"Stopped at step {step}: checkpoint saved to {self.last_path}. "
                "Continue with --resume_from_checkpoint latest."
            )
        return status


def _main_log(accelerator, message, level=logging.INFO):
    if accelerator.is_main_process:
        logger.log(level, message)


def rotate_checkpoints(output_dir, total_limit):
    """Keep the newest `total_limit` complete checkpoints; remove older ones and leftovers of interrupted writes."""
    for name in os.listdir(output_dir):
        if name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if not total_limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        logger.info(f"Removing old checkpoint {path} (--checkpoints_total_limit={total_limit})")
        shutil.rmtree(path)


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_dir(root)


def _fsync_dir(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class PreemptionHandler:
    """Turns SIGTERM, SIGUSR1 and SIGINT into a request to stop at the next optimizer-step boundary.

    `stop_requested()` is called by every rank after every optimizer step and returns the same answer on
    all of them (the exit status to use, or 0), so that all ranks save the same checkpoint and stop together even
    when the signal reached only one of them. A second SIGINT interrupts at once.
    """

    EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGUSR1: 143, signal.SIGINT: 130}

    def __init__(self, accelerator):
        self.requested = 0
        self._group = None
        if accelerator.num_processes > 1:
            # A CPU (gloo) group: agreeing on the flag never waits for the GPU to finish its queued work.
            self._group = torch.distributed.new_group(backend="gloo")
        for signum in self.EXIT_STATUS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = max(self.requested, self.EXIT_STATUS[signum])
        print(
            f"Received {signal.Signals(signum).name}: stopping after the current optimizer step"
            " and saving a checkpoint.",
            file=sys.stderr,
            flush=True,
        )

    def stop_requested(self):
        if self._group is None:
            return self.requested
        flag = torch.tensor([self.requested], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag.item())
