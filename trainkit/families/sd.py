"""Stable Diffusion 1.x/2.x: one CLIP tokenizer and text encoder, a UNet conditioned on the encoder's last hidden
state, a VAE, DDPM training (epsilon or v-prediction, from the scheduler)."""

from trainkit.cli import InputError
from trainkit.families import loading


class StableDiffusion:
    name = "sd"
    title = "Stable Diffusion"
    described = "a Stable Diffusion"  # "... model", "... pipeline folder"
    parts = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
    tokenizer_parts = ("tokenizer",)
    text_encoder_parts = ("text_encoder",)
    denoiser_part = "unet"
    objective = "ddpm"
    # The diffusers pipeline each task validates with and saves as (by class name).
    pipelines = {
        "text_to_image": "StableDiffusionPipeline",
        "dreambooth_lora": "StableDiffusionPipeline",
        "controlnet": "StableDiffusionControlNetPipeline",
        "instruct_pix2pix": "StableDiffusionInstructPix2PixPipeline",
        "textual_inversion": "StableDiffusionPipeline",
    }
    # Extra pipeline arguments: an SD pipeline folder may hold a safety checker, which training never needs.
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    hub_tag = "stable-diffusion"
    license = "creativeml-openrail-m"

    def recognises(self, path, index):
        """SD is what is left once the more specific families said no; its folder check reports anything else."""
        return True

    def check_folder(self, path, parts=None):
        """The parts the script loads are in the folder (default: all of the family's), before anything loads."""
        loading.check_parts(path, self.parts if parts is None else parts, self.described)

    # --- loading ---------------------------------------------------------------------------------------------------

    def pipeline_class(self, task):
        import diffusers

        return getattr(diffusers, self.pipelines[task])

    def text_encoder_classes(self):
        from transformers import CLIPTextModel

        return (CLIPTextModel,)

    def load_tokenizers(self, args, **kwargs):
        from transformers import CLIPTokenizer

        return [loading.load_part(args, part, CLIPTokenizer.from_pretrained, **kwargs) for part in self.tokenizer_parts]

    def load_text_encoders(self, args, **kwargs):
        """The frozen text encoders (`torch_dtype=` loads them directly in the training dtype)."""
        return [loading.load_part(args, part, model_class.from_pretrained, variant=args.variant, **kwargs)
                for part, model_class in zip(self.text_encoder_parts, self.text_encoder_classes())]

    def load_vae(self, args, **kwargs):
        return loading.load_vae(args, **kwargs)

    def vae_dtype(self, args, weight_dtype):
        """The dtype the VAE encodes in: the frozen models' dtype."""
        return weight_dtype

    # --- prompts ---------------------------------------------------------------------------------------------------

    def tokenize(self, tokenizers, prompts):
        """Token ids of `prompts` (a string or a list) for each tokenizer, padded to its maximum length, as the
        pipeline tokenizes them: a list of (batch, max_length) tensors, one per tokenizer."""
        return [
            tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            for tokenizer in tokenizers
        ]

    def encode_prompt(self, text_encoders, input_ids):
        """(encoder_hidden_states, pooled embedding or None) of token ids, one tensor per encoder: SD's is the last
        hidden state of its one encoder and has no pooled embedding."""
        text_encoder = text_encoders[0]
        return text_encoder(input_ids[0].to(text_encoder.device), return_dict=False)[0], None

    def added_conditions(self, pooled_prompt_embeds, original_sizes, crops_top_left, target_sizes):
        """The UNet's `added_cond_kwargs` (SD's UNet takes none)."""
        return None

    def check_crop_flags(self, args):
        """--crops_coords_top_left_h/_w go into SDXL's time ids only."""
        for name in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
            if getattr(args, name, None) is not None:
                raise InputError(f"--{name} applies to SDXL models only (SDXL's time ids); "
                                 f"{args.pretrained_model_name_or_path!r} is {self.described} model")



FAMILY = StableDiffusion()
