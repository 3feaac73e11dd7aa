"""Model families (temporary home while the family layer is built).
"""

import os

import torch

from trainkit.cli import InputError, first_line

# What an SDXL base pipeline folder holds, next to SD's tokenizer/, text_encoder/, vae/, unet/, scheduler/.
SDXL_PIPELINE_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler")


def read_model_index(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """The pipeline's model_index.json as a dict: read from a local folder, fetched for a hub id ({} where there is
    none, or where the path does not exist: the caller's folder check reports that). A hub id that cannot be
    reached is an InputError."""
    import json

    path = pretrained_model_name_or_path
    if os.path.isdir(path):
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            return {}
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        return {}
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            index_file = hf_hub_download(path, "model_index.json", revision=revision, cache_dir=cache_dir)
        except EntryNotFoundError:
            return {}
        except Exception as error:
            raise InputError(f"--pretrained_model_name_or_path {path!r}: cannot read model_index.json "
                             f"({first_line(error)})") from None
    try:
        with open(index_file) as file:
            index = json.load(file)
    except (OSError, ValueError) as error:
        raise InputError(f"--pretrained_model_name_or_path {path!r}: cannot read model_index.json "
                         f"({first_line(error)})") from None
    return index if isinstance(index, dict) else {}


def is_sdxl_model(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """Whether the base model is SDXL: a StableDiffusionXL* pipeline or a text_encoder_2 in model_index.json, or, in
    a local folder, a text_encoder_2/ or a UNet conditioned on `text_time` (SDXL's pooled text + size embedding)."""
    import json

    index = read_model_index(pretrained_model_name_or_path, revision, cache_dir)
    if str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index:
        return True
    path = pretrained_model_name_or_path
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        return True
    try:
        with open(os.path.join(path, "unet", "config.json")) as file:
            return json.load(file).get("addition_embed_type") == "text_time"
    except (OSError, ValueError, AttributeError):
        return False  # the folder check or the model loading reports a missing or broken unet/


# What a FLUX.1 base pipeline folder holds: CLIP (pooled) and T5 (sequence) text encoders, a transformer.
FLUX_PIPELINE_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "transformer",
                       "scheduler")


def is_flux_model(pretrained_model_name_or_path, revision=None, cache_dir=None):
    """Whether the base model is FLUX.1: a Flux* pipeline in model_index.json or, in a local folder, a transformer/
    whose config names FluxTransformer2DModel."""
    import json

    index = read_model_index(pretrained_model_name_or_path, revision, cache_dir)
    if str(index.get("_class_name", "")).startswith("Flux"):
        return True
    try:
        with open(os.path.join(pretrained_model_name_or_path, "transformer", "config.json")) as file:
            return json.load(file).get("_class_name") == "FluxTransformer2DModel"
    except (OSError, ValueError, AttributeError):
        return False


def tokenize_prompts(tokenizers, prompts):
    """Token ids of `prompts` (a string or a list) for each tokenizer, padded to its maximum length, as SD and SDXL
    pipelines tokenize them: a list of (batch, max_length) tensors, one per tokenizer."""
    return [
        tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        for tokenizer in tokenizers
    ]


def encode_prompt_sdxl(text_encoders, input_ids):
    """SDXL's prompt conditioning, as `StableDiffusionXLPipeline.encode_prompt` computes it with clip_skip=None:
    the penultimate hidden states of both CLIP encoders concatenated on the last dimension, and the pooled
    (projected) embedding of the second. `input_ids`: one tensor per encoder (`tokenize_prompts`). Returns
    (prompt_embeds (batch, tokens, hidden 1 + hidden 2), pooled_prompt_embeds (batch, projection)). Gradients flow
    where the encoders train (text-encoder LoRA); wrap in torch.no_grad() otherwise."""
    hidden_states = []
    for text_encoder, ids in zip(text_encoders, input_ids):
        output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    # text_encoder_2 is a CLIPTextModelWithProjection: `text_embeds` is its pooled, projected embedding.
    return torch.cat(hidden_states, dim=-1), output.text_embeds


def sdxl_time_ids(original_sizes, crops_top_left, target_size, device=None, dtype=torch.float32):
    """SDXL's micro-conditioning, one row of 6 numbers per sample: original (height, width) of the image before any
    resize, the (top, left) of the crop in the resized image, and the target (height, width) trained at, as
    `StableDiffusionXLPipeline._get_add_time_ids` orders them. `original_sizes`, `crops_top_left`: (batch, 2)
    tensors or lists of pairs; `target_size`: one pair, or (batch, 2) for per-sample targets (buckets)."""
    original = torch.as_tensor(original_sizes, dtype=torch.float64).reshape(-1, 2)
    crops = torch.as_tensor(crops_top_left, dtype=torch.float64).reshape(-1, 2)
    target = torch.as_tensor(target_size, dtype=torch.float64).reshape(-1, 2).expand(original.shape[0], 2)
    return torch.cat([original, crops, target], dim=1).to(device=device, dtype=dtype)


def check_crop_flags(args):
    """--crops_coords_top_left_h/_w: SDXL only (they go into its time ids), and >= 0. Raises InputError."""
    for name in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
        value = getattr(args, name)
        if value is not None and not args.sdxl:
            raise InputError(f"--{name} applies to SDXL models only (SDXL's time ids); "
                             f"{args.pretrained_model_name_or_path!r} is a Stable Diffusion model")
        if value is not None and value < 0:
            raise InputError(f"--{name} must be >= 0, got {value}")


def crops_for_time_ids(crops_top_left, top=None, left=None):
    """The crop top-lefts SDXL's time ids carry: each sample's real crop, except a coordinate given explicitly with
    upstream's --crops_coords_top_left_h (`top`) / --crops_coords_top_left_w (`left`), which then wins for every
    sample, as upstream."""
    crops = torch.as_tensor(crops_top_left).clone()
    for column, value in enumerate((top, left)):
        if value is not None:
            crops[:, column] = value
    return crops


def sdxl_added_conditions(pooled_prompt_embeds, time_ids):
    """The UNet's `added_cond_kwargs` for SDXL (`addition_embed_type` text_time)."""
    return {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids.to(pooled_prompt_embeds.device)}


def sdxl_vae_dtype(weight_dtype, pretrained_vae_model_name_or_path=None):
    """The dtype the SDXL VAE runs in. SDXL's own VAE overflows in fp16 (NaN latents), so upstream keeps it in fp32
    unless --pretrained_vae_model_name_or_path names another VAE (such as an fp16-safe one), which then runs in the
    mixed-precision dtype like the other frozen models."""
    return weight_dtype if pretrained_vae_model_name_or_path else torch.float32


def vae_dtype(args, weight_dtype):
    """The dtype a script's VAE runs in: SD's in the frozen models' dtype, SDXL's by `sdxl_vae_dtype`."""
    return sdxl_vae_dtype(weight_dtype, args.pretrained_vae_model_name_or_path) if args.sdxl else weight_dtype


def load_vae(args):
    """The base pipeline's vae/, or the VAE folder or hub id --pretrained_vae_model_name_or_path names (its own
    repository: the base model's --revision and --variant do not apply to it). A load error is an InputError."""
    from diffusers import AutoencoderKL

    custom = args.pretrained_vae_model_name_or_path
    cache_dir = getattr(args, "cache_dir", None)
    if custom:
        flag, source, part, kwargs = "--pretrained_vae_model_name_or_path", custom, "the VAE", {}
    else:
        flag, source, part = "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "vae/"
        kwargs = {"subfolder": "vae", "revision": args.revision, "variant": args.variant}
    try:
        return AutoencoderKL.from_pretrained(source, cache_dir=cache_dir, **kwargs)
    except Exception as error:
        raise InputError(f"{flag} {source!r}: cannot load {part} ({first_line(error)})") from None


def encode_prompt(text_encoders, input_ids):
    """(encoder_hidden_states, pooled embedding or None) of token ids, one tensor per encoder: SD's last hidden state
    of its one encoder, or SDXL's two-encoder conditioning (`encode_prompt_sdxl`)."""
    if len(text_encoders) == 2:
        return encode_prompt_sdxl(text_encoders, input_ids)
    text_encoder = text_encoders[0]
    return text_encoder(input_ids[0].to(text_encoder.device), return_dict=False)[0], None
