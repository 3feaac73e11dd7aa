"""Loaded at start-up by a training script the bench runs on CUDA (bench.py puts this folder on PYTHONPATH): at exit,
writes the process's peak CUDA memory to $BENCH_CUDA_PEAK_FILE. Imports nothing heavy, so start-up is unchanged."""

import atexit
import json
import os
import sys


def _write_cuda_peak():
    torch = sys.modules.get("torch")  # only if the script imported it
    if torch is None or not torch.cuda.is_initialized():
        return
    with open(os.environ["BENCH_CUDA_PEAK_FILE"], "w") as file:
        json.dump({"cuda_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                   "cuda_peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}, file)


if os.environ.get("BENCH_CUDA_PEAK_FILE"):
    atexit.register(_write_cuda_peak)
