"""InternVL in transformers' native form (``model_type`` ``internvl``): its image tokens, its processor.

Layout. The processor replaces the prompt's placeholder (``processor.image_token``, ``<IMG_CONTEXT>``;
prompts write the portable ``<image>``, :func:`~.processing.processor_prompt`) by ``<img>``, then
``image_seq_length`` context tokens per tile, then ``</img>``. The image processor (GotOcr2's) cuts the
picture into ``rows × cols`` tiles of the tower's size (``crop_to_patches``, between ``min_patches`` and
``max_patches`` tiles, row-major) and, when there is more than one tile, appends a *thumbnail*: the whole
picture at one tile's size. Each tile is one row of ``pixel_values``. The model runs the vision tower on
every tile, drops its CLS, pixel-shuffles the ``p × p`` patch map into ``s × s`` tokens (``s = p ·
downsample_ratio``; token ``(i, j)`` holds the patches of rows ``2i, 2i+1`` and columns ``2j, 2j+1``,
row-major) and projects them. So an image's context tokens are one ``s × s`` grid per tile, in the order
of ``pixel_values``, and the *last* grid is always the whole picture (the thumbnail, or the only tile):
the overlay draws that one (:func:`whole_picture`, as LLaVA-NeXT's overlay draws its base grid). The
image-attention masses, the look-ahead and ``flow`` see every context token of every tile; ``<img>`` and
``</img>`` are text tokens (``flow`` counts ``</img>`` with the question).

Batching. LLaVA's model merges shared image features given as a list (one entry per image, which the
toolkit's batching, units and views select rows of); InternVL's merges one tensor. :func:`per_prompt`
gives each prompt its tiles' features as one ``[tiles · s², hidden]`` entry, and :func:`concatenate_features`
(a forward pre-hook on the inner model, registered at load by :func:`prepare`) concatenates the list in
prompt order, the order in which the model's ``masked_scatter`` fills the context tokens. The pixels kept
beside the features say which prompt each tile belongs to (``pixel_rows``), so that a method viewing some
rows' images (:mod:`mclcbf_diag.interventions.views`) takes their own tiles.

Processor. transformers builds every ``InternVLProcessor`` with a video processor, which needs torchvision;
the toolkit never passes videos, so it loads :class:`ImageInternVLProcessor`, the same class without that
attribute (the same text and image processing). Its image processor must be GotOcr2's (the tile order above);
another is refused when the processor loads.
"""

from __future__ import annotations

import torch
from transformers import InternVLProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import UserError


class ImageInternVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` without its video processor (see the module docstring)."""

    @classmethod
    def get_attributes(cls):
        return [name for name in super().get_attributes() if name != "video_processor"]


def load_processor(where: str) -> ImageInternVLProcessor:
    """The checkpoint's InternVL processor (tokenizer, image processor, ``image_seq_length``), offline; an image
    processor other than GotOcr2's (whose tiles end with the thumbnail the overlay draws) is refused."""
    processor = ImageInternVLProcessor.from_pretrained(where, local_files_only=True)
    kind = type(processor.image_processor).__name__
    if not kind.startswith("GotOcr2ImageProcessor"):
        from ..storage import show

        raise UserError(f"--model {show(where)}: its InternVL processor cuts images with {kind}, not GotOcr2's "
                        "image processor, whose tile order (the thumbnail last) the toolkit reads; restore the "
                        "checkpoint's preprocessor files")
    return processor


def tile_grid(config) -> tuple[int, int]:
    """(rows, columns) of the tokens one tile becomes: the tower's patch map after the pixel shuffle."""
    vision = config.vision_config
    pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    (height, width), (ph, pw) = pair(vision.image_size), pair(vision.patch_size)
    ratio = float(config.downsample_ratio)
    return int(height // ph * ratio), int(width // pw * ratio)


def whole_picture(config, n_tokens: int, n_tiles: int, where: str) -> tuple[int, int]:
    """The grid of the whole picture (the last tile's), once the image tokens are checked to form the tiles.

    Args:
        config: the InternVL configuration (its vision tower and ``downsample_ratio`` give a tile's grid).
        n_tokens: the prompt's count of image (context) tokens.
        n_tiles: the tiles the processor made of the image (the last one is the whole picture).
        where: the model as the error names it (``--model …``).

    Returns:
        (rows, columns) of one tile's tokens.

    Raises:
        UserError: ``n_tokens`` is not ``n_tiles`` tile grids (processor and vision tower disagree), before the model
            runs.
    """
    rows, cols = tile_grid(config)
    if n_tokens != n_tiles * rows * cols:
        raise UserError(f"--model {where}: the image becomes {n_tokens} image tokens, not the {n_tiles * rows * cols} "
                        f"of its {n_tiles} tile{'s' * (n_tiles != 1)} of {rows} × {cols} tokens: the processor's "
                        "image_seq_length and the vision tower disagree; check the checkpoint's processor_config.json "
                        "and config.json (image_size, patch_size, downsample_ratio)")
    return rows, cols


def token_bound(processor, config) -> int | None:
    """The most tokens one placeholder becomes: ``<img>``, the context tokens of the most tiles, ``</img>`` (an
    upper bound: the processor crops to tiles by default, whatever the image processor's own setting); None for
    another family."""
    if getattr(config, "model_type", None) != "internvl":
        return None
    most = int(getattr(processor.image_processor, "max_patches", 1) or 1)
    tiles = most + 1 if most > 1 else 1  # the tiles and their thumbnail
    rows, cols = tile_grid(config)
    return tiles * rows * cols + 2


def per_prompt(model, distinct: torch.Tensor, inverse: torch.Tensor, tiles: list[int]) -> list[torch.Tensor]:
    """Each prompt's image features, the vision tower run once per distinct tile.

    Args:
        model: the loaded InternVL model (its ``get_image_features``).
        distinct: the batch's distinct tiles' pixel values [d, C, H, W].
        inverse: [t] tile ``t`` of the batch is ``distinct[inverse[t]]``.
        tiles: prompt ``b`` holds the next ``tiles[b]`` tiles of the batch.

    Returns:
        One tensor per prompt, ``[tiles[b] · s², hidden]`` (``s × s`` tokens a tile).
    """
    feats = model.get_image_features(pixel_values=distinct, return_dict=True)
    per_tile = feats.pooler_output[inverse]
    return [chunk.reshape(-1, chunk.shape[-1]) for chunk in torch.split(per_tile, tiles)]


def concatenate_features(module, args, kwargs):
    """Forward pre-hook: shared image features given as a per-prompt list become the one tensor InternVL merges."""
    shared = kwargs.get("mm_encoder_outputs")
    image = shared.get("image") if isinstance(shared, dict) else None
    if image is None or not isinstance(image.pooler_output, (list, tuple)):
        return None
    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in image.pooler_output])
    return args, {**kwargs, "mm_encoder_outputs": {**shared, "image": BaseModelOutputWithPooling(pooler_output=feats)}}


def prepare(model) -> None:
    """Register :func:`concatenate_features` on the inner model (the one that merges the features)."""
    model.model.register_forward_pre_hook(concatenate_features, with_kwargs=True)
