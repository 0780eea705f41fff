"""Build the embedded model's tokenizer, processor and (untrained) model, offline.

The embedded model is a real ``LlavaForConditionalGeneration``: a CLIP vision tower, the
two-layer GELU projector and a Llama language model with RMSNorm and RoPE, only small.
Its tokenizer is word-level (one id per word of the synthetic world), wrapped in
``PreTrainedTokenizerFast`` so that the standard ``LlavaProcessor`` expands ``<image>``
into one token per image patch, exactly as llava-hf does for LLaVA-1.5
(``patch_size`` 8 on 64×64 images, CLS dropped by the "default" strategy: 64 tokens).
Nothing here downloads anything.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip import CLIPImageProcessorPil

from .world import CLASS_NAMES, IMAGE_SIZE

PATCH_SIZE = 8
PROMPT = "USER: <image>\n{question}\nASSISTANT:"
QUESTION = "Is there a {name} in the image?"
CAPTION_QUESTION = "What objects are in the image?"

SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = [
    "USER", "ASSISTANT", ":", "\n", "?", ".", ",",
    "Is", "there", "a", "in", "the", "image", "Yes", "No",
    "What", "objects", "are", "and",
    *CLASS_NAMES,
]
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# llava-hf's chat template, with the newline written as {{ '\n' }} as Jinja needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split on spaces, then isolate newlines, punctuation and words.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|[^\w\s]|\w+"), behavior="isolated"),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", add_bos_token=True, add_eos_token=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN], "pad_token": PAD_TOKEN})
    # Prepend BOS the way Llama's tokenizer does.
    from tokenizers.processors import TemplateProcessing

    fast.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", fast.bos_token_id)],
    )
    return fast


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=320, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=n_patches,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # with -2 a 3-layer tower's last layer would get no gradient
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    return config


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tokenizer))
    model.config._attn_implementation = "eager"
    return model
