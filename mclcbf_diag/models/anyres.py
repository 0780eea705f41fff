"""LLaVA-NeXT's "anyres" image layout as pure functions: which image token is which patch.

A LLaVA-NeXT prompt's image tokens are, in order: the *base* image (the whole picture at the
tower's size, ``p × p`` patches, row-major), then the *high-resolution* view: the picture resized
to the best of the ``image_grid_pinpoints`` resolutions, cut into tower-sized tiles, its patch
map with the padding removed (``rows × cols``), row-major, each row followed by one *newline*
token (the model's ``image_newline`` vector). :func:`anyres_layout` computes that layout from the
original image size alone (the same rules as the processor's token count: best resolution by
effective then wasted area, unpadding by the aspect ratio), and :meth:`ImageLayout.groups` gives
the token indices of each part, relative to the first image token: the overlay draws ``base``
and ``tiles`` as two grids, ``flow`` can block them separately, and ``newline`` tokens carry no
patch. :meth:`~mclcbf_diag.models.loading.LoadedModel.image_grid` checks a prompt's image tokens against the
layout before the model runs; batching passes ``image_sizes`` (:func:`mclcbf_diag.engine.batch.batch_inputs`).

LLaVA-OneVision ("anyres_max_N", ``vision_aspect_ratio``) lays its tokens out the same way, with one more rule
(:func:`downscaled`): when the unpadded map holds more than about ``N`` tiles' patches (a scale ``ratio =
√(rows·cols / (N·p²)) > 1.1``) the model resizes it (bilinear) to ``⌊rows/ratio⌋ × ⌊cols/ratio⌋`` before the
newlines are appended, so its ``tiles`` tokens are then a resampled map of the unpadded picture, not tower patches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageLayout:
    """One image's tokens: a ``base`` grid, then ``tiles`` rows × cols with a newline after each row."""

    base: tuple[int, int]
    tiles: tuple[int, int]
    extra: int = 0  # tokens before the base patches (a CLS kept by the "full" feature selection)

    @property
    def n_tokens(self) -> int:
        rows, cols = self.tiles
        return self.extra + self.base[0] * self.base[1] + rows * (cols + 1)

    def groups(self) -> dict[str, np.ndarray]:
        """Token indices, from the first image token: ``base`` [p, p], ``tiles`` [rows, cols], ``newline`` [rows]."""
        n_base = self.base[0] * self.base[1]
        rows, cols = self.tiles
        start = self.extra + n_base
        hires = start + np.arange(rows * (cols + 1)).reshape(rows, cols + 1)
        return {"base": self.extra + np.arange(n_base).reshape(self.base), "tiles": hires[:, :cols],
                "newline": hires[:, cols]}


def best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) among ``pinpoints`` that keeps most of the image's pixels, then wastes least."""
    height, width = size
    best, best_key = None, None
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(w * h - effective))
        if best_key is None or key > best_key:
            best, best_key = (int(h), int(w)), key
    return best


def unpadded(size: tuple[int, int], patches: tuple[int, int]) -> tuple[int, int]:
    """The patch map ``patches`` (rows, cols) of the resized view without the padding that kept the image's aspect."""
    height, width = size
    rows, cols = patches
    if width / height > cols / rows:  # wider than the view: padding above and below
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols


def max_patches(vision_aspect_ratio) -> int | None:
    """LLaVA-OneVision's ``N`` from its ``vision_aspect_ratio`` ``"anyres_max_N"`` (N ≥ 1, ASCII digits, no leading
    zero); None for any other value. The one parse of it: the layout (:class:`~.schemes.OnevisionScheme`) and the
    config check (:func:`~.families.onevision_problem`, which refuses a value this returns None for) both ask it."""
    found = isinstance(vision_aspect_ratio, str) and re.fullmatch(r"anyres_max_([1-9][0-9]*)", vision_aspect_ratio)
    return int(found.group(1)) if found else None


def downscaled(tiles: tuple[int, int], per_tile: int, most: int) -> tuple[int, int]:
    """The map ``tiles`` (rows, cols) after LLaVA-OneVision's "anyres_max_``most``" resize (``per_tile`` patches a
    side): unchanged up to a scale of 1.1 × ``most`` tiles' worth, else each side floor-divided by the scale."""
    rows, cols = tiles
    ratio = math.sqrt(rows * cols / (most * per_tile**2))
    return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)


def anyres_layout(size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_px: int, patch_px: int,
                  extra: int = 0, most: int | None = None) -> ImageLayout:
    """The layout of an image of ``size`` px under towers of ``tile_px`` px with ``patch_px`` px patches.

    Args:
        size: the image's (height, width) in pixels.
        pinpoints: the checkpoint's ``image_grid_pinpoints``, each a (height, width) the tiles may cover.
        tile_px: the vision tower's input side in pixels (one tile).
        patch_px: the vision tower's patch side in pixels.
        extra: tokens before the base patches (1: a CLS kept by the ``full`` feature selection).
        most: LLaVA-OneVision's ``N`` of "anyres_max_N" (:func:`downscaled`); None for LLaVA-NeXT.

    Returns:
        The image's :class:`ImageLayout`: a ``tile_px // patch_px`` square base grid and the unpadded (and, with
        ``most``, downscaled) tile map.
    """
    per_tile = tile_px // patch_px
    h, w = best_resolution(size, pinpoints)
    tiles = unpadded(size, ((h // tile_px) * per_tile, (w // tile_px) * per_tile))
    if most is not None:
        tiles = downscaled(tiles, per_tile, most)
    return ImageLayout(base=(per_tile, per_tile), tiles=tiles, extra=extra)


def tiles_picture(tiles: np.ndarray, size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_px: int,
                  patch_px: int) -> np.ndarray:
    """The pixels under the high-resolution tiles' grid.

    The processor's tiles are put back side by side, less the padding :func:`unpadded` removes from the patch map
    (whole patches, as the model removes them). The unpadded map of LLaVA-NeXT is this picture's patches, one token
    each; OneVision's resized map lies over the same picture.

    Args:
        tiles: the processor's tiles [n ≥ t, C, tile_px, tile_px], row-major over the best resolution's ``t`` tiles;
            rows past them are the batch's zero padding.
        size: the image's (height, width) in pixels.
        pinpoints: the checkpoint's ``image_grid_pinpoints`` (the best resolution is chosen among them).
        tile_px: the vision tower's input side in pixels.
        patch_px: the vision tower's patch side in pixels.

    Returns:
        The picture [C, height, width].
    """
    per_tile = tile_px // patch_px
    h, w = best_resolution(size, pinpoints)
    n_rows, n_cols = h // tile_px, w // tile_px
    grid = tiles[: n_rows * n_cols].reshape(n_rows, n_cols, *tiles.shape[1:])
    whole = np.concatenate([np.concatenate(list(row), axis=-1) for row in grid], axis=-2)  # [C, H, W]
    rows, cols = n_rows * per_tile, n_cols * per_tile
    kept = unpadded(size, (rows, cols))
    top, left = (rows - kept[0]) // 2 * patch_px, (cols - kept[1]) // 2 * patch_px
    return whole[:, top: top + kept[0] * patch_px, left: left + kept[1] * patch_px]


def token_bound(pinpoints: Sequence[Sequence[int]], tile_px: int, patch_px: int, extra: int = 0,
                most: int | None = None) -> int:
    """The most image tokens one image can become.

    Taken over every pinpoint's patch map and each map its unpadding can leave (rows or columns less an even number),
    after the "anyres_max" resize where ``most`` is given. Without it (LLaVA-NeXT) that is the largest pinpoint's full
    map; with it a map just under the resize threshold can hold more tokens than a larger one resized, so every map
    counts (an upper bound: not every map is some image's).

    Args:
        pinpoints: the checkpoint's ``image_grid_pinpoints``, each a (height, width) in pixels.
        tile_px: the vision tower's input side in pixels.
        patch_px: the vision tower's patch side in pixels.
        extra: tokens before the base patches (1: a CLS kept by the ``full`` feature selection).
        most: LLaVA-OneVision's ``N`` of "anyres_max_N"; None for LLaVA-NeXT.

    Returns:
        The bound, in image tokens (base grid, tiles and their row newlines, ``extra``).
    """
    per_tile = tile_px // patch_px
    best = 0
    for h, w in pinpoints:
        rows, cols = (h // tile_px) * per_tile, (w // tile_px) * per_tile
        maps = [(r, cols) for r in range(rows, 0, -2)] + [(rows, c) for c in range(cols, 0, -2)]
        for tiles in maps if most is not None else [(rows, cols)]:
            shape = downscaled(tiles, per_tile, most) if most is not None else tiles
            best = max(best, ImageLayout((per_tile, per_tile), shape, extra).n_tokens)
    return best
