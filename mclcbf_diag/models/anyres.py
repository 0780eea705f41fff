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
"""

from __future__ import annotations

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


def anyres_layout(size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_px: int, patch_px: int,
                  extra: int = 0) -> ImageLayout:
    """The layout of an image of ``size`` (height, width) px under towers of ``tile_px`` with ``patch_px`` patches."""
    per_tile = tile_px // patch_px
    h, w = best_resolution(size, pinpoints)
    return ImageLayout(base=(per_tile, per_tile),
                       tiles=unpadded(size, ((h // tile_px) * per_tile, (w // tile_px) * per_tile)), extra=extra)
