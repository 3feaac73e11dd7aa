"""LoRA adapters shared by the LoRA scripts: adding them (peft), and saving and restoring them in diffusers' file layout
(through the family's pipeline class) and in kohya's, so that every script's LoRA loads the same way everywhere."""

import os

import torch

from trainkit import cli
from trainkit.cli import InputError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora_adapters(args, denoiser, text_encoders, targets=None):
    """LoRA on the UNet's attention projections or FLUX.1's attention and feed-forward ones (--lora_layers: those
    layers), and on the CLIP text encoder(s) with --train_text_encoder (FLUX.1's T5 stays frozen, as upstream);
    every other weight stays frozen. Gaussian init: A random, B zero, so training starts from the base model's
    output."""
    from peft import LoraConfig

    def config(targets):
        return LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          use_dora=args.use_dora, init_lora_weights="gaussian", target_modules=targets)

    targets = targets or args.lora_targets or args.family.lora_targets
    try:
        denoiser.add_adapter(config(targets))
    except ValueError as error:  # a --lora_layers name the config check could not see (a hub model offline)
        raise InputError(f"--lora_layers {args.lora_layers!r}: {cli.first_line(error)}") from None
    if args.train_text_encoder:
        for text_encoder in args.family.trainable_text_encoders(text_encoders):
            text_encoder.add_adapter(config(TEXT_ENCODER_LORA_TARGETS))


def save_lora_weights(folder, denoiser, text_encoders, family, dtype=None, task="dreambooth_lora",
                      denoiser_state=None):
    """`folder/pytorch_lora_weights.safetensors` in diffusers' format (`unet.*` or FLUX.1 `transformer.*`,
    `text_encoder.*`, SDXL `text_encoder_2.*` keys) with the adapter configs (rank, alpha, targets) as metadata,
    which `pipe.load_lora_weights(folder)` reads. `text_encoders`: the trained ones (none without
    --train_text_encoder), their CLIP layers named `text_model.encoder.layers.N` (text_model_layout) whatever the
    transformers version. `dtype`: the denoiser's weights' dtype in the file (default: as trained, fp32); the text
    encoders' are always fp32, as upstream's Flux script saves them. `denoiser_state`: the denoiser's trained weights
    by parameter name where the model does not hold them whole (distributed.trained_weights under DeepSpeed ZeRO-3).
    Written by the family's pipeline class (family.pipeline_class)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model, dtype=None, state=None):
        # No embedding layer is adapted; saying so spares peft a hub lookup for the base model's vocabulary size.
        state = get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
        # Upstream's SD scripts write diffusers' `lora.down`/`lora.up` names, its Flux script peft's lora_A/lora_B.
        state = state if family.peft_lora_names else convert_state_dict_to_diffusers(state)
        return state if dtype is None else {key: value.to(dtype) for key, value in state.items()}

    def text_encoder_layers(model):
        # DoRA: diffusers' text-encoder loader hands the keys to peft, which looks for the magnitude vector's
        # parameter name (`lora_magnitude_vector.weight`); without `.weight` it would keep the untrained magnitudes.
        return {f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key: value.float()
                for key, value in text_model_layout(model, layers(model)).items()}

    prefix = family.denoiser_part
    parts = {f"{prefix}_lora_layers": layers(denoiser, dtype, denoiser_state),
             f"{prefix}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()}
    for prefix, model in zip(family.text_encoder_parts, text_encoders or []):
        parts[f"{prefix}_lora_layers"] = text_encoder_layers(model)
        parts[f"{prefix}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    family.pipeline_class(task).save_lora_weights(folder, **parts)


def text_model_layout(model, state):
    """A text encoder's LoRA state dict with its CLIP layers named `text_model.encoder.layers.N...`, the layout of
    CLIPTextModel before transformers 5 (which dropped its `text_model` wrapper), which ComfyUI's key map expects and
    diffusers' load_lora_weights reads on any transformers version; other encoders' keys are left as they are."""
    if hasattr(model, "text_model") or getattr(model.config, "model_type", None) != "clip_text_model":
        return state
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()}


def own_layout(model, state):
    """text_model_layout's keys read back into `model`: without `text_model.` where the model has no such wrapper
    (CLIPTextModel on transformers 5)."""
    if hasattr(model, "text_model"):
        return state
    return {key.removeprefix("text_model."): value for key, value in state.items()}


def save_kohya_weights(folder, unet, text_encoders, family, denoiser_state=None):
    """`folder/pytorch_lora_weights_kohya.safetensors`: the same adapters in the key layout of kohya's sd-scripts,
    A1111 and ComfyUI (`lora_unet_*`, `lora_te_*` (SDXL: `lora_te1_*`, `lora_te2_*`) with `.lora_down.weight`,
    `.lora_up.weight`, `.alpha`), made by
    diffusers' convert_state_dict_to_kohya from the adapters' peft state dicts (upstream's conversion from the saved
    file garbles the UNet's keys when the text encoder is trained too). Each layer's `.alpha` is its adapter's
    --lora_alpha (convert_state_dict_to_kohya writes the rank), so that kohya, A1111 and ComfyUI scale the update by
    alpha / rank as diffusers does. `denoiser_state`: as for save_lora_weights. Written under a temporary name
    first."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {}
    if unet is not None:
        layers = get_peft_model_state_dict(unet, state_dict=denoiser_state, save_embedding_layers=False)
        state.update({f"unet.{key}": value for key, value in layers.items()})
    for prefix, text_encoder in zip(family.text_encoder_parts, text_encoders or []):
        # kohya, A1111 and ComfyUI name CLIP layers `text_model.encoder.layers.N` (ComfyUI skips the others).
        layers = text_model_layout(text_encoder, get_peft_model_state_dict(text_encoder, save_embedding_layers=False))
        state.update({f"{prefix}.{key}": value for key, value in layers.items()})
    magnitudes = {key: state.pop(key) for key in list(state) if key.endswith(".lora_magnitude_vector")}

    def kohya_names(state_dict):
        # diffusers names the text encoders `lora_te1_` / `lora_te2_` (SDXL's); a lone one (SD 1.x/2.x) `lora_te_`.
        converted = convert_state_dict_to_kohya(state_dict)
        if len(family.text_encoder_parts) > 1:
            return converted
        return {key.replace("lora_te1_", "lora_te_", 1) if key.startswith("lora_te1_") else key: value
                for key, value in converted.items()}

    kohya = kohya_names(state)
    # The true alpha of each layer (kohya tools scale its update by alpha / rank, the rows of its lora_down), from
    # its model's adapter: `lora_unet_`, `lora_te_` / `lora_te1_` (the first text encoder), `lora_te2_`.
    models = {"lora_unet_": unet, "lora_te_": (text_encoders or [None])[0]}
    models.update({f"lora_te{index}_": model for index, model in enumerate(text_encoders or [], start=1)})
    for key in [key for key in kohya if key.endswith(".alpha")]:
        model = next(model for start, model in models.items() if key.startswith(start))
        kohya[key] = torch.tensor(float(model.peft_config["default"].lora_alpha))
    # convert_state_dict_to_kohya leaves DoRA's magnitude vectors misnamed; kohya/LyCORIS keep them beside the layer's
    # lora_down as `dora_scale`, shaped (out_features, 1).
    for key, magnitude in magnitudes.items():
        layer_key = key[: -len(".lora_magnitude_vector")] + ".lora_A.weight"
        down = next(name for name in kohya_names({layer_key: magnitude}) if ".lora_down." in name)
        kohya[f"{down.split('.')[0]}.dora_scale"] = magnitude[:, None]
    path = os.path.join(folder, KOHYA_WEIGHTS_NAME)
    save_file({key: value.detach().contiguous() for key, value in kohya.items()}, path + ".partial")
    os.replace(path + ".partial", path)


def load_lora_weights(folder, denoiser, text_encoders, family, task="dreambooth_lora"):
    """Restore the adapters saved by save_lora_weights into `denoiser` (and the trained `text_encoders`), exactly."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from peft.utils import set_peft_model_state_dict

    pipeline_class, prefix = family.pipeline_class(task), family.denoiser_part + "."
    state_dict = pipeline_class.lora_state_dict(folder, weight_name=LORA_WEIGHTS_NAME)
    state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict  # SD/SDXL also return alphas
    denoiser_state = convert_unet_state_dict_to_peft(
        {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    )
    incompatible = set_peft_model_state_dict(denoiser, denoiser_state, adapter_name="default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise InputError(f"{folder}/{LORA_WEIGHTS_NAME}: unexpected LoRA keys for the {prefix[:-1]} "
                         f"({unexpected[0]}, ...)")
    for prefix, text_encoder in zip(family.text_encoder_parts, text_encoders or []):
        # The file names CLIP layers `text_model.encoder.layers.N` (text_model_layout); CLIPTextModel on
        # transformers 5 has no `text_model`, and peft would skip the keys silently.
        layers = own_layout(text_encoder, {key[len(prefix) + 1:]: value for key, value in state_dict.items()
                                           if key.startswith(f"{prefix}.")})
        layers = convert_state_dict_to_peft(convert_state_dict_to_diffusers(layers))
        incompatible = set_peft_model_state_dict(text_encoder, layers, adapter_name="default")
        unexpected = getattr(incompatible, "unexpected_keys", None)
        if unexpected:
            raise InputError(f"{folder}/{LORA_WEIGHTS_NAME}: unexpected LoRA keys for the {prefix} "
                             f"({unexpected[0]}, ...)")


def check_lora_layers(args):
    """--lora_layers (and SD3's --lora_blocks: those targets inside the blocks named) -> args.lora_targets (None:
    the script's defaults). Each --lora_layers name must match (as peft matches target modules: the whole name or its
    last dotted parts) a Linear or Conv2d layer of the UNet / transformer, checked on its config with no weights
    loaded. A hub model whose config cannot be read is checked when it loads."""
    args.lora_targets = None
    blocks = getattr(args, "lora_blocks", None)  # SD3's: the targets inside those transformer blocks only
    if args.lora_layers is None and blocks is None:
        return
    targets = args.family.lora_targets
    if args.lora_layers is not None:
        targets = [name.strip() for name in args.lora_layers.split(",") if name.strip()]
        if not targets:
            raise InputError("--lora_layers names no module (expected e.g. 'attn.to_k,attn.to_q')")
    args.lora_targets = targets if blocks is None else args.family.lora_block_targets(args, targets)
    if args.lora_layers is None:
        return
    names = adaptable_module_names(args)
    if names is None:
        return
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            examples = ", ".join(sorted({name.split(".", 2)[-1] for name in names})[:6])
            raise InputError(f"--lora_layers: {target!r} names no Linear or Conv2d layer of the "
                             f"{args.family.denoiser_name} of "
                             f"{args.pretrained_model_name_or_path!r} (its layers include {examples}, ...)")


def adaptable_module_names(args):
    """The names of the UNet's / transformer's Linear and Conv2d layers, from its config on the meta device (no
    weights read), or None when the config cannot be read."""
    from accelerate import init_empty_weights

    model_class, part = args.family.denoiser_class(), args.family.denoiser_part
    try:
        config = model_class.load_config(args.pretrained_model_name_or_path, subfolder=part, revision=args.revision)
        with init_empty_weights():
            model = model_class.from_config(config)
    except Exception:  # a hub id offline, a broken config: the model load reports it
        return None
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]


def check_checkpoint_matches(args):
    """A checkpoint holds the adapters of one setup; resuming it with or without --train_text_encoder or --use_dora
    differently cannot continue the same run."""
    from safetensors import safe_open

    path = os.path.join(args.resume_path, LORA_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise InputError(f"--resume_from_checkpoint {args.resume_path!r} holds no {LORA_WEIGHTS_NAME}")
    with safe_open(path, framework="pt") as file:
        keys = list(file.keys())
    has_text_encoder = any(key.startswith("text_encoder.") for key in keys)
    if has_text_encoder != args.train_text_encoder:
        trained = "trained" if has_text_encoder else "did not train"
        raise InputError(
            f"--resume_from_checkpoint {args.resume_path!r} {trained} the text encoder; "
            f"{'add' if has_text_encoder else 'remove'} --train_text_encoder to resume it"
        )
    has_dora = any("lora_magnitude_vector" in key for key in keys)
    if has_dora != args.use_dora:
        raise InputError(
            f"--resume_from_checkpoint {args.resume_path!r} {'trained' if has_dora else 'did not train'} DoRA "
            f"adapters; {'add' if has_dora else 'remove'} --use_dora to resume it"
        )


def ddp_settings(args):
    """SDXL conditions on text_encoder's penultimate layer, so the LoRA weights of its last layer get no gradient:
    DDP must be told to expect unused parameters when the text encoders train (upstream does the same)."""
    from accelerate.utils import DistributedDataParallelKwargs

    unused = args.train_text_encoder and args.family.text_encoder_last_layer_unused
    return [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else []
