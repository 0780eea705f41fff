"""Attention over the image: the decision token's attention on each image patch, on the image as seen.

LLaVA-1.5 turns the 336 × 336 crop into a 24 × 24 grid of patches (14 px each), one image
token per patch, in row-major order (CLIP's patch embedding, CLS dropped by the "default"
feature selection). So the attention row of a query over the image tokens, reshaped to the
grid, is a map over the picture. :func:`patch_grid` does that reshaping for any square grid
(the embedded model's 8 × 8 too); :func:`seen_image` undoes the processor's normalisation of
``pixel_values``, giving the picture after its resize and crop, i.e. what the model saw;
:func:`attention_maps` collects the maps of a traced run per layer (mean over heads, or one
head) and over layer sets (the steered layers, all layers). Pure functions over captured
tensors: nothing here runs the model.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def patch_grid(row: torch.Tensor, image_mask: torch.Tensor) -> np.ndarray:
    """An attention row over keys [..., K] → its image part as a square grid [..., n, n].

    ``image_mask`` (bool [K'], K' ≤ K) marks the image tokens in key order, which is the
    patches' row-major order. A count of image tokens that is not a square is an error.
    """
    mask = image_mask.reshape(-1).bool()
    vals = row[..., : mask.numel()][..., mask].float()
    n = math.isqrt(vals.shape[-1])
    if n * n != vals.shape[-1]:
        raise ValueError(f"{vals.shape[-1]} image tokens do not form a square patch grid")
    return vals.reshape(*vals.shape[:-1], n, n).cpu().numpy()


def seen_image(pixel_values: torch.Tensor, mean, std) -> np.ndarray:
    """``pixel_values`` [3, H, W] (or [1, 3, H, W]) → uint8 RGB [H, W, 3] as the model saw it."""
    pv = pixel_values.reshape(-1, *pixel_values.shape[-3:])[0].float().cpu()
    rgb = pv * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def attention_maps(capture, image_mask: torch.Tensor, *, head: int | None = None, step: int = 0,
                   steered: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Grids of the decision token's image attention: ``"layer 3"`` per layer, ``"steered layers"``, ``"all layers"``.

    ``capture`` is a :class:`~mclcbf_diag.runner.RunCapture`; ``head`` None averages the heads.
    Each grid is the attention mass on that patch (a share of the whole row, summing with the
    other patches to the image mass).
    """
    cap = capture.steps[step]
    per_layer = {}
    for i in sorted(cap.layers):
        attn = cap.layers[i].attn  # [H, K]
        row = attn.mean(0) if head is None else attn[head]
        per_layer[i] = patch_grid(row, image_mask)
    maps = {f"layer {i}": g for i, g in per_layer.items()}
    chosen = [per_layer[i] for i in steered if i in per_layer]
    if chosen:
        maps["steered layers"] = np.mean(chosen, axis=0)
    maps["all layers"] = np.mean(list(per_layer.values()), axis=0)
    return maps
