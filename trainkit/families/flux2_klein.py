"""FLUX.2 [klein]: FLUX.2's transformer, VAE, latents, packing and position ids (flux2.Flux2, FLUX.2 [dev]) with a
Qwen3 text encoder (Qwen3ForCausalLM, a Qwen2 tokenizer and its chat template) in place of [dev]'s Mistral 3, as
upstream's train_dreambooth_lora_flux2_klein.py trains it: the prompt in the chat template (enable_thinking=False),
padded to --max_sequence_length, and the hidden states of --text_encoder_out_layers stacked per token, exactly as
Flux2KleinPipeline.encode_prompt computes them. The transformer has no guidance embedding (--guidance_scale is taken
and unused, as upstream); a base (non-distilled) klein renders with true classifier-free guidance against the empty
prompt (the pipeline's is_distilled), so validation passes the empty prompt's embeddings as the negative ones."""

from trainkit.cli import InputError
from trainkit.families import flux2, loading


class Flux2Klein(flux2.Flux2):
    name = "flux2_klein"
    title = "FLUX.2 [klein]"
    described = "a FLUX.2 [klein]"
    pipelines = {"dreambooth_lora": "Flux2KleinPipeline"}
    pipeline_class_name = "Flux2KleinPipeline"
    hub_tag = "flux2-klein"
    # Upstream's klein card: license "other" (klein 4B itself is apache-2.0, 9B non-commercial).
    license = "other"
    # Upstream's train_dreambooth_lora_flux2_klein.py targets: the attention projections of the double-stream blocks,
    # the fused qkv+MLP input projection of the single-stream ones and their attention output, named per block
    # 0..23 as upstream names them (klein 4B has 20 single blocks, 9B 24; peft skips names no module has).
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                    *(f"single_transformer_blocks.{index}.attn.to_out" for index in range(24))]
    # A base klein does true CFG against "" (Flux2KleinPipeline.do_classifier_free_guidance: guidance_scale > 1 and
    # not is_distilled): validation gives it the empty prompt's embeddings, encoded as training encodes; a distilled
    # one ignores them.
    negative_prompt = True
    # Qwen3's max_position_embeddings (FLUX.2-klein's text encoder); Flux2KleinPipeline sets no limit of its own.
    max_sequence_length = 40960
    default_text_encoder_out_layers = (10, 20, 30)  # upstream klein's default (the pipeline's own is 9 18 27)
    text_encoder_description = "Qwen3"
    refused_flags = {"dreambooth_lora": {
        **flux2.Flux2.refused_flags["dreambooth_lora"],
        "--train_text_encoder": "upstream's FLUX.2 [klein] script trains the transformer only (its Qwen3 text "
                                "encoder stays frozen and encodes each prompt once)",
        "--remote_text_encoder": "upstream's klein script has no remote text encoder (Hugging Face's service encodes "
                                 "FLUX.2 [dev]'s Mistral prompts only); --cache_text_embeddings encodes every prompt "
                                 "once, keeps the embeddings on disk and trains without the text encoder in memory",
    }}

    def text_encoder_class(self):
        from transformers import Qwen3ForCausalLM

        return Qwen3ForCausalLM

    def load_text_encoding(self, args):
        """([Qwen2TokenizerFast], [Qwen3ForCausalLM in the training dtype]), the classes upstream and the pipeline
        load (upstream loads the encoder in fp32 and casts it to the training dtype: the same weights). Load errors
        are InputErrors naming the part."""
        from transformers import Qwen2TokenizerFast

        from trainkit import big_models

        tokenizer = loading.load_part(args, "tokenizer", Qwen2TokenizerFast.from_pretrained)
        text_encoder = loading.load_part(args, "text_encoder", self.text_encoder_class().from_pretrained,
                                         variant=args.variant, torch_dtype=big_models.training_dtype(args))
        return [tokenizer], [text_encoder]

    def refuse_flags(self, args, task):
        """[dev]'s checks (--text_encoder_out_layers against the folder's configs among them), then
        --max_sequence_length within the Qwen3 text encoder's positions, before any model loads."""
        super().refuse_flags(args, task)
        path = args.pretrained_model_name_or_path
        length = getattr(args, "max_sequence_length", None)
        if length is not None and length < 1:
            raise InputError(f"--max_sequence_length must be at least 1, got {length}")
        positions = loading.read_part_config(path, "text_encoder").get("max_position_embeddings")
        if length and positions and length > positions:
            raise InputError(f"--max_sequence_length {length} is over {positions}, the most positions the Qwen3 text "
                             f"encoder of {path!r} has")

    # --- prompts ---------------------------------------------------------------------------------------------------

    def tokenize_prompt(self, tokenizer, prompts, max_length=None):
        """Ids and attention mask of `prompts` as Flux2KleinPipeline._get_qwen3_prompt_embeds tokenizes them: each
        prompt one user turn of the chat template with the assistant's header and thinking off, as text, then
        tokenized padded (and cut) to `max_length` (--max_sequence_length) tokens. (encode_prompt, [dev]'s, stacks
        the chosen layers' hidden states as the klein pipeline does.)"""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
                 for prompt in prompts]
        return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length or 512,
                         return_tensors="pt")


FAMILY = Flux2Klein()
