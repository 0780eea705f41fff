"""LLaVA-OneVision's processor, for images only.

transformers' ``LlavaOnevisionProcessor`` holds three parts: the image processor, the tokenizer
and a video processor. The video processor needs torchvision (without it transformers cannot
even build the processor: ``AutoProcessor`` asks for a ``video_preprocessor_config.json`` that
only a torchvision install reads), and the toolkit never sends a video. :class:`OnevisionImageProcessor`
is transformers' class with the video processor left out of its parts, nothing else changed:
the same image processing, the same image-token count (``_get_number_of_features``: base grid,
unpadded tiles, the "anyres_max_N" resize, a newline per row) from the same
``processor_config.json`` fields (``num_image_tokens``, ``vision_feature_select_strategy``,
``vision_aspect_ratio``, the chat template). :func:`load_processor` reads a checkpoint's
processor with it, so OneVision checkpoints load with or without torchvision, identically.
"""

from __future__ import annotations

from transformers import LlavaOnevisionProcessor


class OnevisionImageProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without its video processor (its parts are its ``__init__``'s arguments)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)


def load_processor(where: str) -> OnevisionImageProcessor:
    """The processor of the OneVision checkpoint at ``where`` (a folder or a cached hub id), offline, images only."""
    return OnevisionImageProcessor.from_pretrained(where, local_files_only=True)


def save_processor(processor: OnevisionImageProcessor, folder) -> None:
    """Save ``processor`` as transformers' own class would (``processor_class`` LlavaOnevisionProcessor)."""
    import json
    from pathlib import Path

    processor.save_pretrained(folder)
    path = Path(folder) / "processor_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["processor_class"] = LlavaOnevisionProcessor.__name__
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
