"""SDXL: two CLIP text encoders (the penultimate hidden states of both, the pooled projection of the second) and a UNet
micro-conditioned on each image's original size, crop and target size; its own VAE overflows in fp16."""

import torch

from trainkit.cli import InputError
from trainkit.families import loading
from trainkit.families.sd import StableDiffusion


class SDXL(StableDiffusion):
    name = "sdxl"
    title = "SDXL"
    described = "an SDXL"
    parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    pipelines = {
        "text_to_image": "StableDiffusionXLPipeline",
        "dreambooth_lora": "StableDiffusionXLPipeline",
        "controlnet": "StableDiffusionXLControlNetPipeline",
        "instruct_pix2pix": "StableDiffusionXLInstructPix2PixPipeline",
        "textual_inversion": "StableDiffusionXLPipeline",
    }
    # Training's images carry no invisible watermark (the pipeline adds one where the package is installed).
    pipeline_kwargs = {"add_watermarker": False}
    hub_tag = "stable-diffusion-xl"
    license = "openrail++"

    def recognises(self, path, index):
        """A StableDiffusionXL* pipeline or a text_encoder_2 in model_index.json, or, in a local folder, a
        text_encoder_2/ or a UNet conditioned on `text_time` (SDXL's pooled text + size embedding)."""
        if str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index:
            return True
        return loading.has_part(path, "text_encoder_2") or \
            loading.read_part_config(path, "unet").get("addition_embed_type") == "text_time"

    def text_encoder_classes(self):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return (CLIPTextModel, CLIPTextModelWithProjection)

    def vae_dtype(self, args, weight_dtype):
        """SDXL's own VAE overflows in fp16 (NaN latents), so upstream keeps it in fp32 (or in --vae_precision, upstream
        InstructPix2Pix SDXL's flag, where a script has it) unless --pretrained_vae_model_name_or_path names another
        VAE (such as an fp16-safe one), which then runs in the mixed-precision dtype like the other frozen models."""
        other_vae = getattr(args, "pretrained_vae_model_name_or_path", None)
        precision = getattr(args, "vae_precision", None)
        if precision is not None and other_vae is None:
            return VAE_PRECISIONS[precision]
        return vae_dtype(weight_dtype, other_vae)

    def encode_prompt(self, text_encoders, input_ids):
        """As `StableDiffusionXLPipeline.encode_prompt` computes it with clip_skip=None: the penultimate hidden
        states of both CLIP encoders concatenated on the last dimension, and the pooled (projected) embedding of the
        second. Returns (prompt_embeds (batch, tokens, hidden 1 + hidden 2), pooled_prompt_embeds (batch,
        projection)). Gradients flow where the encoders train (text-encoder LoRA)."""
        hidden_states = []
        for text_encoder, ids in zip(text_encoders, input_ids):
            output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
        # text_encoder_2 is a CLIPTextModelWithProjection: `text_embeds` is its pooled, projected embedding.
        return torch.cat(hidden_states, dim=-1), output.text_embeds

    def added_conditions(self, pooled_prompt_embeds, original_sizes, crops_top_left, target_sizes):
        """The UNet's `added_cond_kwargs`: the pooled embedding and each sample's time ids (`time_ids`)."""
        ids = time_ids(original_sizes, crops_top_left, target_sizes, device=pooled_prompt_embeds.device)
        return {"text_embeds": pooled_prompt_embeds, "time_ids": ids}

    def check_crop_flags(self, args):
        for name in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
            value = getattr(args, name, None)
            if value is not None and value < 0:
                raise InputError(f"--{name} must be >= 0, got {value}")

    def time_id_crops(self, args, crops_top_left):
        """Each sample's real crop, except where upstream's --crops_coords_top_left_h/_w are given: they go into
        every time id (`crops_for_time_ids`)."""
        return crops_for_time_ids(crops_top_left, getattr(args, "crops_coords_top_left_h", None),
                                  getattr(args, "crops_coords_top_left_w", None))

    # Flags that cannot apply to SDXL, per task (StableDiffusion.refuse_flags).
    refused_flags = {
        "dreambooth_lora": {
            **StableDiffusion.refused_flags["dreambooth_lora"],
            "--tokenizer_name": "it has two tokenizers, tokenizer/ and tokenizer_2/",
            "--tokenizer_max_length": "SDXL prompts take 77 tokens",
            "--text_encoder_use_attention_mask": "SDXL's CLIP encoders take none",
            "--class_labels_conditioning": "it is for DeepFloyd IF",
            "--validation_images": "it is for DeepFloyd IF's upscaler",
            "--do_edm_style_training": "EDM-style training is not built here yet",
        },
        "textual_inversion": {"--tokenizer_name": "it has two tokenizers (tokenizer/ and tokenizer_2/) and the "
                                                  "tokens are added to both"},
    }

    size_conditioned = True

    # --- dreambooth_lora ---
    text_encoder_last_layer_unused = True  # the penultimate hidden states condition the UNet

    def required_parts(self, args):
        """All of its parts (SD's may lack vae/: DeepFloyd IF)."""
        return self.parts

    def load_dreambooth_models(self, args):
        """(DDPMScheduler, [tokenizer, tokenizer_2], [CLIPTextModel, CLIPTextModelWithProjection], vae, UNet)."""
        from diffusers import DDPMScheduler

        loaded = [loading.load_part(args, "scheduler", DDPMScheduler.from_pretrained), self.load_tokenizers(args),
                  self.load_text_encoders(args), self.load_vae(args)]
        return (*loaded, loading.load_denoiser(args))  # quantized with --bnb_quantization_config_path

    # --- instruct_pix2pix ---
    def edit_size_kwargs(self, image):
        """SDXL's InstructPix2Pix pipeline resizes the image it edits to `height`/`width` (default: the UNet's sample
        size), so editing `image` at its own size takes both."""
        return {"height": image.height, "width": image.width}


def time_ids(original_sizes, crops_top_left, target_size, device=None, dtype=torch.float32):
    """SDXL's micro-conditioning, one row of 6 numbers per sample: original (height, width) of the image before any
    resize, the (top, left) of the crop in the resized image, and the target (height, width) trained at, as
    `StableDiffusionXLPipeline._get_add_time_ids` orders them. `original_sizes`, `crops_top_left`: (batch, 2)
    tensors or lists of pairs; `target_size`: one pair, or (batch, 2) for per-sample targets (buckets)."""
    original = torch.as_tensor(original_sizes, dtype=torch.float64).reshape(-1, 2)
    crops = torch.as_tensor(crops_top_left, dtype=torch.float64).reshape(-1, 2)
    target = torch.as_tensor(target_size, dtype=torch.float64).reshape(-1, 2).expand(original.shape[0], 2)
    return torch.cat([original, crops, target], dim=1).to(device=device, dtype=dtype)


def crops_for_time_ids(crops_top_left, top=None, left=None):
    """The crop top-lefts the time ids carry: each sample's real crop, except a coordinate given explicitly with
    upstream's --crops_coords_top_left_h (`top`) / --crops_coords_top_left_w (`left`), which then wins for every
    sample, as upstream."""
    crops = torch.as_tensor(crops_top_left).clone()
    for column, value in enumerate((top, left)):
        if value is not None:
            crops[:, column] = value
    return crops


# --vae_precision's values (InstructPix2Pix SDXL): the dtype SDXL's own VAE runs in.
VAE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def vae_dtype(weight_dtype, pretrained_vae_model_name_or_path=None):
    """fp32 for SDXL's own VAE; the mixed-precision dtype for another one."""
    return weight_dtype if pretrained_vae_model_name_or_path else torch.float32


FAMILY = SDXL()
