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


def zero_stage(accelerator):
    """The DeepSpeed ZeRO stage (2 or 3), or None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else plugin.zero_stage


def shard_for_zero3(accelerator, model):
    """Under ZeRO-3, partition `model`'s parameters (trained and frozen) across the ranks now, before `prepare`: each
    rank keeps 1/N of every weight, moved to its device one parameter at a time, so that the whole model never sits on
    one accelerator (DeepSpeed's engine would first move a model not built under `zero.Init` to the device whole). The
    parameters must already be in the engine's dtype (DeepSpeed casts the others, not partitioned ones). Returns True
    when it sharded; a no-op returning False otherwise."""
    if zero_stage(accelerator) != 3:
        return False
    import deepspeed

    # What partitioning reads (the ZeRO section, the precision); accelerate fills the config's `auto` batch and
    # bucket sizes only in `prepare`, and DeepSpeed refuses them unfilled.
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    partitioning = {key: value for key, value in config.items() if key in ("fp16", "bf16")}
    partitioning["zero_optimization"] = {key: value for key, value in config["zero_optimization"].items()
                                         if value != "auto"}
    partitioning.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    # The shards go where the engine would put them (offload_param: the CPU), as DeepSpeed's own partitioning of a
    # model at `prepare` passes them; the buffers, which are never partitioned and which the engine then no longer
    # moves, go to the device.
    offload = partitioning["zero_optimization"].get("offload_param") or {}
    deepspeed.zero.Init(module=model, config_dict_or_path=partitioning, remote_device=offload.get("device"),
                        pin_memory=bool(offload.get("pin_memory", False)))
    for buffer in model.buffers():
        buffer.data = buffer.data.to(accelerator.device)
    return True


def sharded_share(model):
    """(elements this rank holds, elements in all) of `model`'s frozen ZeRO-3-partitioned parameters."""
    frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad]
    held = sum(parameter.ds_tensor.numel() for parameter in frozen if hasattr(parameter, "ds_tensor"))
    return held, sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in frozen)


def trained_weights(accelerator, model):
    """{name: full fp32 tensor on the CPU} of the prepared `model`'s trained parameters (those that require grad), or
    None without DeepSpeed, where the unwrapped model holds them whole as they are.

    Under DeepSpeed every rank must call this together: each trained parameter is assembled from the optimizer's fp32
    shards (fp16/bf16 training still saves full precision). Only these are gathered: a frozen base model under ZeRO-3
    stays sharded."""
    if zero_stage(accelerator) is None:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, parameter in accelerator.unwrap_model(model).named_parameters():
        if parameter.requires_grad:
            full = safe_get_full_fp32_param(parameter)  # None where DeepSpeed keeps no fp32 copy: the weight itself
            state[name] = (parameter if full is None else full).detach().float().cpu()
    return state


def keep_frozen_weights_out_of_checkpoints(accelerator, engine):
    """DeepSpeed writes every frozen weight of its model into each checkpoint (under ZeRO-3, each rank's shard of
    them): for a LoRA on a 12B base, the base again in every checkpoint. The frozen weights come from the base model
    at every start, so the prepared `engine`'s checkpoints leave them out and loading does not expect them; a no-op
    without DeepSpeed."""
    if zero_stage(accelerator) is None:
        return
    import functools

    engine.save_checkpoint = functools.partial(engine.save_checkpoint, exclude_frozen_parameters=True)
    engine.load_checkpoint = functools.partial(engine.load_checkpoint, load_module_strict=False)
