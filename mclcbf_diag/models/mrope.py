"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic-resolution images and 3-D M-RoPE positions.

Qwen3-VL shares all of it (16-px patches; its rotary module interleaves the three axes' frequencies
instead of concatenating sections, inside the module, so nothing here changes); its deepstack features
are :mod:`.deepstack`'s.

Mechanism
---------
* **Image tokens.** The image processor resizes an image (any aspect ratio) so that both sides are
  multiples of ``patch_size · spatial_merge_size`` and its area lies in ``[min_pixels, max_pixels]``
  (``size["shortest_edge"]``/``["longest_edge"]``), and returns its patches flattened,
  ``pixel_values [patches, C·T·p·p]`` concatenated over the images of a batch, with
  ``image_grid_thw [images, 3]`` (frames, patch rows, patch columns). The vision tower merges each
  2 × 2 block of patches into one token, so an image is ``t · (h/2) · (w/2)`` ``<|image_pad|>``
  tokens, in row-major order over the merged ``(h/2) × (w/2)`` grid: the overlay's grid
  (:func:`image_grid`), which need not be square.
* **Positions.** Every token has three position ids (temporal, height, width), ``[3, batch, seq]``:
  text tokens count up on all three; an image's tokens share the temporal id ``s`` (the position
  where the image starts) and take ``s + row`` and ``s + column`` as height and width ids; the text
  after the image continues from ``s + max(h/2, w/2)``, so positions are *not* ``cumsum − 1``. The
  model's own ``get_rope_index`` computes them (per row, padding skipped); :func:`position_ids`
  asks it, and falls back to ``cumsum − 1`` for every other family (and for prompts without an
  image). Everywhere the toolkit builds positions itself (batching, image-free views, a
  continuation of a cached prefix, which slices ``[..., start:]``) it calls this function.
* **Rotary.** In transformers ≥ 5.18 the text model's rotary module already interleaves the three
  axes' frequencies (``mrope_section``) into one ``cos``/``sin`` ``[batch, seq, head_dim]``, which
  each attention applies with the plain ``apply_rotary_pos_emb``: so the look-ahead, which reads
  that module's output, reproduces the attention exactly with its backbone's usual math
  (:data:`~mclcbf_diag.models.adapter.TEXT_MATH`).
* **Processor.** transformers' Qwen-VL processors require a video processor, which needs
  torchvision; the toolkit measures images only, so :func:`load_processor` builds the checkpoint's
  processor from its image processor and tokenizer alone (one path, with or without torchvision).
"""

from __future__ import annotations

import torch

MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def uses_mrope(config) -> bool:
    """Whether ``config`` (a model's) is a family whose positions are 3-D M-RoPE ids."""
    return getattr(config, "model_type", None) in MROPE_TYPES


def position_ids(lm, inputs: dict) -> torch.Tensor:
    """The position ids ``inputs`` (a left-padded batch: input_ids, attention_mask, the processor's outputs) run at:
    ``[3, B, S]`` from the model's ``get_rope_index`` for an M-RoPE family with images, else ``[B, S]``
    ``cumsum − 1``."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    model = getattr(lm, "model", lm)
    if uses_mrope(model.config) and inputs.get("image_grid_thw") is not None:
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == model.config.image_token_id).long()
        pos, _ = model.model.get_rope_index(ids, types.to(ids.device), image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=mask)
        return pos
    return (mask.cumsum(-1) - 1).clamp(min=0)


def embeds_positions(lm, inputs: dict) -> dict:
    """For a forward fed ``inputs_embeds`` instead of ``inputs``' ids: ``{"position_ids": …}`` for an M-RoPE family
    (the model would otherwise count from its last call's ``rope_deltas``), ``{}`` for every other."""
    if not uses_mrope(getattr(lm, "model", lm).config):
        return {}
    return {"position_ids": inputs["position_ids"] if "position_ids" in inputs else position_ids(lm, inputs)}


def position_rows(positions: torch.Tensor, idx) -> torch.Tensor:
    """Rows ``idx`` of a batch's position ids: ``[B, S]``, or M-RoPE's ``[3, B, S]``."""
    return positions[:, idx] if positions.dim() == 3 else positions[idx]


def prompt_positions(lm, inputs: dict, first: int, rows: int) -> torch.Tensor:
    """Positions ``first …`` of one unpadded prompt for ``rows`` rows that each continue it.

    Args:
        lm: the language model (its M-RoPE ``get_rope_index``, if any, via :func:`position_ids`).
        inputs: the prompt's model inputs (one row is read: input_ids, attention_mask and the image fields).
        first: the first position returned.
        rows: how many rows the positions are repeated for.

    Returns:
        ``[rows, T − first]``, or M-RoPE's ``[3, rows, T − first]`` (``T`` the prompt's length).
    """
    keys = ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")
    pos = position_ids(lm, {k: inputs[k][:1] for k in keys if inputs.get(k) is not None})
    pos = pos[..., first:]
    return pos.expand(*pos.shape[:-2], rows, pos.shape[-1])


def merge_size(config) -> int:
    return int(config.vision_config.spatial_merge_size)


def image_grid(config, enc) -> tuple[int, int] | None:
    """The merged token grid (rows, columns) of the first image of ``enc``; None for a family without
    ``image_grid_thw``."""
    if not uses_mrope(config) or enc.get("image_grid_thw") is None:
        return None
    t, h, w = (int(x) for x in enc["image_grid_thw"][0].tolist())
    m = merge_size(config)
    return h // m, w // m


def image_tokens(config, grid_thw: torch.Tensor) -> list[int]:
    """How many image tokens each image of ``grid_thw`` [images, 3] becomes."""
    return (grid_thw.prod(-1) // merge_size(config) ** 2).tolist()


def token_bound(processor) -> int | None:
    """The most image tokens one image can become (``max_pixels`` over a merged patch's area); None when the image
    processor has no pixel budget (not a Qwen-VL one)."""
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    merge, patch = getattr(ip, "merge_size", None), getattr(ip, "patch_size", None)
    if not (isinstance(longest, int) and isinstance(merge, int) and isinstance(patch, int)):
        return None
    return longest // (patch * merge) ** 2


def seen_image(pixel_values: torch.Tensor, grid_thw: torch.Tensor, image_processor) -> torch.Tensor:
    """The first image of flattened patches as ``[C, H, W]`` (normalised, as the processor left it).

    The processor's patch layout undone (its first frame).

    Args:
        pixel_values: the flattened patches [patches, C·T·p·p].
        grid_thw: [images, 3] each image's (frames, height, width) in patches; the first is read.
        image_processor: the processor's image processor (its merge size, patch size, temporal patch size).

    Returns:
        [C, height·p, width·p], height and width in patches.
    """
    t, h, w = (int(x) for x in grid_thw[0].tolist())
    m, p, temporal = image_processor.merge_size, image_processor.patch_size, image_processor.temporal_patch_size
    first = pixel_values[: t * h * w].reshape(t, h // m, w // m, m, m, -1, temporal, p, p)[0, ..., 0, :, :]
    c = first.shape[4]
    return first.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, h * p, w * p)


def shared_features(lm, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Each row's image features (one image per row) from one vision-tower run over the distinct images.

    Images are the same when they have the same grid and equal pixels.

    Args:
        lm: the loaded model.
        pixel_values: the batch's flattened patches.
        grid_thw: [B, 3] each row's image's (frames, height, width) in patches.

    Returns:
        One feature tensor per row.
    """
    return shared_outputs(lm, pixel_values, grid_thw)[0]


def shared_outputs(lm, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """``(each row's image features, their deepstack features per level and row, or None without any)`` from one
    vision-tower run over the distinct images (Qwen3-VL's tower returns deepstack features, models/deepstack.py)."""
    chunks = torch.split(pixel_values, grid_thw.prod(-1).tolist())
    rows: list[int] = []  # the first row holding each distinct image
    which: list[int] = []  # each row's distinct image
    for b, chunk in enumerate(chunks):
        n = next((n for n, r in enumerate(rows)
                  if torch.equal(grid_thw[r], grid_thw[b]) and torch.equal(chunks[r], chunk)), None)
        if n is None:
            n = len(rows)
            rows.append(b)
        which.append(n)
    feats = lm.model.get_image_features(pixel_values=torch.cat([chunks[b] for b in rows]),
                                        image_grid_thw=grid_thw[rows], return_dict=True)
    deep = getattr(feats, "deepstack_features", None)
    per_level = None if deep is None else [[level[n] for n in which] for level in deep]
    return [feats.pooler_output[n] for n in which], per_level


def _image_only(base):
    """A subclass of the processor class ``base`` whose only parts are the image processor and the tokenizer."""
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            for part in ("vision_start", "vision_end"):  # Qwen3-VL's processor names them too
                token = getattr(tokenizer, f"{part}_token", None) or f"<|{part}|>"
                setattr(self, f"{part}_token", token)
                setattr(self, f"{part}_token_id", tokenizer.convert_tokens_to_ids(token))
            self.video_processor = None  # images only: the toolkit never passes videos
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor


def image_only_processor(model_type: str, image_processor, tokenizer, chat_template=None):
    """``model_type``'s processor from an image processor and a tokenizer.

    Args:
        model_type: ``qwen2_5_vl``, ``qwen2_vl`` or ``qwen3_vl`` (Qwen2_5_VLProcessor, Qwen2VLProcessor,
            Qwen3VLProcessor).
        image_processor: the checkpoint's image processor.
        tokenizer: the checkpoint's tokenizer.
        chat_template: the processor's chat template (None: none).

    Returns:
        The processor, limited to images (the image-only subclass of the transformers processor).
    """
    import transformers

    base = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor",
            "qwen3_vl": "Qwen3VLProcessor"}[model_type]
    return _image_only(getattr(transformers, base))(image_processor, tokenizer, chat_template=chat_template)


def load_processor(where: str, config):
    """The checkpoint's processor for images: its image processor and tokenizer (no video processor, which needs
    torchvision and which the toolkit never uses), whether or not torchvision is installed."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    images = AutoImageProcessor.from_pretrained(where, local_files_only=True)
    return image_only_processor(config.model_type, images, tokenizer, getattr(tokenizer, "chat_template", None))
