"""Build the embedded model's tokenizer, processor and (untrained) model, offline.

The model is a real ``LlavaForConditionalGeneration`` with LLaVA-1.5's token layout:

* **Vision.** A CLIP ViT at 336 px with patch 14 (24×24 = 576 patches + CLS), features from
  ``vision_feature_layer = -2`` (LLaVA-1.5's choice) with the "default" strategy (CLS
  dropped): the processor expands ``<image>`` into **576 image tokens**. The tower has 3
  layers; stage 0 of training pre-trains it through its *last* layer (as CLIP's own
  pre-training does), LLaVA reads the penultimate one, and the tower is frozen afterwards,
  so the last layer's missing gradient in stage 1 costs nothing (see MODEL_CARD.md).
* **Tokenizer.** A Llama-2-style SentencePiece-like tokenizer built with ``tokenizers``: a
  Unigram model over "▁"-marked subword pieces with byte fallback (``<0x00>``–``<0xFF>`` at
  ids 3–258 as in Llama, so ``\\n`` is ``<0x0A>`` = 13), a Metaspace pre-tokenizer,
  ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2. ``<image>`` and ``<pad>`` come right after the regular
  vocabulary (as llava-hf's 32000 and 32001), and the embedding matrix is padded to a
  multiple of 64 (llava-hf: 32064). ``"USER: <image>\\n…"`` tokenises to
  ``<s> ▁US ER : ▁ <image>×576 …`` exactly like llava-hf's ``[1, 3148, 1001, 29901, 29871]``,
  so the image occupies positions 5–580.
* **Language model.** Llama with 8 decoder layers, RMSNorm, RoPE, eager attention.

Nothing here downloads anything.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
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

PATCH_SIZE = 14
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
IMAGE_START = 5  # BOS + "▁US" "ER" ":" "▁"
PROMPT = "USER: <image>\n{question}\nASSISTANT:"
QUESTION = "Is there a {name} in the image?"
CAPTION_QUESTION = "What objects are in the image?"

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# Characters every text can fall back to (besides bytes), as single pieces.
CHARS = ["▁"] + [chr(c) for c in range(33, 127)]
# Subword pieces, Llama-2-like: a word-start piece carries "▁"; words the vocabulary lacks
# split into pieces ("USER" -> "▁US" "ER", "ASSISTANT" -> "ASS" "IST" "ANT").
PIECES = [
    "▁US", "US", "ER", "ASS", "▁ASS", "IST", "ANT",
    "▁Is", "Is", "▁is", "▁there", "▁There", "▁a", "▁an", "▁in", "▁the", "▁The", "▁image",
    "▁Yes", "▁No", "Yes", "No", "▁yes", "▁no", "yes", "no", "▁YES", "▁NO",
    "▁What", "What", "▁objects", "▁object", "▁are", "▁and", "▁not", "▁of", "▁picture",
    "▁shows", "▁has", "▁I", "▁see", "▁it", "▁this", "▁with", "▁here", "▁photo",
    "▁dog", "▁car", "▁fork", "▁cup", "▁bird", "▁fr", "is", "bee", "▁truck", "▁kn", "ife",
    "▁bowl", "▁kite", "▁pizza", "▁person", "▁table", "▁chair",
]
# llava-hf's chat template, with the newline written as {{ '\n' }} as Jinja needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _check_pieces() -> None:
    names = {"▁" + n for n in CLASS_NAMES}
    missing = {"▁dog", "▁car", "▁fork", "▁cup", "▁bird", "▁truck", "▁bowl", "▁kite"} - names
    assert not missing and len(set(PIECES)) == len(PIECES), "duplicate or missing pieces"


def vocabulary() -> list[tuple[str, float]]:
    """The Unigram vocabulary: (piece, log-probability score), in id order."""
    _check_pieces()
    vocab = [(s, 0.0) for s in SPECIALS] + [(b, 0.0) for b in BYTES]
    # Multi-character pieces score far above single characters, so Viterbi prefers them.
    vocab += [(p, -2.0 - 0.001 * i) for i, p in enumerate(PIECES)]
    vocab += [(c, -12.0 - 0.001 * i) for i, c in enumerate(CHARS) if c not in PIECES]
    return vocab


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = vocabulary()
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", add_bos_token=True, add_eos_token=False,
    )
    # After the regular vocabulary, in this order, as llava-hf: <image> then <pad>.
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.add_special_tokens({"pad_token": PAD_TOKEN})
    fast.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", fast.bos_token_id)],
    )
    assert fast.convert_tokens_to_ids(IMAGE_TOKEN) == len(vocab)
    assert fast.pad_token_id == len(vocab) + 1
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


def padded_vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // 64) * 64


def build_config(tokenizer: PreTrainedTokenizerFast, *, text_layers: int = 8, hidden: int = 128,
                 heads: int = 4, intermediate: int = 352, vision_hidden: int = 64,
                 vision_layers: int = 3) -> LlavaConfig:
    """The LLaVA-1.5-style config of the embedded model (see the module docstring), eager attention.

    Args:
        tokenizer: the tokenizer (:func:`build_tokenizer`): the vocabulary, padded to a multiple of 64, and the
            special ids.
        text_layers: Llama decoder layers.
        hidden: the language model's hidden size.
        heads: its attention heads (as many KV heads).
        intermediate: its MLP's intermediate size.
        vision_hidden: the CLIP tower's hidden size (one attention head per 32, at least one).
        vision_layers: the CLIP tower's layers.
    """
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=padded_vocab_size(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=N_IMAGE_TOKENS,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-2,  # LLaVA-1.5's choice; see the module docstring
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return config


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **sizes) -> LlavaForConditionalGeneration:
    """An untrained embedded model, its weights initialised after ``torch.manual_seed(seed)``.

    Args:
        tokenizer: the tokenizer (:func:`build_tokenizer`).
        seed: the initialisation's seed (it seeds torch's global generator).
        **sizes: :func:`build_config`'s sizes (``text_layers``, ``hidden`` …).
    """
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tokenizer, **sizes))
    model.config._attn_implementation = "eager"
    return model
