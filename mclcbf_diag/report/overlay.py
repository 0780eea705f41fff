"""Attention over the image: the decision token's attention on each image patch, on the image as seen.

LLaVA-1.5 turns the 336 × 336 crop into a 24 × 24 grid of patches (14 px each), one image
token per patch, in row-major order (CLIP's patch embedding, CLS dropped by the "default"
feature selection). So the attention row of a query over the image tokens, reshaped to the
grid, is a map over the picture. :func:`patch_grid` does that reshaping for any square grid
(the embedded model's 8 × 8 too), :func:`cell_grid` gathers a grid of given tokens (LLaVA-NeXT's
high-resolution tiles, whose rows a newline token ends); :func:`seen_image` undoes the processor's normalisation of
``pixel_values``, giving the picture after its resize and crop, i.e. what the model saw;
:func:`attention_maps` collects the maps of a traced run per layer (mean over heads, or one
head) and over layer sets (the steered layers, all layers). Pure functions over captured
tensors.

**Any query token, not only the decision token.** The runner keeps only the decision
token's attention row; :func:`token_attention_maps` runs the prompt once more, baseline and
intervened, with the intervention wrapped in :class:`WatchRows`: the same intervention at
the same layers, plus the read-only ``pattern`` site at every layer, where the chosen query
rows of the pattern the model used are copied out. :func:`parse_token` checks a token
choice (an index, negative from the end, or the token's text) before anything is loaded;
:func:`resolve_token` finds it in the tokenized prompt, among the tokens after the image
(a token before the image cannot attend to it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UserError
from ..interventions.base import Intervention, Site


def patch_grid(row: torch.Tensor, image_mask: torch.Tensor, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An attention row over keys [..., K] → its image part as a grid [..., rows, columns].

    ``image_mask`` (bool [K'], K' ≤ K) marks the image tokens in key order, which is the
    patches' row-major order. ``shape`` is the image's patch grid (rows, columns), as
    :meth:`~mclcbf_diag.models.loading.LoadedModel.image_grid` gives it (a non-square image);
    None means a square grid. A count of image tokens that does not fill the grid is an error
    (``LoadedModel.inputs`` refuses such an image before the model runs).
    """
    mask = image_mask.reshape(-1).bool()
    vals = row[..., : mask.numel()][..., mask].float()
    n = vals.shape[-1]
    rows, cols = shape if shape is not None else (math.isqrt(n), math.isqrt(n))
    if rows * cols != n:
        grid = f"its {rows} × {cols} patch grid" if shape is not None else "a square patch grid"
        raise ValueError(f"{n} image tokens do not form {grid}")
    return vals.reshape(*vals.shape[:-1], rows, cols).cpu().numpy()


def seen_image(pixel_values: torch.Tensor, mean, std) -> np.ndarray:
    """``pixel_values`` [3, H, W] (or [1, 3, H, W]) → uint8 RGB [H, W, 3] as the model saw it."""
    pv = pixel_values.reshape(-1, *pixel_values.shape[-3:])[0].float().cpu()
    rgb = pv * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def attention_maps(capture, image_mask: torch.Tensor, *, head: int | None = None, decode_step: int = 0,
                   steered: tuple[int, ...] = (), shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Grids of the decision token's image attention: ``"layer 3"`` per layer, ``"steered layers"``, ``"all layers"``.

    Each grid is the attention mass on that patch (a share of the whole row, summing with the
    other patches to the image mass).

    Args:
        capture: a :class:`~mclcbf_diag.runner.RunCapture` with attention kept.
        image_mask: marks the tokens of the grid (for LLaVA-NeXT the base grid's:
            :meth:`~mclcbf_diag.models.loading.LoadedModel.grid_mask`).
        head: the head shown; None averages the heads.
        decode_step: picks the forward (0: the prompt's, k: the one reading the k-th generated token).
        steered: the layers averaged into ``"steered layers"`` (none: no such map).
        shape: the grid's (rows, columns); None: square.

    Returns:
        Map name → grid [rows, columns] (float): ``"layer i"`` per layer, ``"steered layers"``,
        ``"all layers"``.
    """
    cap = capture.steps[decode_step]
    return _maps({i: cap.layers[i].attn for i in cap.layers}, image_mask, head, steered, shape)  # attn: [H, K]


def cell_grid(row: torch.Tensor, cells: torch.Tensor) -> np.ndarray:
    """An attention row over keys [..., K] → the values at the keys ``cells`` [rows, columns] holds (prompt
    positions), as a grid [..., rows, columns]: a grid whose tokens are not one run of the image tokens (LLaVA-NeXT's
    tiles, a newline after each row)."""
    idx = cells.reshape(-1).to(row.device)
    return row[..., idx].float().reshape(*row.shape[:-1], *cells.shape).cpu().numpy()


def cell_maps(capture, cells: torch.Tensor, *, head: int | None = None, decode_step: int = 0,
              steered: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """:func:`attention_maps` over a grid of given tokens, e.g. the high-resolution tiles of
    :meth:`~mclcbf_diag.models.schemes.ImageScheme.tile_grid`; each cell the share of the whole row.

    Args:
        capture: a :class:`~mclcbf_diag.runner.RunCapture` with attention kept.
        cells: [rows, columns] the prompt positions of the grid's tokens (:func:`cell_grid`).
        head: the head shown; None averages the heads.
        decode_step: picks the forward (0: the prompt's, k: the one reading the k-th generated token).
        steered: the layers averaged into ``"steered layers"``.

    Returns:
        Map name → grid [rows, columns], as :func:`attention_maps` returns them.
    """
    cap = capture.steps[decode_step]
    rows = {i: cap.layers[i].attn for i in cap.layers}
    return _grids({i: cell_grid(a.mean(0) if head is None else a[head], cells) for i, a in sorted(rows.items())},
                  steered)


# ----------------------------------------------------------------------------- chosen tokens
def parse_token(spec: str) -> int | str:
    """``"-1"``/``"12"`` → an index (negative: from the end), anything else → the token's text."""
    text = str(spec).strip()
    if not text:
        raise UserError("--overlay-token '': give a token index (e.g. 12, or -1 for the decision token) or the "
                        "token's text (e.g. dog)")
    try:
        return int(text)
    except ValueError:
        return text


def resolve_token(choice: int | str, tokens: Sequence[str], image_mask: torch.Tensor) -> int:
    """The prompt position of a token choice, which must come after the image.

    A text matches a token whose text, stripped, equals it (case-insensitive
    when no exact match); with several matches the first after the image is taken.

    Args:
        choice: a position (negative: from the end) or a token's text (:func:`parse_token`).
        tokens: the prompt's tokens as text, one per position.
        image_mask: marks the image tokens (bool over the prompt's positions).

    Returns:
        The position, counted from the prompt's start.

    Raises:
        UserError: the prompt has no image tokens, the position is outside the prompt or not after the image,
            or no token after the image has that text (the message lists the tokens that can be chosen).
    """
    mask = image_mask.reshape(-1).bool()
    if not bool(mask.any()):
        raise UserError("the prompt has no image tokens: there is no attention over the image to draw")
    n, first = len(tokens), int(torch.nonzero(mask).max()) + 1
    allowed = list(range(first, n))
    shown = ", ".join(f"{i} {tokens[i].strip()!r}" for i in allowed[:40]) + (" …" if len(allowed) > 40 else "")
    if isinstance(choice, int):
        pos = choice + n if choice < 0 else choice
        if pos not in allowed:
            raise UserError(f"--overlay-token {choice}: position {pos} is "
                            f"{'outside the prompt' if not 0 <= pos < n else 'not after the image'} (the prompt has "
                            f"{n} tokens, the image ends at {first - 1}); give one of the tokens after the image: "
                            f"{shown}")
        return pos
    for same in (lambda t: t.strip() == choice, lambda t: t.strip().lower() == choice.lower()):
        hits = [i for i in allowed if same(tokens[i])]
        if hits:
            return hits[0]
    raise UserError(f"--overlay-token {choice!r}: no token after the image has that text; give one of "
                    f"(position and text): {shown}")


class WatchRows(Intervention):
    """``inner`` unchanged, plus a copy of the chosen query rows of every layer's attention pattern.

    ``rows[layer]`` is ``[heads, len(positions), keys]`` (the row's own keys) after the run.
    Sites are opened at every layer for the pattern; the inner intervention still sees only
    its own layers and sites, so the run is the run it would be without the watch.
    """

    name = "watch-rows"

    def __init__(self, inner: Intervention | None, positions: Sequence[int]):
        super().__init__()
        self.inner, self.positions = inner, [int(p) for p in positions]
        self.rows: dict[int, torch.Tensor] = {}
        self._steer = True

    def layers(self, n_layers: int) -> tuple[int, ...]:
        self._inner_layers = set(self.inner.layers(n_layers)) if self.inner is not None else set()
        return tuple(range(n_layers))

    def open_sites(self, steer: bool) -> frozenset[str]:
        self._inner_sites = self.inner.open_sites(steer) if self.inner is not None else frozenset()
        return self._inner_sites | {"pattern"}

    def first_edited(self, row):
        return self.inner.first_edited(row) if self.inner is not None else None

    def readout_layers(self, n_layers: int) -> tuple[int, ...]:
        return self.inner.readout_layers(n_layers) if self.inner is not None else ()

    def readout(self, site) -> None:
        if self.inner is not None and "logits" in self._inner_sites:
            self.inner.readout(site)

    def steers_decode(self) -> bool:
        return self.inner.steers_decode() if self.inner is not None else False

    def prepare(self, lm, inputs, rows) -> None:
        if self.inner is not None:
            self.inner.prepare(lm, inputs, rows)

    def begin(self, rows, n_layers: int) -> None:
        self.rows = {}
        if self.inner is not None:
            self.inner.begin(rows, n_layers)

    def _mine(self, site: Site, kind: str) -> bool:
        return self.inner is not None and site.layer in self._inner_layers and kind in self._inner_sites

    def residual(self, site: Site) -> None:
        if self._mine(site, "residual"):
            self.inner.residual(site)

    def attention(self, site: Site) -> None:
        if self._mine(site, "attention"):
            self.inner.attention(site)

    def pattern(self, site: Site) -> None:
        if site.phase == "prefill":
            row = site.rows[0]
            idx = site.query_index(row, self.positions)
            self.rows[site.layer] = site.tensor[row.index][:, idx, row.pad:].detach().float().cpu().clone()
        if self._mine(site, "pattern"):
            self.inner.pattern(site)

    def row_records(self, row) -> dict:
        return self.inner.row_records(row) if self.inner is not None else {}


def token_attention_maps(lm, inputs: dict, intervention, positions: Sequence[int], *,
                         steered: tuple[int, ...] = (), head: int | None = None, dose: float = 1.0,
                         shape: tuple[int, int] | None = None) -> dict:
    """``{position: {"baseline": maps, "intervened": maps}}`` for the chosen query positions (prefill).

    Two runs: the prompt as is, and with ``intervention`` (given the baseline's
    prompt embeddings, as :func:`mclcbf_diag.trace.trace_sample` does).

    Args:
        lm: the loaded model.
        inputs: the prompt's model inputs (one row).
        intervention: the intervention of the second run.
        positions: the query positions shown (prompt positions).
        steered: the layers averaged into ``"steered layers"``.
        head: the head shown; None averages the heads.
        dose: the multiplier on what the intervention changes.
        shape: the image's patch grid (rows, columns); None: square.

    Returns:
        ``{position: {"baseline": maps, "intervened": maps}}``, ``maps`` as :func:`attention_maps` returns them
        (per layer, the steered layers, all layers).
    """
    from ..engine.runner import Keep, forward, with_embeds
    from ..interventions import as_intervention

    iv = as_intervention(intervention)
    watch_b, watch_s = WatchRows(iv, positions), WatchRows(iv, positions)
    base = forward(lm, inputs, watch_b, steer=False, keep=Keep(embeds=True)).captures[0]
    forward(lm, with_embeds(inputs, base), watch_s, dose=dose)
    out = {}
    grid = lm.grid_mask(base.detected) if hasattr(lm, "grid_mask") else base.detected  # LLaVA-NeXT: the base grid
    for j, pos in enumerate(positions):
        out[int(pos)] = {name: _maps({ly: a[:, j] for ly, a in w.rows.items()}, grid, head, steered, shape)
                         for name, w in (("baseline", watch_b), ("intervened", watch_s))}
    return out


def _maps(rows: dict[int, torch.Tensor], image_mask, head, steered, shape=None) -> dict[str, np.ndarray]:
    return _grids({i: patch_grid(a.mean(0) if head is None else a[head], image_mask, shape)
                   for i, a in sorted(rows.items())}, steered)


def _grids(per_layer: dict[int, np.ndarray], steered) -> dict[str, np.ndarray]:
    """Per-layer grids → the labelled maps: each layer, the steered layers' mean, all layers' mean."""
    maps = {f"layer {i}": g for i, g in per_layer.items()}
    chosen = [per_layer[i] for i in steered if i in per_layer]
    if chosen:
        maps["steered layers"] = np.mean(chosen, axis=0)
    maps["all layers"] = np.mean(list(per_layer.values()), axis=0)
    return maps
