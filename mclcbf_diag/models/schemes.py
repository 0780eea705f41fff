"""What each family's processor and model make of one image: one :class:`ImageScheme` per family.

The architecture adapter (:mod:`.adapter`) says where a family's modules sit and what its text model
computes; its image scheme says what an image becomes, everything the toolkit needs to measure
image tokens exactly and to batch them:

* ``load_processor`` / ``check_processor``: the checkpoint's processor (when ``AutoProcessor``
  cannot build it without an optional package) and what it does that is not measured, refused
  before any weight is read;
* ``prepare``: anything the loaded model needs to take shared image features;
* ``image_grid`` / ``grid_mask`` / ``picture``: the overlay's patch grid (rows, columns) of one prompt,
  checked against the number of image tokens the processor wrote, which image tokens form it, and the
  pixels it lies over; ``tile_grid``: a second grid where the image has one (LLaVA-NeXT's and OneVision's
  high-resolution tiles: each cell's token and the unpadded tiles' pixels);
* ``token_bound``: the most image tokens one image can become (the prompt-length check);
* ``processor_images`` / ``features`` / ``encoder_output``: a batch's images as the processor takes
  them, and the vision tower run once per distinct image, its features per prompt as the model merges
  them (with, for a tiled image, which prompt each row of pixels belongs to), handed to the model as its
  tower's output (Qwen3-VL's with its deepstack features, :mod:`.deepstack`).

Positions that are not ``cumsum − 1`` of the padding mask (Qwen-VL's 3-D M-RoPE ids) are asked of
:func:`.mrope.position_ids`, which every family passes through. :data:`SCHEMES` maps config.json's
``model_type`` to its scheme; a family's own module holds the mechanics (:mod:`.anyres`,
:mod:`.onevision`, :mod:`.internvl`, :mod:`.mrope`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoProcessor

from ..errors import UserError
from . import deepstack, internvl, mrope
from .anyres import ImageLayout, anyres_layout, max_patches, tiles_picture, token_bound
from .processing import check_image_grid, patch_grid_shape

PIXEL_ROWS = "pixel_rows"
"""The key, beside the pixels kept with a batch's shared image features, of :func:`pixel_owner`'s answer where a
prompt's image is several rows of pixels (InternVL's tiles)."""


def pixel_owner(inputs: dict, n_rows: int, image_token_id: int | None = None) -> torch.Tensor:
    """Which prompt (row of ``inputs["input_ids"]``) each of the ``n_rows`` rows of a batch's pixels belongs to.

    The rows come prompt after prompt, each prompt's image one run of them: Qwen-VL's flattened patches, as many as
    its ``image_grid_thw`` (t · h · w, one image a prompt); otherwise (InternVL's tiles, every tile the same number of
    image tokens) as many as the prompt's share of the batch's image tokens, ``image_token_id``'s.

    Args:
        inputs: the batch's model inputs (``input_ids``; ``image_grid_thw`` for Qwen-VL).
        n_rows: the rows of pixels (``pixel_values.shape[0]``).
        image_token_id: the image token (not needed with ``image_grid_thw``).

    Returns:
        [n_rows] long, on the CPU: row ``r`` of the pixels is prompt ``owner[r]``'s.
    """
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        counts = grid.prod(-1).cpu()
    else:
        counts = (inputs["input_ids"] == image_token_id).sum(-1).cpu()
        counts = counts // (int(counts.sum()) // n_rows)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def owned_rows(pixels: torch.Tensor, owner: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``pixels`` that prompts ``idx`` own (:func:`pixel_owner`), prompt after prompt in that order, and
    their owners renumbered (``idx[n]`` → ``n``, on ``owner``'s device)."""
    picked = [torch.nonzero(owner == i).flatten() for i in idx]
    renumbered = torch.repeat_interleave(torch.arange(len(idx), device=owner.device),
                                         torch.tensor([p.numel() for p in picked], device=owner.device))
    return pixels[torch.cat(picked).to(pixels.device)], renumbered


@dataclass(frozen=True)
class TileGrid:
    """A grid of image tokens the overlay draws besides the first: ``cells`` [rows, columns] holds each cell's prompt
    position (an index into an attention row's keys), ``pixels`` [3, H, W] the normalised pixels under it."""

    cells: torch.Tensor
    pixels: torch.Tensor


class ImageScheme:
    """LLaVA-1.5's: one fixed-size image per prompt, its tokens one patch grid (after a CLS kept by the "full"
    feature selection)."""

    def load_processor(self, config, where: str):
        return AutoProcessor.from_pretrained(where, local_files_only=True)

    def check_processor(self, config, processor, where: str) -> None:
        """A UserError when the processor does something to images that is not measured (nothing here)."""

    def prepare(self, model) -> None:
        """Make the loaded model take shared image features (nothing here: LLaVA's merge takes a list)."""

    def image_grid(self, config, enc, n_tokens: int, where: str) -> tuple[int, int]:
        """(rows, columns) of the overlay's grid for the first prompt of ``enc`` with ``n_tokens`` image tokens.

        Here one patch grid of ``pixel_values`` (plus a CLS under the ``full`` feature selection), checked by
        :func:`check_image_grid`.

        Args:
            config: the model's configuration.
            enc: the processor's outputs for the batch (``pixel_values`` and the family's image fields).
            n_tokens: the first prompt's count of image tokens.
            where: the model as the error names it (``--model …``).

        Returns:
            (rows, columns) of the grid.

        Raises:
            UserError: the image tokens do not form the grid, or the grid is not square.
        """
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        grid = patch_grid_shape(enc["pixel_values"], config.vision_config.patch_size)
        return check_image_grid(n_tokens, grid, where, extra=int(strategy == "full"))

    def grid_mask(self, config, image_mask: torch.Tensor) -> torch.Tensor:
        """The image tokens (bool, shaped as ``image_mask``) that form the overlay's grid: all of them here."""
        return image_mask

    def layout(self, config, enc) -> ImageLayout | None:
        """The anyres layout of the first image of ``enc`` (None: one fixed grid, as here)."""
        return None

    def tile_grid(self, config, enc, image_mask: torch.Tensor) -> TileGrid | None:
        """The second grid the overlay draws, where an image has one (LLaVA-NeXT and OneVision: the high-resolution
        tiles); None here."""
        return None

    def picture(self, enc, image_processor) -> torch.Tensor:
        """The pixels [3, H, W] under the overlay's grid (normalised, as the processor made them): the first
        image (LLaVA-NeXT and OneVision: the base tile, the whole picture at the tower's size)."""
        pv = enc["pixel_values"]
        return pv.reshape(-1, *pv.shape[-3:])[0]

    def token_bound(self, config, processor) -> int | None:
        """The most image tokens one image can become (None: the processor's count for one image is the bound)."""
        return None

    def processor_images(self, processor, images: list) -> list:
        """A batch's images (one per prompt) as the processor takes them."""
        return list(images)

    def features(self, lm, inputs: dict, pixel_values: torch.Tensor) -> tuple[list | torch.Tensor, torch.Tensor | None]:
        """``(features per prompt, the prompt of each row of pixels or None)``: the tower once per distinct image."""
        uniq, inverse = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
        feats = lm.model.get_image_features(pixel_values=uniq.view(-1, *pixel_values.shape[1:]), return_dict=True)
        return [feats.pooler_output[j] for j in inverse.tolist()], None

    def encoder_output(self, lm, inputs: dict, pixel_values: torch.Tensor):
        """``(the tower's output the model merges, mm_encoder_outputs["image"]; the prompt of each row of pixels or
        None)``: :meth:`features` as the model takes them."""
        per_row, owner = self.features(lm, inputs, pixel_values)
        return deepstack.encoder_output(per_row, None), owner


def _masked_range(image_mask: torch.Tensor, lo: int, hi: int | None) -> torch.Tensor:
    """The image tokens ``lo … hi`` (in order) of ``image_mask`` as a mask of the same shape."""
    positions = torch.nonzero(image_mask.reshape(-1)).flatten()
    out = torch.zeros_like(image_mask.reshape(-1), dtype=torch.bool)
    out[positions[lo:hi]] = True
    return out.reshape(image_mask.shape)


class AnyresScheme(ImageScheme):
    """LLaVA-NeXT: a base grid, then the unpadded high-resolution tiles with a newline per row (:mod:`.anyres`); the
    overlay draws the base grid and the tiles' grid. An image is its pixels and its ``image_sizes``, distinct over
    both."""

    def params(self, config) -> tuple[int, int | None]:
        """(tokens before the base patches: a CLS kept by the "full" selection, "anyres_max" N: None, no resizing)."""
        return int(getattr(config, "vision_feature_select_strategy", "default") == "full"), None

    def layout(self, config, enc) -> ImageLayout | None:
        """The anyres layout of the first image of ``enc`` (None without its ``image_sizes``)."""
        if "image_sizes" not in enc:
            return None
        extra, most = self.params(config)
        size = tuple(int(x) for x in enc["image_sizes"][0].tolist())
        vision = config.vision_config
        return anyres_layout(size, config.image_grid_pinpoints, vision.image_size, vision.patch_size, extra=extra,
                             most=most)

    def image_grid(self, config, enc, n_tokens: int, where: str) -> tuple[int, int]:
        """The anyres base grid, once ``n_tokens`` is checked against the image's layout.

        Without a layout, the fixed grid of :class:`ImageScheme`.

        Args:
            config: the model's configuration.
            enc: the processor's outputs for the batch (``pixel_values`` and the family's image fields).
            n_tokens: the first prompt's count of image tokens.
            where: the model as the error names it (``--model …``).

        Returns:
            (rows, columns) of the base grid.

        Raises:
            UserError: ``n_tokens`` is not the layout's count (base grid, tiles, a newline per row).
        """
        layout = self.layout(config, enc)
        if layout is None:
            return super().image_grid(config, enc, n_tokens, where)
        if n_tokens != layout.n_tokens:
            size = tuple(enc["image_sizes"][0].tolist())
            (rows, cols), (tr, tc) = layout.base, layout.tiles
            raise UserError(f"--model {where}: the image of size {size} becomes {n_tokens} image tokens, not the "
                            f"{layout.n_tokens} of its anyres layout (a {rows} × {cols} base grid, {tr} × {tc} "
                            "tiles, a newline per row); check the checkpoint's processor files")
        return layout.base

    def tile_grid(self, config, enc, image_mask: torch.Tensor) -> TileGrid | None:
        """The high-resolution tiles' grid of the first prompt of ``enc``: each cell's prompt position (the layout's
        ``tiles`` tokens among the image tokens of ``image_mask``, newlines left out) and the unpadded tiles' pixels
        (:func:`.anyres.tiles_picture`)."""
        layout = self.layout(config, enc)
        if layout is None:
            return None
        image = torch.nonzero(image_mask.reshape(-1)).flatten()
        cells = image[torch.as_tensor(layout.groups()["tiles"], device=image.device)]
        size = tuple(int(x) for x in enc["image_sizes"][0].tolist())
        pv = enc["pixel_values"][0]  # [tiles, C, H, W]: the base image, then the high-resolution tiles
        vision = config.vision_config
        pixels = tiles_picture(pv[1:].float().cpu().numpy(), size, config.image_grid_pinpoints, vision.image_size,
                               vision.patch_size)
        return TileGrid(cells, torch.from_numpy(np.ascontiguousarray(pixels)))

    def grid_mask(self, config, image_mask: torch.Tensor) -> torch.Tensor:
        extra = self.params(config)[0]
        side = config.vision_config.image_size // config.vision_config.patch_size
        return _masked_range(image_mask, extra, extra + side * side)

    def token_bound(self, config, processor) -> int | None:
        vision = config.vision_config
        return token_bound(config.image_grid_pinpoints, vision.image_size, vision.patch_size, *self.params(config))

    def features(self, lm, inputs: dict, pixel_values: torch.Tensor):
        sizes = inputs.get("image_sizes")
        if sizes is None:
            return super().features(lm, inputs, pixel_values)
        inverse = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)[1]
        keys = [(j, *sizes[b].tolist()) for b, j in enumerate(inverse.tolist())]
        first: dict[tuple, int] = {}  # each distinct image → the first row holding it
        for b, k in enumerate(keys):
            first.setdefault(k, b)
        rows = list(first.values())
        feats = lm.model.get_image_features(pixel_values=pixel_values[rows], image_sizes=sizes[rows],
                                            return_dict=True)
        index = {k: n for n, k in enumerate(first)}
        return [feats.pooler_output[index[k]] for k in keys], None


class OnevisionScheme(AnyresScheme):
    """LLaVA-OneVision: LLaVA-NeXT's layout with a base grid of exactly p² features (a SigLIP tower, no CLS) and the
    tile map resized past "anyres_max_N"; its processor read for images only (its video processor needs
    torchvision, :mod:`.onevision`)."""

    def params(self, config) -> tuple[int, int | None]:
        return 0, max_patches(config.vision_aspect_ratio)

    def load_processor(self, config, where: str):
        from .onevision import load_processor

        return load_processor(where)


class InternVLScheme(ImageScheme):
    """InternVL: an image is its tiles (and, with several, a thumbnail), one pixel-shuffled grid each
    (:mod:`.internvl`); the overlay draws the whole picture's grid (the last one)."""

    def load_processor(self, config, where: str):
        return internvl.load_processor(where)  # without its video processor, which needs torchvision

    def prepare(self, model) -> None:
        internvl.prepare(model)  # shared image features as InternVL merges them

    def image_grid(self, config, enc, n_tokens: int, where: str) -> tuple[int, int]:
        """The whole picture's tile grid (:func:`internvl.whole_picture`).

        Args:
            config: the model's configuration.
            enc: the processor's outputs for the batch (``pixel_values`` and the family's image fields).
            n_tokens: the first prompt's count of image tokens.
            where: the model as the error names it (``--model …``).

        Returns:
            (rows, columns) of one tile's tokens.

        Raises:
            UserError: ``n_tokens`` is not the tiles' grids.
        """
        return internvl.whole_picture(config, n_tokens, int(enc["pixel_values"].shape[0]), where)

    def grid_mask(self, config, image_mask: torch.Tensor) -> torch.Tensor:
        rows, cols = internvl.tile_grid(config)
        return _masked_range(image_mask, -rows * cols, None)

    def picture(self, enc, image_processor) -> torch.Tensor:
        return enc["pixel_values"][-1]  # the thumbnail (or the only tile): the grid the overlay draws

    def token_bound(self, config, processor) -> int | None:
        return internvl.token_bound(processor, config)

    def features(self, lm, inputs: dict, pixel_values: torch.Tensor):
        uniq, inverse = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
        owner = pixel_owner(inputs, pixel_values.shape[0], lm.tokens.image_token_id)
        tiles = torch.bincount(owner, minlength=len(inputs["input_ids"])).tolist()
        feats = internvl.per_prompt(lm.model, uniq.view(-1, *pixel_values.shape[1:]), inverse, tiles)
        return feats, owner.to(inverse.device)


class Gemma3Scheme(ImageScheme):
    """Gemma 3: one image per prompt (its processor takes a list per prompt), ``mm_tokens_per_image`` soft tokens
    pooled from the tower's patches into a square grid; its merge step takes the features stacked. Pan-and-scan
    crops (more images per prompt) are refused."""

    def check_processor(self, config, processor, where: str) -> None:
        if getattr(getattr(processor, "image_processor", None), "do_pan_and_scan", None):
            raise UserError(f"--model {where}: its image processor crops images (do_pan_and_scan), which adds images "
                            "and image tokens per prompt that are not measured yet; set do_pan_and_scan to false in "
                            "preprocessor_config.json")

    def image_grid(self, config, enc, n_tokens: int, where: str) -> tuple[int, int]:
        """The pooled square grid of ``mm_tokens_per_image`` tokens.

        Args:
            config: the model's configuration.
            enc: the processor's outputs for the batch (``pixel_values`` and the family's image fields).
            n_tokens: the first prompt's count of image tokens.
            where: the model as the error names it (``--model …``).

        Returns:
            (side, side).

        Raises:
            UserError: more than one image (pan-and-scan crops), or a count that is not one pooled square grid.
        """
        per_image, n_images = int(config.mm_tokens_per_image), len(enc["pixel_values"])
        side = int(round(per_image ** 0.5))
        if n_images != 1 or n_tokens != per_image or side * side != per_image:
            raise UserError(f"--model {where}: the image became {n_images} image(s) and {n_tokens} image tokens, not "
                            f"one pooled {side} × {side} grid ({per_image} tokens, mm_tokens_per_image); "
                            "pan-and-scan crops are not measured yet: set do_pan_and_scan to false in "
                            "preprocessor_config.json")
        return side, side

    def processor_images(self, processor, images: list) -> list:
        return [[image] for image in images]

    def features(self, lm, inputs: dict, pixel_values: torch.Tensor):
        per_row, owner = super().features(lm, inputs, pixel_values)
        return torch.stack(per_row), owner


class QwenVLScheme(ImageScheme):
    """Qwen2-VL and Qwen2.5-VL: dynamic-resolution images as flattened patches with ``image_grid_thw``, merged 2 × 2
    into a grid of any aspect ratio, on 3-D M-RoPE positions (:mod:`.mrope`)."""

    def load_processor(self, config, where: str):
        return mrope.load_processor(where, config)

    def image_grid(self, config, enc, n_tokens: int, where: str) -> tuple[int, int]:
        """The merged patch grid of the first image (``image_grid_thw``).

        Args:
            config: the model's configuration.
            enc: the processor's outputs for the batch (``pixel_values`` and the family's image fields).
            n_tokens: the first prompt's count of image tokens.
            where: the model as the error names it (``--model …``).

        Returns:
            (rows, columns) after the spatial merge.

        Raises:
            UserError: ``n_tokens`` is not the merged grid's count.
        """
        rows, cols = mrope.image_grid(config, enc)
        want = mrope.image_tokens(config, enc["image_grid_thw"][:1])[0]
        if n_tokens != want or rows * cols != want:
            thw = tuple(enc["image_grid_thw"][0].tolist())
            merge = config.vision_config.spatial_merge_size
            raise UserError(f"--model {where}: the image becomes {n_tokens} image tokens, not the {want} of its patch "
                            f"grid {thw} (frames, rows, columns) merged {merge} × {merge}; check the checkpoint's "
                            "preprocessor_config.json (merge_size, patch_size)")
        return rows, cols

    def token_bound(self, config, processor) -> int | None:
        return mrope.token_bound(processor)

    def picture(self, enc, image_processor) -> torch.Tensor:
        return mrope.seen_image(enc["pixel_values"], enc["image_grid_thw"], image_processor)  # patches put back

    def features(self, lm, inputs: dict, pixel_values: torch.Tensor):
        return mrope.shared_features(lm, pixel_values, inputs["image_grid_thw"]), None


class Qwen3VLScheme(QwenVLScheme):
    """Qwen3-VL: Qwen2.5-VL's images and positions (:mod:`.mrope`, its M-RoPE axes interleaved inside the rotary
    module), with deepstack features the text model adds to the image tokens after its first layers
    (:mod:`.deepstack`): a batch hands them to the model beside the image features, and forwards fed embeddings
    get them from the table :func:`.deepstack.install` keeps."""

    def prepare(self, model) -> None:
        deepstack.install(model, model.model.language_model)

    def encoder_output(self, lm, inputs: dict, pixel_values: torch.Tensor):
        per_row, per_level = mrope.shared_outputs(lm, pixel_values, inputs["image_grid_thw"])
        return deepstack.encoder_output(per_row, per_level), None


LLAVA_IMAGE = ImageScheme()
SCHEMES: dict[str, ImageScheme] = {
    "llava": LLAVA_IMAGE, "llava_next": AnyresScheme(), "llava_onevision": OnevisionScheme(),
    "internvl": InternVLScheme(), "gemma3": Gemma3Scheme(), "qwen2_5_vl": QwenVLScheme(), "qwen2_vl": QwenVLScheme(),
    "qwen3_vl": Qwen3VLScheme(),
}


def scheme_of(config) -> ImageScheme:
    """The image scheme of ``config``'s family (LLaVA-1.5's for a config that names none)."""
    return SCHEMES.get(getattr(config, "model_type", None), LLAVA_IMAGE)


__all__ = ["PIXEL_ROWS", "SCHEMES", "AnyresScheme", "Gemma3Scheme", "ImageScheme", "InternVLScheme", "OnevisionScheme",
           "Qwen3VLScheme", "QwenVLScheme", "TileGrid", "owned_rows", "pixel_owner", "scheme_of"]
