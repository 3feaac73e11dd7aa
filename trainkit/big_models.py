"""Big models on small GPUs (SPEC §13): the frozen denoiser quantized by bitsandbytes under a LoRA trained in fp32
(`--bnb_quantization_config_path`), the VAE and text encoders kept on the CPU between encodings (`--offload`), and
torchao float8 training of the denoiser's linear layers (`--do_fp8_training`): their flags, their checks before any
model loads, and the code that applies them.
"""

import inspect
import json
import os

import torch

from trainkit.cli import InputError, first_line

# The dtype names BitsAndBytesConfig reads (torch attribute names).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
QUANT_STORAGE_NAMES = (*DTYPE_NAMES, "uint8", "int8")
FP8_MIN_CAPABILITY = (8, 9)  # float8 matmuls: Ada Lovelace (sm_89), Hopper (sm_90) and newer


def add_arguments(parser):
    """Upstream's three flags (train_dreambooth_lora_flux2.py, _qwen_image.py), with upstream's defaults."""
    add = parser.add_argument
    add("--bnb_quantization_config_path", type=str, default=None,
        help="A JSON file of bitsandbytes BitsAndBytesConfig keyword arguments, e.g. {\"load_in_4bit\": true, "
             "\"bnb_4bit_quant_type\": \"nf4\"} or {\"load_in_8bit\": true}: the frozen denoiser (UNet or "
             "transformer) is quantized to 4 or 8 bits and the LoRA trains on top of it in fp32 (QLoRA). As upstream, "
             "4-bit layers compute in the --mixed_precision dtype. Runs on CPUs too.")
    add("--offload", action="store_true",
        help="Keep the VAE and the text encoders on the CPU; they visit the GPU only to encode (latents, prompts, "
             "validation images), as upstream.")
    add("--do_fp8_training", action="store_true",
        help="torchao float8 training of the denoiser's linear layers (upstream's flag): needs a CUDA GPU of compute "
             "capability 8.9 or newer (Ada, Hopper, Blackwell) and torchao (pip install torchao). Not with "
             "--bnb_quantization_config_path.")


# ----------------------------------------------------------------------------------------------------------------------
# Checks (before any model loads)
# ----------------------------------------------------------------------------------------------------------------------


def check_arguments(args):
    """Read and check --bnb_quantization_config_path (into `args.bnb_config`, the keyword arguments as JSON gave them,
    or None) and check --do_fp8_training against the machine. Raises InputError."""
    args.bnb_config = None
    if args.bnb_quantization_config_path is not None:
        if args.do_fp8_training:
            raise InputError("--do_fp8_training cannot be used with --bnb_quantization_config_path: float8 training "
                             "recasts the denoiser's linear layers, which bitsandbytes has quantized (as upstream)")
        args.bnb_config = read_bnb_config(args.bnb_quantization_config_path)
    if args.do_fp8_training:
        check_fp8_support()


def bnb_config_keys():
    """The keyword arguments diffusers' BitsAndBytesConfig takes (the ones the JSON file may hold)."""
    from diffusers import BitsAndBytesConfig

    parameters = inspect.signature(BitsAndBytesConfig.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


def read_bnb_config(path):
    """The JSON object of BitsAndBytesConfig keyword arguments at `path`, checked: known keys, exactly one of
    load_in_4bit / load_in_8bit true, values of the right kinds. Raises InputError naming the flag, file and key."""
    flag = f"--bnb_quantization_config_path {path!r}"
    if not os.path.isfile(path):
        raise InputError(f"{flag} is not a file (expected a JSON file of BitsAndBytesConfig keyword arguments)")
    try:
        with open(path) as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{flag}: not valid JSON ({first_line(error)})") from None
    if not isinstance(config, dict):
        raise InputError(f"{flag}: expected a JSON object of BitsAndBytesConfig keyword arguments, e.g. "
                         '{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}')
    known = bnb_config_keys()
    for key, value in config.items():
        if key not in known:
            raise InputError(f"{flag}: {key!r} is not a BitsAndBytesConfig argument (known: {', '.join(known)})")
        expected = _expected_kind(key, value)
        if expected:
            raise InputError(f"{flag}: {key} is {json.dumps(value)}, expected {expected}")
    bits = [key for key in ("load_in_4bit", "load_in_8bit") if config.get(key)]
    if len(bits) != 1:
        found = "both are" if bits else "neither is"
        raise InputError(f"{flag}: set exactly one of load_in_4bit and load_in_8bit to true ({found})")
    return config


def _expected_kind(key, value):
    """What `value` should be for `key`, or "" when it is fine."""
    if key in ("load_in_4bit", "load_in_8bit", "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
               "bnb_4bit_use_double_quant"):
        return "" if isinstance(value, bool) else "true or false"
    if key == "llm_int8_threshold":
        return "" if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else \
            "a number >= 0"
    if key == "llm_int8_skip_modules":
        ok = value is None or (isinstance(value, list) and all(isinstance(name, str) for name in value))
        return "" if ok else "a list of module names"
    if key == "bnb_4bit_quant_type":
        return "" if value in ("nf4", "fp4") else '"nf4" or "fp4"'
    if key == "bnb_4bit_compute_dtype":
        return "" if value is None or value in DTYPE_NAMES else "one of " + ", ".join(DTYPE_NAMES)
    if key == "bnb_4bit_quant_storage":
        return "" if value is None or value in QUANT_STORAGE_NAMES else "one of " + ", ".join(QUANT_STORAGE_NAMES)
    return ""


def check_fp8_support():
    """--do_fp8_training needs torchao and a CUDA GPU of compute capability >= 8.9: one line naming what is missing."""
    import importlib.util

    missing = []
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available():
        missing.append("a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell): this run has none")
    else:
        capability = torch.cuda.get_device_capability()
        if capability < FP8_MIN_CAPABILITY:
            missing.append(f"a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell): "
                           f"{torch.cuda.get_device_name()} is {capability[0]}.{capability[1]}")
    if importlib.util.find_spec("torchao") is None:
        missing.append("torchao (pip install torchao)")
    if missing:
        raise InputError(f"--do_fp8_training needs {' and '.join(missing)}")


def check_engine(args, accelerator):
    """The distributed engines a quantized base cannot run under; call right after creating the Accelerator (before
    any model loads). ZeRO-3 and FSDP shard every parameter into flat buffers of one dtype, which cannot hold
    bitsandbytes' packed weights and their quantization statistics."""
    if getattr(args, "bnb_config", None) is None:
        return
    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        raise InputError("--bnb_quantization_config_path cannot be used with DeepSpeed ZeRO-3, which shards the "
                         "frozen weights that bitsandbytes packs; use ZeRO-2 or a single process per GPU")
    if accelerator.distributed_type == DistributedType.FSDP:
        raise InputError("--bnb_quantization_config_path cannot be used with FSDP")


# ----------------------------------------------------------------------------------------------------------------------
# The quantized frozen denoiser
# ----------------------------------------------------------------------------------------------------------------------


def training_dtype(args):
    """The dtype the frozen weights run in: --mixed_precision's (what accelerate chose), fp32 without it."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(getattr(args, "mixed_precision", None), torch.float32)


def quantize(model, config, compute_dtype, device):
    """Quantize `model`'s nn.Linear layers in place with bitsandbytes as `config` (BitsAndBytesConfig keyword
    arguments) says, onto `device`, and return it frozen, flagged as diffusers flags a model its own bitsandbytes
    quantizer loaded (so that peft gives its LoRA layers the bitsandbytes LoRA classes and pipelines do not recast
    it).

    One path for CPUs and GPUs: diffusers' replace_with_bnb_linear swaps each Linear for an empty bitsandbytes
    Linear4bit / Linear8bitLt (skipping llm_int8_skip_modules and the model's fp32 modules, as diffusers' quantizer
    does), the layer takes the Linear's weight, and bitsandbytes quantizes it as the layer moves to `device`, one
    layer at a time, so that the whole model never sits on the device in `compute_dtype`. As upstream, 4-bit layers
    compute in the training dtype, and peft's prepare_model_for_kbit_training keeps the other frozen weights (norms,
    biases, convolutions) in fp32."""
    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear
    from diffusers.quantizers.quantization_config import QuantizationMethod
    from peft import prepare_model_for_kbit_training

    kwargs = dict(config)
    if kwargs.get("load_in_4bit"):
        kwargs["bnb_4bit_compute_dtype"] = compute_dtype  # upstream's rule: 4-bit layers compute in the training dtype
    bnb_config = BitsAndBytesConfig(**kwargs)
    model.requires_grad_(False)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    skipped = list(bnb_config.llm_int8_skip_modules or []) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    replace_with_bnb_linear(model, modules_to_not_convert=skipped, quantization_config=bnb_config)
    for name, layer in model.named_modules():
        if not isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or name not in linears:
            continue
        linear, empty = linears.pop(name), layer.weight
        weight = linear.weight.data.to(compute_dtype).contiguous()
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=empty.blocksize,
                                             compress_statistics=empty.compress_statistics,
                                             quant_type=empty.quant_type, quant_storage=empty.quant_storage,
                                             module=layer)
        else:
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=empty.has_fp16_weights)
        layer.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.data, requires_grad=False)
        del linear, weight
        layer.to(device)  # bitsandbytes quantizes here
    four_bit = bool(config.get("load_in_4bit"))
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = four_bit, not four_bit
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.is_quantized = True  # ModelMixin.to refuses a dtype cast, which would break the packed weights
    model.to(device)  # the layers bitsandbytes does not quantize
    if torch.device(device).type == "cpu":
        # Their weights (biases, norms) still point into the memory-mapped weights file, which would stay mapped, and
        # resident once quantizing read it, as long as one of them does: give them memory of their own.
        for parameter in model.parameters():
            if not isinstance(parameter, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
                parameter.data = parameter.data.clone()
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.clone()
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # as upstream
    model.requires_grad_(False)
    return model


def is_quantized(model):
    """Whether `model` is a bitsandbytes-quantized denoiser (quantize)."""
    return getattr(model, "quantization_method", None) is not None and getattr(model, "is_quantized", False)


def frozen_footprint(model):
    """(parameters, bytes) of `model`'s frozen weights, a quantized weight counted as the parameters it stands for
    and its bytes including its quantization statistics (4-bit: absmax, nested statistics, code book; 8-bit: row
    scales)."""
    frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad]
    if not is_quantized(model):
        return sum(p.numel() for p in frozen), sum(p.numel() * p.element_size() for p in frozen)
    import bitsandbytes as bnb

    parameters = size = 0
    for parameter in frozen:
        if isinstance(parameter, bnb.nn.Params4bit) and parameter.quant_state is not None:
            state = parameter.quant_state
            parameters += state.shape.numel()
            size += parameter.nbytes + sum(value.nbytes for value in state.as_dict(packed=True).values()
                                           if isinstance(value, torch.Tensor))
        elif isinstance(parameter, bnb.nn.Int8Params) and getattr(parameter, "SCB", None) is not None:
            parameters += parameter.numel()
            size += parameter.nbytes + parameter.SCB.nbytes
        else:
            parameters += parameter.numel()
            size += parameter.nbytes
    return parameters, size


def describe_footprint(model):
    """One line for the log: the frozen denoiser's parameters, bytes and bytes per parameter."""
    parameters, size = frozen_footprint(model)
    return (f"{parameters / 1e6:.1f}M parameters in {size / 2**20:.1f} MiB "
            f"({size / max(parameters, 1):.3f} bytes per parameter)")


# ----------------------------------------------------------------------------------------------------------------------
# --offload and --do_fp8_training
# ----------------------------------------------------------------------------------------------------------------------


def home_device(args, device):
    """Where the VAE and frozen text encoders live between encodings: the CPU with --offload, else `device`."""
    return torch.device("cpu") if getattr(args, "offload", False) else device


def visiting(args, *models):
    """A context in which `models` (None ones skipped) are on the training device: with --offload they move there
    on entry and back where they were on exit (diffusers.training_utils.offload_models, upstream's helper); without
    it they never left, and nothing moves."""
    from accelerate import PartialState
    from diffusers.training_utils import offload_models

    present = [model for model in models if model is not None]
    return offload_models(*present, device=PartialState().device, offload=getattr(args, "offload", False) and
                          bool(present))


def fp8_module_filter(module, name):
    """Upstream's filter: every linear layer but the output projection (proj_out) and those with a dimension not a
    multiple of 16 (float8 matmuls need them so)."""
    if name == "proj_out":
        return False
    if isinstance(module, torch.nn.Linear):
        return module.in_features % 16 == 0 and module.out_features % 16 == 0
    return True


def convert_to_float8(model):
    """--do_fp8_training: torchao swaps the denoiser's linear layers (fp8_module_filter) for Float8Linear, whose
    matmuls run in float8 with dynamic scaling (as upstream: pad_inner_dim). Call before LoRA is added. Returns the
    number of layers converted. check_fp8_support ran before (torchao present, a GPU of compute capability 8.9+)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=fp8_module_filter, config=Float8LinearConfig(pad_inner_dim=True))
    return sum(type(module).__name__ == "Float8Linear" for module in model.modules())
