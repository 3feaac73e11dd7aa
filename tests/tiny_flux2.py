"""A tiny random FLUX.2 [dev] pipeline folder, built locally (no hub): the base model of the FLUX.2 [dev] tests.

The layout of black-forest-labs/FLUX.2-dev (model_index.json naming Flux2Pipeline; tokenizer/ a chat-template
tokenizer (write_flux2_tokenizer), text_encoder/ Mistral3ForConditionalGeneration, vae/ AutoencoderKLFlux2 with
batch-norm latent statistics that are not 0/1, transformer/ Flux2Transformer2DModel with a guidance embedding,
scheduler/ FlowMatchEulerDiscreteScheduler), with the sizes of diffusers' own pipeline test
(tests/pipelines/flux2/test_pipeline_flux2.py get_dummy_components) but an 8x VAE (4 levels) with 4 latent channels,
as the real one's 1/8 grid: latents are patchified 2x2 into 16 transformer channels, so the resolution must be a
multiple of 16. The text encoder has 3 layers, so upstream's default --text_encoder_out_layers 10 20 30 is out of its
range: the tests give 1 2 3.
"""

import json
import os

from tiny_sd import WORDS

# The Mistral / Pixtral special tokens the chat template uses; ids 0-4 as the real tokenizer's
# (<unk>, [IMG] = image_token_index 1, <s>, </s>, <pad>).
FLUX2_SPECIAL_TOKENS = ("<unk>", "[IMG]", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                        "[/SYSTEM_PROMPT]", "[IMG_BREAK]", "[IMG_END]")
# A Mistral-style chat template over diffusers' format_input messages (a list of {"type": "text", "text": ...}
# contents per message).
FLUX2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% for part in message['content'] %}{{ part['text'] }}"
    "{% endfor %}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}[IMG]{% endif %}{% endfor %}[/INST]"
    "{% endif %}{% endfor %}"
)


def write_flux2_tokenizer(folder):
    """The tokenizer/ part: a byte-level BPE trained here (tokenizers' BpeTrainer) on the words of Flux2Pipeline's
    system message and the tests' prompts, with the Mistral special tokens and the chat template above, saved as a
    fast tokenizer. (FLUX.2-dev's own tokenizer/ is a PixtralProcessor, whose image half needs torchvision, which this
    environment lacks; its text half is such a tokenizer, and Flux2Pipeline encodes prompts with its
    apply_chat_template either way.)"""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = SYSTEM_MESSAGE.replace(",", " ").replace(".", " ").split() + WORDS
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [" ".join(words), *words, *(" " + word for word in words)]
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, show_progress=False,
                                  special_tokens=list(FLUX2_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus * 2, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", model_max_length=131072,
                                        additional_special_tokens=list(FLUX2_SPECIAL_TOKENS[5:]))
    tokenizer.chat_template = FLUX2_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_flux2(folder, seed=0):
    """Write the pipeline to `folder` and return the folder."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = write_flux2_tokenizer(os.path.join(folder, "tokenizer"))
    ids = tokenizer.convert_tokens_to_ids
    vocab_size = len(tokenizer)
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 37,
                     "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 3,
                     "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
                     "sliding_window": None, "bos_token_id": ids("<s>"), "eos_token_id": ids("</s>"),
                     "pad_token_id": ids("<pad>")},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3},
        bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"), image_seq_length=4,
        vision_feature_layer=-1, image_token_index=ids("[IMG]"),
    )
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    latent_channels = 4
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Batch-norm statistics that are not 0/1 (a fresh BatchNorm's), so that the normalisation shows.
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    )
    # FLUX.2-dev's scheduler_config.json (dynamic shifting: the pipeline computes mu from the image size).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                  transformer=transformer).save_pretrained(folder)
    with open(os.path.join(folder, "model_index.json")) as file:
        assert json.load(file)["_class_name"] == "Flux2Pipeline"
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_flux2(sys.argv[1] if len(sys.argv) > 1 else "tiny-flux2"))
