"""Distributed engines: the DeepSpeed settings that come from the command line, the engines a script refuses, the
trained weights gathered whole under ZeRO-3, and frozen models kept whole beside it (SPEC §6).
"""

import contextlib
import os

import torch

from trainkit.cli import InputError


def adopt_engine_settings(accelerator, train_batch_size, max_grad_norm, supports_zero3=False):
    """Under DeepSpeed, give its config what the command line says; refuse FSDP; a no-op otherwise. Call right after
    creating the Accelerator, before `prepare`.

    DeepSpeed owns gradient accumulation (accelerate fills it from `--gradient_accumulation_steps`) and clipping
    (`accelerator.clip_grad_norm_` does nothing under it), so its `auto` clipping becomes `--max_grad_norm` and its
    `auto` batch sizes become `--train_batch_size` per process. Without an accelerator device (CPU runs, as in the
    tests) accelerate counts one process of rank 0 on every rank although DeepSpeed started a group of several; the
    real rank and world size are restored so that data sharding and main-process-only writes stay correct.
    ZeRO-3 is refused unless the script `supports_zero3` (gathers its sharded weights with `whole_model` wherever it
    saves or validates them).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # accelerate runs FSDP only on GPUs, which this project has not had to build and test it on, and the scripts
        # read whole weights (saving, validation, EMA) that FSDP keeps sharded between steps.
        zero3 = ", or configs/launch/deepspeed_zero3.yaml to shard the weights too" if supports_zero3 else ""
        raise InputError(f"PyTorch FSDP is not supported yet; use configs/launch/deepspeed_zero2.yaml{zero3}")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    if plugin.zero_stage == 3:
        if not supports_zero3:
            # LoRA layers and new token embeddings are a few trained weights inside a frozen model that ZeRO-3 would
            # shard with them, and their saving reads them on the main process alone: refuse rather than save shards.
            raise InputError(
                "DeepSpeed ZeRO-3 is not supported by this script (it trains a few weights inside a frozen model, "
                "which ZeRO-3 would shard with them); use configs/launch/deepspeed_zero2.yaml or "
                "configs/launch/deepspeed_zero2_offload.yaml (optimizer states in CPU memory)"
            )
        # diffusers' EMAModel.step gathers ZeRO-3 parameters through a module-level `deepspeed` that
        # diffusers.training_utils imports only if ZeRO-3 was configured before it was first imported (it was not:
        # NameError at the first EMA step).
        import deepspeed
        import diffusers.training_utils

        diffusers.training_utils.deepspeed = deepspeed
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != accelerator.num_processes:
        from accelerate import PartialState

        rank = torch.distributed.get_rank()
        # Both shared states: AcceleratorState holds a copy of PartialState's values.
        for state in (PartialState(), accelerator.state):
            state.num_processes = torch.distributed.get_world_size()
            state.process_index = rank
            state.local_process_index = int(os.environ.get("LOCAL_RANK", rank))
    config = plugin.deepspeed_config
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = train_batch_size
    if config.get("train_batch_size") == "auto":
        # DeepSpeed derives it from micro batch x accumulation x world size.
        del config["train_batch_size"]


def whole_model(accelerator, model, device=None):
    """The trained (prepared) `model` with all of its weights in one module, for saving and validation.

    Under DeepSpeed ZeRO-3 each rank holds only a shard of every weight, so every rank must call this together: each
    gets a full fp32 copy, assembled from the optimizer's fp32 shards (fp16/bf16 training still saves full precision)
    and usable without collectives (ranks may then render different numbers of validation images). The copy goes to
    `device`, by default the accelerator's (for validation); callers that only save it pass `device="cpu"`, so that a
    save does not hold a second whole fp32 model in accelerator memory on every rank. Otherwise the unwrapped model
    itself, where it is, at no cost (`device` does not move it)."""
    unwrapped = accelerator.unwrap_model(model)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return unwrapped
    from deepspeed.utils import safe_get_full_fp32_param

    parameters = dict(unwrapped.named_parameters())
    state_dict = {
        name: (safe_get_full_fp32_param(parameters[name]) if name in parameters else value).detach().cpu()
        for name, value in unwrapped.state_dict().items()
    }
    copy = type(unwrapped).from_config(unwrapped.config)
    copy.load_state_dict(state_dict)
    return copy.to(accelerator.device if device is None else device).train(unwrapped.training)


@contextlib.contextmanager
def frozen_models_outside_zero3():
    """Load the frozen models (VAE, text encoder, a UNet that is not trained) whole under DeepSpeed ZeRO-3: only the
    model DeepSpeed prepares may be partitioned, and a partitioned frozen model cannot run its own forward.

    accelerate's `zero3_init_context_manager(enable=False)` is not enough: it re-registers a stage-3 config with
    transformers, whose `from_pretrained` then partitions the model anyway. So the config is taken away while the
    frozen models load, and registered again afterwards for the trained model."""
    import accelerate
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin if accelerate.state.is_initialized() else None
    if plugin is None or not plugin.is_zero3_init_enabled():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    with plugin.zero3_init_context_manager(enable=False):
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()
