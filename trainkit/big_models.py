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

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT_STORAGE_NAMES = {**DTYPE_NAMES, "uint8": torch.uint8, "int8": torch.int8}
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
