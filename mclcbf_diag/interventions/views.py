"""Other views of the same question, for methods that contrast the answer with another forward's.

A decoding-level method (the ``logits`` site of :mod:`.base`) reads the answer from the model's
logits combined with those of auxiliary forwards of the same question: the image distorted
(VCD), the image removed (PAI's contrast), … Each view is built here from the run's own model
inputs, row by row in the row's own coordinates, so that a question gets the same view alone
and in any batch:

* :func:`pixels_of` / :func:`with_pixels`: the image tensor of a batch, wherever the batch
  carries it (``pixel_values``, or kept beside shared image features, see
  :func:`mclcbf_diag.engine.batch.batch_inputs`), and the inputs with another image tensor;
* :func:`diffusion_noise`: the forward diffusion process q(x_t | x_0) at step t of a
  1000-step sigmoid schedule, seeded per image (VCD's distorted view);
* :func:`image_free_inputs`: the prompts with their image tokens removed, left-padded;
* :func:`last_logits`: a plain forward's float32 logits at the last position.

Where a runner has the main rows' own forward, a view does not need a forward of its own:

* :func:`with_aux_rows`: a view that differs only in its image features (the same tokens at the
  same positions) becomes extra rows of the main rows' batched forward: the inputs stacked twice,
  the second copy's image features the view's (where :func:`shares_image_features`);
* :func:`image_free_logits`: the image-free view continues the main rows' cached prefix up to the
  batch's first image token (before it both views hold the same tokens at the same positions, and a
  causal model computes the same keys and values there), so only the text from there on is run,
  each row attending to its own prompt's cached keys and values in place
  (:mod:`mclcbf_diag.models.shared_prefix`).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models import deepstack
from ..models.mrope import position_ids, position_rows
from ..models.schemes import PIXEL_ROWS, owned_rows, pixel_owner  # PIXEL_ROWS: each row of pixels' prompt
from .base import Row

DIFFUSION_STEPS = 1000
PIXELS_KEY = "pixel_values"  # kept beside shared image features, in inputs["mm_encoder_outputs"]


def pixels_of(inputs: dict) -> torch.Tensor:
    """The batch's image tensor (as the processor made it: normalised pixels, per row)."""
    pixels = inputs.get(PIXELS_KEY, (inputs.get("mm_encoder_outputs") or {}).get(PIXELS_KEY))
    if pixels is not None and pixels.dim() == 2:
        raise UserError("this method distorts each image's pixel tensor, but the model's processor returns flattened "
                        "patches of dynamic-resolution images (Qwen-VL), which it does not handle yet; use a method "
                        "that does not run an image view (not VCD)")
    if pixels is not None:
        return pixels
    raise ValueError("these model inputs carry no pixel_values for an image view")  # programming error


def with_pixels(inputs: dict, pixel_values: torch.Tensor) -> dict:
    """The model inputs of the same prompts with another image tensor (the vision tower runs on it)."""
    keep = {k: v for k, v in inputs.items() if k not in ("mm_encoder_outputs", "inputs_embeds", PIXELS_KEY)}
    return {**keep, PIXELS_KEY: pixel_values}


def diffusion_schedule() -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s) for t = 0 … 999, β = sigmoid(linspace(−6, 6)) · (5e-3 − 1e-5) + 1e-5 (float64)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1 - betas, dim=0)


def diffusion_noise(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε for every image of ``pixels`` [B, …], ε ~ N(0, 1) seeded by ``seed``.

    Each image draws its noise from a generator of its own seeded with ``seed``, so an image's
    view does not depend on the batch it is in. Computed in float32, returned in ``pixels``' dtype.
    """
    if not 0 <= step < DIFFUSION_STEPS:
        raise ValueError(f"noise step {step} outside 0 … {DIFFUSION_STEPS - 1}")  # checked by the knobs
    bar = diffusion_schedule()[step]
    out = []
    for image in pixels:
        g = torch.Generator().manual_seed(int(seed))
        eps = torch.randn(image.shape, generator=g, dtype=torch.float32)
        x0 = image.detach().float().cpu()
        out.append(float(bar.sqrt()) * x0 + float((1 - bar).sqrt()) * eps)
    return torch.stack(out).to(pixels.device, pixels.dtype)


def image_free_inputs(lm, rows: list[Row]) -> dict:
    """Model inputs of the rows' prompts with every image token removed (left-padded, RoPE positions 0 …)."""
    texts = [r.ids[~r.image] for r in rows]
    n = max(t.numel() for t in texts)
    pad = lm.processor.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for b, t in enumerate(texts):
        ids[b, n - t.numel():], mask[b, n - t.numel():] = t, 1
    out = {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)}
    return {**out, "position_ids": position_ids(lm, out)}  # no image: cumsum − 1 in every family


def shares_image_features(inputs: dict) -> bool:
    """Whether a batch's model inputs carry its image features shared (``mm_encoder_outputs``, see
    :func:`mclcbf_diag.engine.batch.batch_inputs`) and no prompt embeddings: then a view that differs in its image
    features only (:meth:`~.base.Intervention.aux_features`) can run as auxiliary rows of the batch's own forward
    (:func:`with_aux_rows`)."""
    return "mm_encoder_outputs" in inputs and "inputs_embeds" not in inputs


def with_aux_rows(inputs: dict, features) -> dict:
    """The model inputs of the batch's B rows followed by B auxiliary rows: the same ids, mask, positions (and per-row
    extras such as Gemma 3's ``token_type_ids`` or LLaVA-NeXT's ``image_sizes``), with ``features`` (per row, as the
    family's merge step takes them: :meth:`~.base.Intervention.aux_features`) as the auxiliary rows' image features.
    ``inputs`` must share their image features (:func:`shares_image_features`)."""
    n = inputs["input_ids"].shape[0]
    out = {}
    for key, value in inputs.items():
        if key == "mm_encoder_outputs":
            out[key] = _image_outputs(inputs, features, keep_own=True)
        elif key == "position_ids":  # [B, S], or Qwen-VL's [3, B, S]
            out[key] = torch.cat([value, value], dim=-2)
        elif torch.is_tensor(value) and value.dim() and value.shape[0] == n:
            out[key] = torch.cat([value, value])
        else:
            out[key] = value
    return out


def with_view_features(inputs: dict, features) -> dict:
    """The model inputs of the same rows with ``features`` (per row, as the family's merge step takes them:
    :meth:`~.base.Intervention.aux_features`) as their image features: the auxiliary view alone, where the main rows
    were run already. ``inputs`` must share their image features (:func:`shares_image_features`)."""
    return {**inputs, "mm_encoder_outputs": _image_outputs(inputs, features, keep_own=False)}


def _image_outputs(inputs: dict, features, keep_own: bool) -> dict:
    """The ``mm_encoder_outputs`` the model reads (``"image"`` only; the pixels kept beside are not needed) with
    ``features`` as the image features, in the dtype and on the device of the inputs' own, after the own ones where
    ``keep_own``: a stacked tensor stays one, a per-row list stays a list."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    own = inputs["mm_encoder_outputs"]["image"].pooler_output
    if torch.is_tensor(own):
        feats = features.to(own)
        feats = torch.cat([own, feats]) if keep_own else feats
    else:
        feats = [f.to(own[0]) for f in features]
        feats = [*own, *feats] if keep_own else feats
    return {"image": BaseModelOutputWithPooling(pooler_output=feats)}


def image_free_logits(lm, rows: list[Row], cache, mask: torch.Tensor) -> torch.Tensor:
    """The last-position logits [len(rows), vocab] (float32) of :func:`image_free_inputs`' view, continuing ``cache``
    (:func:`image_free_continuation`)."""
    return image_free_continuation(lm, rows, cache, mask).logits[:, -1].float()


def image_free_continuation(lm, rows: list[Row], cache, mask: torch.Tensor, *, hidden_states: bool = False):
    """The model's output (``logits`` at the last position; with ``hidden_states`` each layer's at the continued
    positions) of :func:`image_free_inputs`' view, continuing ``cache``.

    Args:
        lm: the loaded model.
        rows: the rows of the batch (``row.index``: its row in ``cache``).
        cache: the KV cache of the main rows' plain forward over the left-padded prompts (at least up to the batch's
            first image token).
        mask: [B, T] the main rows' padding mask.

    Each row's image-free prompt is laid out as its main row is, padding included, up to the batch's first image
    token (``start``); from there on its own text without the image tokens follows, right-aligned (a shorter row's
    gap is masked padding), at the positions it has alone (cumsum − 1 of its mask).
    """
    from ..models.shared_prefix import SharedPrefix, continuation_mask, continuing

    start = min(r.pad + int(torch.nonzero(r.image)[0]) for r in rows)
    tails = []
    for r in rows:
        ids = torch.cat([torch.zeros(r.pad, dtype=torch.long), r.ids[~r.image]])[start:]
        tails.append((ids, torch.cat([torch.zeros(max(r.pad - start, 0), dtype=torch.long),
                                      torch.ones(ids.numel() - max(r.pad - start, 0), dtype=torch.long)])))
    S = max(t.numel() for t, _ in tails)
    pad = lm.processor.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    tail_mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, (t, m) in enumerate(tails):
        ids[b, S - t.numel():], tail_mask[b, S - t.numel():] = t, m
    owner = torch.tensor([r.index for r in rows])
    full_mask = torch.cat([mask[owner, :start].cpu(), tail_mask], dim=-1).to(mask.device)
    full_ids = torch.cat([torch.full((len(rows), start), pad, dtype=torch.long), ids], dim=-1).to(mask.device)
    positions = position_ids(lm, {"input_ids": full_ids, "attention_mask": full_mask})[..., start:]
    embed = lm.model.get_input_embeddings()
    prefix = SharedPrefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], start,
                          owner.to(mask.device))
    with torch.no_grad(), continuing(lm, prefix):
        embeds = embed(ids.to(embed.weight.device))
        return lm.model(inputs_embeds=embeds, attention_mask=continuation_mask(full_mask, start, embeds.dtype),
                        position_ids=positions, use_cache=False, logits_to_keep=1, output_hidden_states=hidden_states)


def row_inputs(inputs: dict, rows: list[Row]) -> dict:
    """The model inputs of ``rows`` only (a batch's rows that one intervention of a mix handles)."""
    idx = [r.index for r in rows]
    n = inputs["input_ids"].shape[0]
    if idx == list(range(n)):
        return inputs
    out = {}
    for key, value in inputs.items():
        if key == "mm_encoder_outputs":
            out[key] = rows_of_shared(value, idx)
        elif key == "position_ids":  # [B, S], or Qwen-VL's [3, B, S]
            out[key] = position_rows(value, idx)
        elif key == PIXELS_KEY and (inputs.get("image_grid_thw") is not None or value.shape[0] != n):
            # several rows a prompt: Qwen-VL's flattened patches, InternVL's tiles
            image = rows[0].ids[rows[0].image]
            owner = pixel_owner(inputs, value.shape[0], int(image[0]) if image.numel() else None)
            out[key] = owned_rows(value, owner, idx)[0]
        elif torch.is_tensor(value) and value.dim() and value.shape[0] == n:
            out[key] = value[idx]
        else:
            out[key] = value
    return out


def rows_of_shared(shared: dict, idx: list[int], *, pixels: bool = True) -> dict:
    """The shared image features (and, with ``pixels``, the pixels kept beside them) of the batch's rows ``idx``, in
    that order."""
    out = {"image": deepstack.rows(shared["image"], idx)}  # Qwen3-VL's deepstack features with them
    if not pixels:
        return out
    if PIXELS_KEY in shared and PIXEL_ROWS in shared:  # each prompt's rows of pixels (its tiles), renumbered
        out[PIXELS_KEY], out[PIXEL_ROWS] = owned_rows(shared[PIXELS_KEY], shared[PIXEL_ROWS], idx)
    elif PIXELS_KEY in shared:
        out[PIXELS_KEY] = shared[PIXELS_KEY][idx]
    return out


def last_logits(lm, inputs: dict) -> torch.Tensor:
    """A plain forward's logits at the last position, float32 [B, vocab]."""
    with torch.no_grad():
        return lm.model(**inputs, logits_to_keep=1).logits[:, -1].float()
