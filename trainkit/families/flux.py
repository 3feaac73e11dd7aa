"""FLUX.1: CLIP (pooled) and T5 (sequence) text encoders, a transformer on 2x2-packed latents with position ids and a
guidance embedding, a VAE with a shift factor, trained by flow matching."""

from trainkit.families import loading


class Flux:
    name = "flux"
    title = "FLUX.1"
    described = "a FLUX.1"
    parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "transformer", "scheduler")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    denoiser_part = "transformer"
    objective = "flow_matching"
    pipelines = {"dreambooth_lora": "FluxPipeline"}
    pipeline_kwargs = {}
    hub_tag = "flux"
    license = "other"

    def recognises(self, path, index):
        """A Flux* pipeline in model_index.json or, in a local folder, a transformer/ whose config names
        FluxTransformer2DModel."""
        if str(index.get("_class_name", "")).startswith("Flux"):
            return True
        return loading.read_part_config(path, "transformer").get("_class_name") == "FluxTransformer2DModel"

    def check_folder(self, path, parts=None):
        loading.check_parts(path, self.parts if parts is None else parts, self.described)

    def pipeline_class(self, task):
        import diffusers

        return getattr(diffusers, self.pipelines[task])


FAMILY = Flux()
