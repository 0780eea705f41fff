"""Where the margin comes from: direct logit attribution, activation patching and attribution patching.

The math is in :mod:`mclcbf_diag.measurements.attribution` (pure functions); the runs are the runner's
(:func:`~mclcbf_diag.engine.runner.forward` keeping ``components``,
:func:`~mclcbf_diag.engine.runner.activations_forward`, :func:`~mclcbf_diag.engine.runner.run_patched`).
This module wires them together for one question:

* :func:`dla` — the direct logit attribution of one captured run (baseline or intervened).
* :func:`activation_patching` — the full grid, both directions, for a clean and a corrupted input
  that differ only in the image (same prompt, so the same positions). A plain forward of the two
  inputs (one batch) keeps their KV caches and every layer's activations; then, for every layer
  L, one batch continues the text after the image from the shared prefix (nothing copied,
  :mod:`mclcbf_diag.models.shared_prefix`), starting at layer L from the residual the forward had
  there, one row per patch:

  - residual at the image tokens: the source's own keys and values at every image position (the
    text before the image is the same in both inputs, so from layer L on the image tokens *are*
    the source's), and the destination's residual at the text after the image;
  - residual at the question tokens or the decision token: the destination's keys and values, and
    the destination's residual with those positions replaced by the source's;
  - each head's output (before ``o_proj``) and each MLP's output at layer L, at every text
    position after the image: the destination's everything, that one output replaced.

  So a grid costs the plain forward of the two inputs plus a few positions per patch.
* :func:`attribution_patching` — gradient × difference for the same grid: the clean activations
  (a plain forward), the corrupted run's activations and ∂margin/∂activation (one forward and one
  backward).
* :func:`localisation` — where an intervention acts, from both sides: the same grid with the intervened run
  as the clean input and the baseline as the corrupted one (same image), intervened activations patched into
  the baseline, and (:func:`restored_patching`) the baseline's restored in the intervened run, which runs on
  with the intervention; :func:`localise` returns its records and :class:`LocalSummary` (where the change
  enters, which heads and MLPs make it, which work against it).
* :func:`split_carriers` — over a split's questions, the heads and MLPs that carry the wrong Yes on wrong
  answers (DLA and patching), against AD-HH's hallucination heads and the sites each intervention edits.

Each patch's effect is the normalised recovery of the margin (``attribution.recovery``): 0 at the
corrupted run, 1 at the clean one, in both directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.runner import Continuation, Keep, RunCapture, activations_forward, forward, run_patched
from ..errors import UserError
from ..interventions import as_intervention
from ..measurements import attribution as A
from ..models import LoadedModel
from ..models.adapter import sequence_inputs
from ..models.mrope import prompt_positions
from ..models.tokens import ranges_text
from ..records import NO_HEAD, NO_LAYER, frame

DIRECTIONS = ("denoise", "noise")
"""denoise: clean activations into the corrupted run; noise: corrupted activations into the clean run."""


# ----------------------------------------------------------------------------------------------- DLA
def dla(lm: LoadedModel, capture: RunCapture) -> A.Attribution:
    """Direct logit attribution of a run captured with ``components=True`` (prefill, decision token)."""
    if lm.adapter.normed_sublayer_outputs:
        from ..errors import UserError

        raise UserError(f"direct logit attribution sums the heads' and MLPs' outputs into the residual, but "
                        f"{type(lm.model).__name__} normalises them before adding them (post-attention and "
                        "post-feedforward norms), so it is not measured for this model; activation patching is")
    step = capture.steps[0]
    if not step.layers or not step.layers[0].parts:
        raise ValueError("the run was captured without components=True")  # programming error
    layers, parts = sorted(step.layers), []
    for i in layers:
        c = step.layers[i]
        o = lm.adapter.layer_part(lm.model, i, "layer_o_proj")
        v = lm.adapter.layer_part(lm.model, i, "layer_v_proj")
        with lm.onloaded(f"{lm.adapter.layers}.{i}"):
            w, b = o.weight.detach(), (None if o.bias is None else o.bias.detach())
            normed = c.parts["normed"].to(v.weight.device)
            values = torch.nn.functional.linear(normed, v.weight.detach(),
                                                None if v.bias is None else v.bias.detach())  # [K, kv·hd]
        H, kv = lm.text_config.num_attention_heads, lm.text_config.num_key_value_heads
        values = values.reshape(len(normed), kv, -1).transpose(0, 1)  # [kv, K, hd]
        parts.append(A.LayerParts(step=(c.resid_pre - c.resid_pre_in), z=c.parts["z"].reshape(H, -1), o_weight=w,
                                  o_bias=b, mlp=c.parts["mlp"], probs=c.attn, values=values))
    last = step.layers[layers[-1]]
    fn = lm.final_norm()
    with lm.onloaded(lm.adapter.final_norm, lm.adapter.unembed):
        gamma, eps = lm.adapter.norm_gain(lm.model, fn).detach(), lm.adapter.norm_eps(fn)
        head = lm.model.get_submodule(lm.adapter.unembed)
        yes, no = lm.tokens.yes_id, lm.tokens.no_id
        w_yes, w_no = head.weight[yes].detach(), head.weight[no].detach()
        bias = 0.0 if head.bias is None else float(head.bias[yes] - head.bias[no])
    margin = float(step.own_logits[yes] - step.own_logits[no])  # the activations' margin, before any decoding method
    return A.direct_logit_attribution(step.layers[layers[0]].resid_pre_in, parts, last.resid_post, gamma, eps,
                                      w_yes, w_no, margin, bias, image=capture.detected)


def dla_records(att: A.Attribution, *, question_id, condition: str, base: A.Attribution | None = None) -> dict:
    """Tidy columns of one run's DLA (``base`` given: also every part's change ``d_…`` from it).

    Args:
        att: the run's attribution (:func:`dla`).
        question_id: the question's id, on every row.
        condition: the run's condition (``"baseline"``, ``"steered"``), on every row.
        base: the attribution the changes ``d_…`` are taken from; None: no change rows.

    Returns:
        Column name → list (``question_id``, ``condition``, ``phase``, ``decode_step``, ``layer``, ``head``,
        ``metric``, ``value``), prefill, decode step 0; layer −1 holds ``dla_embed``, ``dla_total``,
        ``dla_final_scale`` and ``dla_residual``.
    """
    rows: dict[str, list] = {"layer": [], "head": [], "metric": [], "value": []}

    def add(layer, head, metric, value):
        rows["layer"].append(int(layer))
        rows["head"].append(int(head))
        rows["metric"].append(metric)
        rows["value"].append(float(value))

    def parts(a: A.Attribution, prefix: str):
        add(NO_LAYER, NO_HEAD, f"{prefix}dla_embed", a.embed)
        add(NO_LAYER, NO_HEAD, f"{prefix}dla_total", a.total)
        for i in range(len(a.mlp)):
            add(i, NO_HEAD, f"{prefix}dla_step", a.step[i])
            add(i, NO_HEAD, f"{prefix}dla_attn", a.attn[i])
            add(i, NO_HEAD, f"{prefix}dla_mlp", a.mlp[i])
            for h in range(a.heads.shape[1]):
                add(i, h, f"{prefix}dla_head", a.heads[i, h])
            for s, v in a.sources.items():
                for h in range(v.shape[1]):
                    add(i, h, f"{prefix}dla_head_{s}", v[i, h])
                add(i, NO_HEAD, f"{prefix}dla_head_{s}", v[i].sum())

    parts(att, "")
    add(NO_LAYER, NO_HEAD, "dla_final_scale", att.scale)
    add(NO_LAYER, NO_HEAD, "dla_residual", att.margin - att.total)
    if base is not None:
        parts(_difference(att, base), "d_")
    n = len(rows["value"])
    return {"question_id": [question_id] * n, "condition": [condition] * n, "phase": ["prefill"] * n,
            "decode_step": [0] * n, **rows}


def _difference(a: A.Attribution, b: A.Attribution) -> A.Attribution:
    return A.Attribution(embed=a.embed - b.embed, unembed_bias=a.unembed_bias - b.unembed_bias, step=a.step - b.step,
                         heads=a.heads - b.heads, attn_bias=a.attn_bias - b.attn_bias, mlp=a.mlp - b.mlp,
                         sources={s: a.sources[s] - b.sources[s] for s in a.sources if s in b.sources},
                         margin=a.margin - b.margin, scale=math.nan)


# ------------------------------------------------------------------------------------- patching
def margin_floor(lm: LoadedModel) -> float:
    """Noise floor of the Yes − No margin of a forward in the model's dtype.

    ``noise.propagation_floor`` at the scale ``‖w_Yes − w_No‖ · max|γ| · √d`` (a bound on the margin's
    size) after every language layer and the final norm."""
    from .. import noise

    fn = lm.final_norm()
    with lm.onloaded(lm.adapter.final_norm, lm.adapter.unembed):
        gamma = lm.adapter.norm_gain(lm.model, fn).detach().float()
        w = lm.model.get_submodule(lm.adapter.unembed).weight
        row = (w[lm.tokens.yes_id] - w[lm.tokens.no_id]).detach().float()
    scale = float(row.norm()) * float(gamma.abs().max()) * math.sqrt(gamma.numel())
    return noise.propagation_floor(lm.dtype, scale, lm.n_layers, final_norm=True)


@dataclass
class Grid:
    """Normalised recoveries of every patch of one question, per direction (see the module docstring)."""

    clean: float  # the margins the grid is normalised by (its own unpatched rows)
    corrupted: float
    floor: float  # the margin's noise floor: a clean − corrupted gap under it leaves nothing to recover
    resid: dict = field(default_factory=dict)  # direction → [L, len(GROUPS)]
    heads: dict = field(default_factory=dict)  # direction → [L, H]
    mlp: dict = field(default_factory=dict)  # direction → [L]
    margins: dict = field(default_factory=dict)  # the same keys ("resid:denoise", …) → patched margins
    plain: tuple = (math.nan, math.nan)  # (clean, corrupted) margins of the plain forward

    @property
    def gap(self) -> float:
        return self.clean - self.corrupted


def paired_inputs(lm: LoadedModel, clean: dict, corrupted: dict) -> dict:
    """One batch of the clean and the corrupted input (rows 0 and 1); they must be the same prompt."""
    from ..errors import UserError

    if clean["input_ids"].shape != corrupted["input_ids"].shape or not torch.equal(clean["input_ids"],
                                                                                  corrupted["input_ids"]):
        raise UserError("the clean and the corrupted input must be the same prompt (only the image may differ)")
    grids = clean.get("image_grid_thw"), corrupted.get("image_grid_thw")
    if grids[0] is not None and not torch.equal(grids[0], grids[1]):  # Qwen-VL: the grid sets the positions
        raise UserError("the clean and the corrupted image must have the same patch grid (image_grid_thw "
                        f"{grids[0].tolist()} and {grids[1].tolist()}): give them the same size")
    ids = clean["input_ids"][0]
    image = ids == lm.tokens.image_token_id
    if not image.any() or int(image.nonzero().max()) + 1 >= len(ids):
        raise UserError("the prompt needs an image and text after it (the question and the decision token)")
    return {k: torch.cat([clean[k], corrupted[k]]) for k in clean if isinstance(clean[k], torch.Tensor)}


def _text_start(lm: LoadedModel, ids: torch.Tensor) -> int:
    return int((ids == lm.tokens.image_token_id).nonzero().max()) + 1


COMPONENT_POSITIONS = ("text", "decision")
"""Where a head's or an MLP's output is patched: every text token after the image (default), or the decision
token only (cheaper by the question's length on a deep model: one position per row)."""


def _check_at(at: str) -> str:
    if at not in COMPONENT_POSITIONS:
        raise ValueError(f"components_at must be one of {COMPONENT_POSITIONS}, not {at!r}")  # programming error
    return at


def activation_patching(lm: LoadedModel, clean: dict, corrupted: dict, *, acts=None, progress: bool = False,
                        components_at: str = "text", directions: tuple[str, ...] = DIRECTIONS) -> Grid:
    """The full activation-patching grid of one question, both directions (see the module docstring).

    Args:
        lm: the loaded model.
        clean: model inputs of one prompt (the clean image).
        corrupted: model inputs of the same prompt (the same ids) with a different image.
        acts: their :func:`~mclcbf_diag.runner.activations_forward` with ``cache=True`` (as a batch of the two,
            from :func:`paired_inputs`), when the caller already has it; None: it is run here.
        progress: show a progress bar over the layers.
        components_at: where heads and MLPs are patched (:data:`COMPONENT_POSITIONS`).
        directions: a subset of :data:`DIRECTIONS` (with one only, the recoveries are normalised by the plain
            forwards' margins).

    Returns:
        The :class:`Grid`: per direction the normalised recoveries ``resid`` [L, len(GROUPS)], ``heads`` [L, H]
        and ``mlp`` [L], and the patched margins.

    Raises:
        UserError: the two inputs are not the same prompt, or the prompt has no image or no text after it.
    """
    from ..progress import tqdm

    _check_at(components_at)
    both = paired_inputs(lm, clean, corrupted)
    if acts is None:
        acts = activations_forward(lm, both, cache=True)
    ids = both["input_ids"][0]
    T, start = len(ids), _text_start(lm, both["input_ids"][0])
    s = T - start
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    n_layers = lm.n_layers
    H = lm.text_config.num_attention_heads
    grid = Grid(math.nan, math.nan, margin_floor(lm), plain=tuple(float(m) for m in acts.logits[:, yes]
                                                                  - acts.logits[:, no]))
    found: dict[str, list] = {}
    separate = components_at == "decision" and s > 1
    for L in tqdm(range(n_layers), desc="activation patching", unit="layer", disable=not progress, leave=False,
                  delay=2):
        rows, parts = [], []  # (key, index, owner, entering, z head or None, mlp?, source)
        for d, (dst, src) in (("denoise", (1, 0)), ("noise", (0, 1))):
            if d not in directions:
                continue
            base, other = acts.resid[L][dst, start:], acts.resid[L][src, start:]
            if L == 0:
                rows.append((f"none:{d}", 0, dst, base, None, False, src))
            rows.append((f"resid:{d}", 0, src, base, None, False, src))
            for g, sl in ((1, slice(0, s - 1)), (2, slice(s - 1, s))):
                x = base.clone()
                x[sl] = other[sl]
                rows.append((f"resid:{d}", g, dst, x, None, False, src))
            at = base[-1:] if separate else base
            parts += [(f"heads:{d}", h, dst, at, h, False, src) for h in range(H)]
            parts.append((f"mlp:{d}", 0, dst, at, None, True, src))
        batches = [(rows, start), (parts, T - 1)] if separate else [(rows + parts, start)]
        for batch, first in batches:
            batch = sorted(batch, key=lambda r: r[2])  # rows continuing one prefix are consecutive
            positions = prompt_positions(lm, both, first, len(batch))
            m = _patched_batch(lm, acts, batch, L, first, T, positions)
            for b, r in enumerate(batch):
                found.setdefault(r[0], []).append((L, r[1], float(m[b])))
    return _filled(grid, found, n_layers, H)


def _filled(grid: Grid, found: dict, n_layers: int, heads: int) -> Grid:
    """``grid`` with the patched margins ``found`` (``key → [(layer, index, margin)]``) and their recoveries."""
    refs = {k.split(":")[1]: v[0][2] for k, v in found.items() if k.startswith("none:")}
    # each direction's unpatched destination; with one direction only, both plain forwards' margins (one route)
    grid.clean, grid.corrupted = (refs["noise"], refs["denoise"]) if len(refs) == 2 else grid.plain
    shapes = {"resid": (n_layers, len(A.GROUPS)), "heads": (n_layers, heads), "mlp": (n_layers,)}
    for key, entries in found.items():
        kind, d = key.split(":")
        if kind == "none":
            continue
        t = torch.full(shapes[kind], math.nan, dtype=torch.float64)
        for L, i, v in entries:
            t[(L, i) if len(shapes[kind]) == 2 else L] = v
        grid.margins[key] = t
        getattr(grid, kind)[d] = A.recovery(t, grid.corrupted, grid.clean, grid.floor)
    return grid


def _patched_batch(lm: LoadedModel, acts, rows: list, L: int, start: int, T: int,
                   positions: torch.Tensor) -> torch.Tensor:
    """The margins of one batch of patches at layer ``L``, continuing positions ``start …`` (``positions``, from
    :func:`~mclcbf_diag.models.mrope.prompt_positions`) from the shared prefix (the rows of one prefix
    consecutive)."""
    from ..models.shared_prefix import SharedPrefix, continuation_mask, continuing

    B, width = len(rows), acts.z[0].shape[-1]
    H = lm.text_config.num_attention_heads
    dev, dtype = acts.resid[0].device, acts.resid[0].dtype
    entering = torch.stack([r[3] for r in rows])
    owner = torch.tensor([r[2] for r in rows], device=dev)
    srcs = torch.tensor([r[6] for r in rows], device=dev)
    z_mask = torch.zeros(B, 1, H, width // H, dtype=torch.bool, device=dev)
    for b, r in enumerate(rows):
        if r[4] is not None:
            z_mask[b, 0, r[4]] = True
    mlp_mask = torch.tensor([r[5] for r in rows], device=dev)[:, None, None]
    ones = torch.ones(B, T, dtype=torch.long, device=dev)
    feed = {"inputs_embeds": entering, "attention_mask": continuation_mask(ones, start, dtype),
            "position_ids": positions.to(dev)}
    kv = [(layer.keys, layer.values) for layer in acts.cache.layers]
    shared = SharedPrefix([k for k, _ in kv], [v for _, v in kv], start, owner)
    with continuing(lm, shared):
        logits = run_patched(lm, feed, layer=L, entering=entering, use_cache=False,
                             z_source=acts.z[L][srcs, start:], z_mask=z_mask.reshape(B, 1, width),
                             mlp_source=acts.mlp[L][srcs, start:], mlp_mask=mlp_mask)
    return (logits[:, lm.tokens.yes_id] - logits[:, lm.tokens.no_id]).cpu()


def attribution_patching(lm: LoadedModel, clean: dict, corrupted: dict, *, acts=None,
                         directions: tuple[str, ...] = ("denoise",), components_at: str = "text") -> Grid:
    """Attribution patching (gradient × difference) of the grid of :func:`activation_patching`.

    A patch's effect is estimated to first order at the destination run: ``m_dest + (a_src − a_dest) ·
    ∂m/∂a``, summed over the patch's positions (and the head's slice). Denoising needs the clean
    activations (``acts``: a :func:`paired_inputs` forward, or a plain forward of ``clean`` is run) and
    one forward with a backward of the corrupted run; ``"noise"`` in ``directions`` adds one backward
    of the clean run. The estimates are normalised like the grid's recoveries, by the plain forward's
    margins.

    Args:
        lm: the loaded model.
        clean: model inputs of one prompt (the clean image).
        corrupted: model inputs of the same prompt with a different image.
        acts: a :func:`paired_inputs` forward of the two (clean row 0, corrupted row 1); None: a plain forward
            of ``clean`` is run.
        directions: a subset of :data:`DIRECTIONS`; each adds one forward with a backward.
        components_at: where heads and MLPs are patched, as in :func:`activation_patching`.

    Returns:
        The :class:`Grid` of first-order estimates, its recoveries normalised like the patching grid's.

    Raises:
        UserError: the two inputs are not the same prompt, or the prompt has no image or no text after it.
    """
    _check_at(components_at)
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    start = _text_start(lm, clean["input_ids"][0])
    paired_inputs(lm, clean, corrupted)  # the same prompt, with text after the image
    if acts is None:
        acts = activations_forward(lm, clean)
        src_rows = {"clean": 0}
    else:
        src_rows = {"clean": 0, "corrupted": 1}
    runs = {"clean": acts}
    grads = {}
    for d in directions:
        dest = "corrupted" if d == "denoise" else "clean"
        g = activations_forward(lm, corrupted if dest == "corrupted" else clean, grad_of=(yes, no))
        grads[dest] = g
        if dest == "corrupted":
            runs["corrupted"], src_rows["corrupted"] = g, 0
        else:
            runs["clean"], src_rows["clean"] = g, 0
    if "corrupted" not in runs:
        runs["corrupted"] = acts
    m = {k: float(runs[k].logits[src_rows[k], yes] - runs[k].logits[src_rows[k], no]) for k in ("clean", "corrupted")}
    grid = Grid(m["clean"], m["corrupted"], margin_floor(lm), plain=(m["clean"], m["corrupted"]))
    T = clean["input_ids"].shape[1]
    pos = A.group_positions(clean["input_ids"][0] == lm.tokens.image_token_id)
    text = slice(start, T) if components_at == "text" else slice(T - 1, T)
    for d in directions:
        dest, src = ("corrupted", "clean") if d == "denoise" else ("clean", "corrupted")

        def act(kind, who, L, sl=slice(None)):
            return getattr(runs[who], kind)[L][src_rows[who], sl].float()

        estimates = _first_order(lm, grads[dest].grads, lambda kind, L, sl=slice(None): act(kind, src, L, sl) - act(
            kind, dest, L, sl), pos, text)
        for kind, est in zip(("resid", "heads", "mlp"), estimates):
            patched = m[dest] + est
            grid.margins[f"{kind}:{d}"] = patched
            getattr(grid, kind)[d] = A.recovery(patched, grid.corrupted, grid.clean, grid.floor)
    return grid


def _first_order(lm: LoadedModel, gr: dict, diff, pos: dict, text: slice):
    """Gradient × difference per layer: the residual per token group, each head and each MLP at ``text``
    (``diff(kind, layer, positions)``: source minus destination activation; ``gr``: the destination's gradients)."""
    H = lm.text_config.num_attention_heads
    width = gr["z"][0].shape[-1]
    resid = torch.zeros(lm.n_layers, len(A.GROUPS), dtype=torch.float64)
    heads = torch.zeros(lm.n_layers, H, dtype=torch.float64)
    mlp = torch.zeros(lm.n_layers, dtype=torch.float64)
    for L in range(lm.n_layers):
        per_pos = A.attribution_estimate(diff("resid", L), gr["resid"][L][0])  # [T]
        for j, g in enumerate(A.GROUPS):
            resid[L, j] = float(per_pos[pos[g].to(per_pos.device)].sum())
        dz = diff("z", L, text).reshape(-1, H, width // H)
        heads[L] = A.attribution_estimate(dz, gr["z"][L][0, text].reshape(-1, H, width // H), (0, 2)).cpu()
        mlp[L] = float(A.attribution_estimate(diff("mlp", L, text), gr["mlp"][L][0, text], (0, 1)))
    return resid, heads, mlp


def localisation(lm: LoadedModel, inputs: dict, intervention, *, components_at: str = "text",
                 progress: bool = False, directions: tuple[str, ...] = DIRECTIONS) -> Grid:
    """Where the intervention acts, from both sides: the intervened run plays the clean input, the baseline
    the corrupted one (the same prompt and image), and every site of the grid is patched one at a time.

    * ``"denoise"``: one intervened activation (the residual at a layer and token group, a head's or an
      MLP's output) put into the baseline, which runs on without the intervention: the share of the
      intervention's change of the margin that this activation carries (1: all of it, 0: none);
    * ``"noise"``: one baseline activation restored in the intervened run, which runs on *with* the
      intervention at every later site (:func:`restored_patching`): the share of the change that is left
      (1: the site is not needed, 0: all of the change goes through it; above 1: the site worked against it).

    The patched residual is what the layer used (after any edit the intervention made to it at that layer),
    in both directions, so an edit of the residual entering layer ℓ is carried from layer ℓ on by the
    ``"denoise"`` patch and undone from layer ℓ on by the ``"noise"`` one. The recoveries are normalised by
    the intervened run's own margin and the baseline's; when the intervention leaves the margin within its
    noise floor they are NaN.

    Only the intervention's activation edits are localised (:meth:`~mclcbf_diag.interventions.base.Intervention.
    activation_part`): a decoding-level half (PAI's contrast, VISTA's logit mix) acts after the last layer, on
    no activation, and a method that is only that has nothing to localise (a UserError).

    Args:
        lm: the loaded model.
        inputs: model inputs of one prompt (one row).
        intervention: the intervention localised (a name or an intervention); only its activation part is run.
        components_at: where heads and MLPs are patched (:data:`COMPONENT_POSITIONS`).
        progress: show progress bars over the layers.
        directions: a subset of :data:`DIRECTIONS`: ``"denoise"`` and/or ``"noise"`` (above).

    Returns:
        The :class:`Grid`, clean = the intervened run's margin, corrupted = the baseline's.

    Raises:
        UserError: the intervention changes no activation.
    """
    intervention = _activation_part(intervention)
    # both with eager attention, as the intervened forward must run: an intervention that changes nothing
    # gives the baseline's numbers exactly
    base = activations_forward(lm, inputs, cache=True, attention="eager")
    iv = activations_forward(lm, inputs, cache=True, intervention=intervention)
    grid = activation_patching(lm, inputs, inputs, acts=_stacked(iv, base), progress=progress,
                               components_at=components_at, directions=("denoise",))
    start = _text_start(lm, inputs["input_ids"][0])
    if _edits_before(lm, inputs, intervention, start):
        # the intervened prefix's keys at later layers hold the intervention's later edits there: the residual
        # before the text is put in at its layer and the baseline runs on over the whole prompt, plainly
        t = grid.margins["resid:denoise"]
        for L in range(lm.n_layers):
            x = base.resid[L].clone()
            x[:, :start] = iv.resid[L][:, :start]
            t[L, 0] = _plain_from(lm, x, L, prompt_positions(lm, inputs, 0, 1), sequence_inputs(inputs),
                                  embeds=base.resid[0])
        grid.resid["denoise"] = A.recovery(t, grid.corrupted, grid.clean, grid.floor)
    if "denoise" not in directions:
        for kind in ("resid", "heads", "mlp"):
            getattr(grid, kind).clear()
            grid.margins.pop(f"{kind}:denoise")
    if "noise" in directions:
        margins = restored_patching(lm, inputs, intervention, base, iv, components_at=components_at,
                                    progress=progress)
        for kind, t in margins.items():
            grid.margins[f"{kind}:noise"] = t
            getattr(grid, kind)["noise"] = A.recovery(t, grid.corrupted, grid.clean, grid.floor)
    return grid


def restored_patching(lm: LoadedModel, inputs: dict, intervention, base, iv, *, components_at: str = "text",
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """The margins of the intervened run with one baseline activation restored: ``{"resid": [L, 3], "heads":
    [L, H], "mlp": [L]}`` (the grid of :func:`activation_patching`, direction ``"noise"``).

    ``base``/``iv``: the baseline's and the intervened run's :func:`~mclcbf_diag.runner.activations_forward`
    (one row each, with caches). Each layer's patches are the rows of one intervened batch
    (:func:`~mclcbf_diag.engine.runner.forward`) that continues the intervened run's cache after the image (the
    patches lie there and later positions cannot change earlier ones) and starts at the first layer the
    intervention edits or the patched one, whichever comes first, from the residual the baseline had there
    (nothing is edited before). The residual at the image tokens (every position before the text after the
    image, as in :func:`activation_patching`) needs the intervention to run on from the image: one batch of a
    row per layer over the whole prompt, unless the intervention edits nothing before the text (then that
    residual is the same in both runs and restoring it changes nothing).

    Args:
        lm: the loaded model.
        inputs: model inputs of one prompt (one row).
        intervention: the intervention's activation part (it runs on in every patched row).
        base: the baseline's :func:`~mclcbf_diag.runner.activations_forward` (one row, with its cache).
        iv: the intervened run's, the same way.
        components_at: where heads and MLPs are restored (:data:`COMPONENT_POSITIONS`).
        progress: show a progress bar over the layers.

    Returns:
        ``{"resid": [L, len(GROUPS)], "heads": [L, H], "mlp": [L]}``: the patched margins (float64, not
        normalised).
    """
    from ..progress import tqdm

    _check_at(components_at)
    ids = inputs["input_ids"][0]
    T, start, n_layers = len(ids), _text_start(lm, ids), lm.n_layers
    H = lm.text_config.num_attention_heads
    text = torch.arange(start, T) if components_at == "text" else torch.tensor([T - 1])
    resid = torch.full((n_layers, len(A.GROUPS)), math.nan, dtype=torch.float64)
    heads = torch.full((n_layers, H), math.nan, dtype=torch.float64)
    mlp = torch.full((n_layers,), math.nan, dtype=torch.float64)
    image_edited = _edits_before(lm, inputs, intervention, start)
    prepared: set[int] = set()  # batch sizes the intervention was prepared for (every row is the same prompt)
    for L in tqdm(range(n_layers), desc="restoring the baseline", unit="layer", disable=not progress, leave=False,
                  delay=2):
        patches = [("resid", None, None)]  # the unpatched intervened run (the image residual when it is unedited)
        patches += [("resid", 1, torch.arange(start, T - 1)), ("resid", 2, torch.tensor([T - 1]))]
        patches += [("z", h, text) for h in range(H)] + [("mlp", None, text)]
        m = _restored_batch(lm, inputs, intervention, base, iv, L, patches, start, prepared)
        resid[L, 0], resid[L, 1], resid[L, 2] = m[0], m[1], m[2]
        heads[L] = m[3:3 + H]
        mlp[L] = m[3 + H]
    if image_edited:
        prefix = torch.arange(0, start)
        for L in range(n_layers):  # one row per layer: the whole prompt from the layer on
            resid[L, 0] = _restored_batch(lm, inputs, intervention, base, iv, L, [("resid", 0, prefix)], 0,
                                          prepared)[0]
    return {"resid": resid, "heads": heads, "mlp": mlp}


def _plain_from(lm: LoadedModel, entering: torch.Tensor, L: int, positions: torch.Tensor,
                per_position: dict | None = None, *, embeds: torch.Tensor) -> float:
    """The margin of a plain forward of one whole prompt that starts at layer ``L`` with residual ``entering`` (at
    ``positions``, :func:`~mclcbf_diag.models.mrope.prompt_positions`; ``per_position``: the family's per-position
    inputs, :func:`~mclcbf_diag.models.adapter.sequence_inputs`: Gemma 3's token_type_ids, whose image tokens attend
    to each other; ``embeds``: the prompt's embeddings, whose image tokens get Qwen3-VL's
    deepstack features from layer ``L`` on, :func:`mclcbf_diag.models.deepstack.starting_at`)."""
    from ..models.deepstack import starting_at

    T = entering.shape[1]
    feed = {"inputs_embeds": entering, "attention_mask": torch.ones(1, T, dtype=torch.long, device=entering.device),
            "position_ids": positions.to(entering.device), **(per_position or {})}
    with starting_at(lm.adapter.get(lm.model, lm.adapter.language_model), embeds, L):
        logits = run_patched(lm, feed, layer=L, entering=entering, use_cache=False)
    return float(logits[0, lm.tokens.yes_id] - logits[0, lm.tokens.no_id])


def _edits_before(lm: LoadedModel, inputs: dict, intervention, start: int) -> bool:
    """Whether the intervention may edit a position before ``start`` (its ``first_edited``, None: unknown)."""
    from ..interventions.base import rows_of

    if not intervention.layers(lm.n_layers):
        return False
    row = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)[0]
    first = intervention.first_edited(row)
    return first is None or first < start


def _restored_batch(lm: LoadedModel, inputs: dict, intervention, base, iv, L: int, patches: list,
                    first: int, prepared: set) -> torch.Tensor:
    """Margins [B] of the intervened run, one row per patch ``(kind, index, positions)`` at layer ``L``
    (``kind`` "resid": the residual the layer uses at ``positions``; "z": head ``index``'s output; "mlp"; index
    None with kind "resid": nothing), from position ``first`` on (0: the whole prompt; else the intervened
    cache's prefix). The intervention is prepared once per batch size (``prepared``): the rows are one prompt,
    so what it computes from the inputs (a steering vector, its heads) is the same for every batch."""
    from ..interventions.base import rows_of
    from ..interventions.views import row_inputs
    from ..models.deepstack import starting_at
    from ..models.shared_prefix import SharedPrefix, continuation_mask, continuing

    B = len(patches)
    row = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)[0]
    full = row_inputs(inputs, [row] * B)  # B copies of the prompt, each with its image (Qwen-VL: its patches)
    ids, mask = full["input_ids"], full["attention_mask"]

    if B not in prepared:
        intervention.prepare(lm, full, rows_of(ids, mask, lm.tokens.image_token_id))
        prepared.add(B)
    targeted = intervention.layers(lm.n_layers)
    skip = min(L, min(targeted)) if targeted else 0  # nothing is edited before: the baseline's residual there
    entering = base.resid[skip][0, first:].expand(B, -1, -1).clone()  # one copy per row: edits are in place
    dtype, dev = entering.dtype, entering.device
    feed = {"inputs_embeds": entering, "position_ids": prompt_positions(lm, inputs, first, B).to(dev)}
    hooks = _restore_hooks(lm, base, L, patches, first)
    try:
        if first == 0:
            types = sequence_inputs(full)  # Gemma 3's image tokens
            with starting_at(lm.adapter.get(lm.model, lm.adapter.language_model), base.resid[0], skip):
                last = forward(lm, {**feed, "attention_mask": mask, **types}, intervention, keep=Keep(layers=False),
                               full_ids=ids, prepare=False,
                               continuation=Continuation(skip_to=skip, entering=entering if skip else None)).logits
        else:
            kv = [(layer.keys, layer.values) for layer in iv.cache.layers]
            shared = SharedPrefix([k for k, _ in kv], [v for _, v in kv], first, torch.zeros(B, dtype=torch.long))
            with continuing(lm, shared):
                cont = Continuation(first, {i: k for i, (k, _) in enumerate(kv)}, [0] * B, mask, skip,
                                    entering if skip else None)
                last = forward(lm, {**feed, "attention_mask": continuation_mask(mask, first, dtype)}, intervention,
                               keep=Keep(layers=False), full_ids=ids, continuation=cont, prepare=False,
                               use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    last = last.float()
    return (last[:, lm.tokens.yes_id] - last[:, lm.tokens.no_id]).cpu().double()


def _restore_hooks(lm: LoadedModel, base, L: int, patches: list, first: int) -> list:
    """PyTorch hooks at layer ``L`` that put the baseline's activations into the rows of ``patches``.

    The residual is replaced where the layer reads it, at its input norm's input, which is also the layer's
    residual branch (the same tensor, edited in place), so any edit the intervention made to the residual
    entering the layer is replaced too."""
    H = lm.text_config.num_attention_heads
    by_kind: dict[str, list] = {"resid": [], "z": [], "mlp": []}
    for b, (kind, index, pos) in enumerate(patches):
        if pos is not None:
            by_kind[kind].append((b, index, pos))

    def resid(module, args):
        x = args[0]
        for b, _, pos in by_kind["resid"]:
            x[b, pos - first] = base.resid[L][0, pos].to(x.device, x.dtype)

    def z(module, args):
        out = args[0].clone()
        width = out.shape[-1] // H
        for b, h, pos in by_kind["z"]:
            cols = slice(h * width, (h + 1) * width)
            out[b, pos - first, cols] = base.z[L][0, pos, cols].to(out.device, out.dtype)
        return (out, *args[1:])

    def mlp(module, args, output):
        out = output.clone()
        for b, _, pos in by_kind["mlp"]:
            out[b, pos - first] = base.mlp[L][0, pos].to(out.device, out.dtype)
        return out

    part = lambda name: lm.adapter.layer_part(lm.model, L, name)  # noqa: E731
    return [part("layer_input_norm").register_forward_pre_hook(resid),
            part("layer_o_proj").register_forward_pre_hook(z), part("layer_mlp").register_forward_hook(mlp)]


def _stacked(a, b):
    """Two single-row :class:`~mclcbf_diag.runner.Activations` (with caches) as one batch: ``a`` row 0, ``b`` row 1."""
    from types import SimpleNamespace

    from ..engine.runner import Activations

    cat = lambda u, v: [torch.cat([p, q.to(p.device)]) for p, q in zip(u, v)]  # noqa: E731
    layers = [SimpleNamespace(keys=k, values=v) for k, v in zip(
        cat([x.keys for x in a.cache.layers], [y.keys for y in b.cache.layers]),
        cat([x.values for x in a.cache.layers], [y.values for y in b.cache.layers]))]
    return Activations(torch.cat([a.logits, b.logits.to(a.logits.device)]), SimpleNamespace(layers=layers),
                       cat(a.resid, b.resid), cat(a.z, b.z), cat(a.mlp, b.mlp), None)


# --------------------------------------------------------------------------------------- records
def grid_records(grid: Grid, *, question_id, method: str = "patch", conditions: dict | None = None) -> dict:
    """Tidy columns of a patching grid: per patch its normalised recovery (``<method>_…``) and margin
    (``<method>_…_margin``); layer −1: the clean and corrupted margins and the floor.

    Args:
        grid: the grid.
        question_id: the question's id, on every row.
        method: the metrics' prefix: ``"patch"`` (activation patching), ``"atp"`` (attribution patching) or
            ``"local"`` (:func:`localisation`).
        conditions: direction → the condition written for it; None (or a direction missing): the direction's
            own name.

    Returns:
        Column name → list (``question_id``, ``condition``, ``phase``, ``decode_step``, ``layer``, ``head``,
        ``metric``, ``value``), prefill, decode step 0.
    """
    rows: dict[str, list] = {"condition": [], "layer": [], "head": [], "metric": [], "value": []}

    def add(cond, layer, head, metric, value):
        for k, v in zip(rows, ((conditions or {}).get(cond, cond), int(layer), int(head), metric, float(value))):
            rows[k].append(v)

    for d in grid.heads:
        add(d, NO_LAYER, NO_HEAD, f"{method}_margin_clean", grid.clean)
        add(d, NO_LAYER, NO_HEAD, f"{method}_margin_corrupted", grid.corrupted)
        add(d, NO_LAYER, NO_HEAD, f"{method}_margin_floor", grid.floor)
        for kind in ("resid", "heads", "mlp"):
            rec, marg = getattr(grid, kind)[d], grid.margins[f"{kind}:{d}"]
            for L in range(rec.shape[0]):
                if kind == "resid":
                    for j, g in enumerate(A.GROUPS):
                        add(d, L, NO_HEAD, f"{method}_resid_{g}", rec[L, j])
                        add(d, L, NO_HEAD, f"{method}_resid_{g}_margin", marg[L, j])
                elif kind == "heads":
                    for h in range(rec.shape[1]):
                        add(d, L, h, f"{method}_head", rec[L, h])
                        add(d, L, h, f"{method}_head_margin", marg[L, h])
                else:
                    add(d, L, NO_HEAD, f"{method}_mlp", rec[L])
                    add(d, L, NO_HEAD, f"{method}_mlp_margin", marg[L])
    n = len(rows["value"])
    return {"question_id": [question_id] * n, "condition": rows.pop("condition"), "phase": ["prefill"] * n,
            "decode_step": [0] * n, **rows}


def agreement(atp: Grid, patch: Grid, *, gross: float = 0.25) -> dict:
    """How well attribution patching reproduces activation patching, per kind of patch and direction.

    Args:
        atp: the attribution-patching grid (:func:`attribution_patching`).
        patch: the activation-patching grid of the same question (:func:`activation_patching`).
        gross: the recovery difference above which a patch counts as a failure of the first order.

    Returns:
        ``{"<kind>:<direction>": {"spearman": ρ, "failures": [index…]}}``: Spearman's rank correlation over the
        patches, and the patches (grid indices) whose two recoveries are more than ``gross`` apart; only the
        directions both grids hold.
    """
    out = {}
    for kind in ("resid", "heads", "mlp"):
        for d in getattr(atp, kind):
            a, p = getattr(atp, kind)[d], getattr(patch, kind).get(d)
            if p is None:
                continue
            bad = torch.nonzero((a - p).abs() > gross).tolist()
            out[f"{kind}:{d}"] = {"spearman": A.spearman(a, p), "failures": [tuple(i) for i in bad]}
    return out


def agreement_records(agree: dict, *, question_id) -> dict:
    rows = {"condition": [], "metric": [], "value": []}
    for key, v in agree.items():
        kind, d = key.split(":")
        rows["condition"].append(d)
        rows["metric"].append(f"atp_spearman_{kind}")
        rows["value"].append(v["spearman"])
        rows["condition"].append(d)
        rows["metric"].append(f"atp_failures_{kind}")
        rows["value"].append(len(v["failures"]))
    n = len(rows["value"])
    return {"question_id": [question_id] * n, "condition": rows["condition"], "phase": ["prefill"] * n,
            "decode_step": [0] * n, "layer": [NO_LAYER] * n, "head": [NO_HEAD] * n, "metric": rows["metric"],
            "value": rows["value"]}


def records_frame(*parts: dict):
    """Tidy record columns (several parts) → one frame (:func:`mclcbf_diag.records.frame`)."""
    return frame({k: [v for p in parts for v in p[k]] for k in parts[0]})


# ------------------------------------------------------------------------------ the localisation, summed up
LOCAL_METHODS = {"denoise": "local", "noise": "restore"}
"""The records' prefix of each direction of :func:`localisation` (condition ``steered``)."""



@dataclass(frozen=True)
class LocalEffect:
    """One site's part in the intervention's change of the margin, from one direction of :func:`localisation`."""

    site: str  # "head", "mlp", or "resid_<group>" (the residual at a token group of :data:`attribution.GROUPS`)
    layer: int
    head: int  # NO_HEAD unless a head
    direction: str  # "denoise": the intervened value put into the baseline; "noise": the baseline's restored
    effect: float  # logits of the change it accounts for: m_patched − m_baseline (denoise), m_intervened − m_patched
    share: float  # effect / (m_intervened − m_baseline)
    threshold: float  # the size it beats: 2 × the margin's noise floor (a difference of two margins)

    @property
    def name(self) -> str:
        where = f"{self.layer}.{self.head}" if self.site == "head" else f"layer {self.layer} {self.site}"
        return f"{where} ({self.direction}: {self.effect:+.3g})"


@dataclass(frozen=True)
class LocalSummary:
    """Where an intervention's change of the margin arises and where later components cancel it.

    Every effect is in logits of the Yes − No margin and beats ``threshold`` (2 × ``floor``): a difference of
    two margins each within the floor is rounding. ``enters``: per direction and token group, the first layer
    whose residual carries the change (an effect of the gap's sign); ``arises``: the heads and MLPs whose
    effect has the gap's sign (they make the change); ``cancels``: those whose effect has the opposite sign
    (they work against it); each sorted by size, largest first; ``decision``: the change the decision token's
    residual carries entering each layer, both directions, whatever its size (its rise and fall along the depth;
    :meth:`peak`). When the gap itself is not above the threshold (``measurable`` False) only ``decision`` is
    filled: no component's effect can be told from rounding, but a change that rose and fell along the depth
    still shows (damping).
    """

    margin_baseline: float
    margin_intervened: float
    floor: float
    enters: tuple[LocalEffect, ...] = ()
    arises: tuple[LocalEffect, ...] = ()
    cancels: tuple[LocalEffect, ...] = ()
    decision: tuple[LocalEffect, ...] = ()  # every layer's decision-token residual, each direction (no threshold)

    @property
    def gap(self) -> float:
        return self.margin_intervened - self.margin_baseline

    @property
    def threshold(self) -> float:
        return 2 * self.floor

    @property
    def measurable(self) -> bool:
        return math.isfinite(self.gap) and abs(self.gap) > self.threshold

    def cancelled(self, direction: str = "noise") -> float:
        """The largest cancelling effect of one direction against the largest arising one (0: none cancels)."""
        made = [abs(e.effect) for e in self.arises if e.direction == direction]
        against = [abs(e.effect) for e in self.cancels if e.direction == direction]
        return max(against, default=0.0) / max(made) if made else math.nan

    def peak(self, direction: str = "denoise") -> LocalEffect | None:
        """The layer whose decision-token residual carries the most of the change (its sign), in one direction."""
        same = [e for e in self.decision if e.direction == direction and math.isfinite(e.effect)
                and e.effect * self.gap > 0]
        return max(same, key=lambda e: abs(e.effect), default=None)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "gap": self.gap, "threshold": self.threshold, "measurable": self.measurable}


def local_summary(grid: Grid) -> LocalSummary:
    """The :class:`LocalSummary` of a :func:`localisation` grid (either or both directions)."""
    out = LocalSummary(grid.corrupted, grid.clean, grid.floor)
    gap, thr, sign = out.gap, out.threshold, math.copysign(1.0, out.gap)
    enters, effects, decision = [], [], []

    def effect(d: str, m: float) -> float:
        return m - grid.corrupted if d == "denoise" else grid.clean - m

    if not out.measurable:  # the decision token's profile still shows where a change rose and fell
        j = A.GROUPS.index("decision")
        share = (lambda e: e / gap) if gap else (lambda e: math.nan)
        return LocalSummary(grid.corrupted, grid.clean, grid.floor, decision=tuple(
            LocalEffect("resid_decision", L, NO_HEAD, d, effect(d, float(m)), share(effect(d, float(m))), thr)
            for d in grid.heads for L, m in enumerate(grid.margins[f"resid:{d}"][:, j])))

    for d in grid.heads:
        for j, g in enumerate(A.GROUPS):
            col = grid.margins[f"resid:{d}"][:, j]
            first = next((L for L in range(len(col)) if sign * effect(d, float(col[L])) > thr), None)
            if first is not None:
                e = effect(d, float(col[first]))
                enters.append(LocalEffect(f"resid_{g}", first, NO_HEAD, d, e, e / gap, thr))
            if g == "decision":
                decision += [LocalEffect("resid_decision", L, NO_HEAD, d, effect(d, float(col[L])),
                                         effect(d, float(col[L])) / gap, thr) for L in range(len(col))]
        heads, mlp = grid.margins[f"heads:{d}"], grid.margins[f"mlp:{d}"]
        for (L, h), m in ((idx, float(heads[idx])) for idx in np.ndindex(*heads.shape)):
            effects.append(LocalEffect("head", int(L), int(h), d, effect(d, m), effect(d, m) / gap, thr))
        for L in range(len(mlp)):
            effects.append(LocalEffect("mlp", L, NO_HEAD, d, effect(d, float(mlp[L])), effect(d, float(mlp[L])) / gap,
                                       thr))
    big = sorted((e for e in effects if math.isfinite(e.effect) and abs(e.effect) > thr), key=lambda e: -abs(e.effect))
    enters.sort(key=lambda e: (e.layer, A.GROUPS.index(e.site.removeprefix("resid_"))))
    return LocalSummary(grid.corrupted, grid.clean, grid.floor, tuple(enters),
                        tuple(e for e in big if sign * e.effect > 0), tuple(e for e in big if sign * e.effect < 0),
                        tuple(decision))


def _direction(grid: Grid, d: str) -> Grid:
    """The part of a grid with one direction only."""
    return Grid(grid.clean, grid.corrupted, grid.floor, {d: grid.resid[d]}, {d: grid.heads[d]}, {d: grid.mlp[d]},
                {k: v for k, v in grid.margins.items() if k.endswith(f":{d}")}, grid.plain)


def local_records(grid: Grid, *, question_id) -> dict:
    """Tidy columns of a :func:`localisation` grid: ``local_…`` (denoising) and ``restore_…`` (noising), condition
    ``steered``."""
    parts = [grid_records(_direction(grid, d), question_id=question_id, method=m, conditions={d: "steered"})
             for d, m in LOCAL_METHODS.items() if d in grid.heads]
    return {k: [v for p in parts for v in p[k]] for k in parts[0]}


def _activation_part(intervention):
    part = as_intervention(intervention).activation_part()
    if part is None:
        raise UserError(f"--intervention {intervention.name} changes no activation (it acts on the answer's "
                        "distribution only), so there is nothing to localise; attribute the baseline alone")
    return part


def localise(lm: LoadedModel, inputs: dict, intervention, *, question_id, components_at: str = "text",
             progress: bool = False):
    """Where one question's intervention changes the margin, from both directions (:func:`localisation`).

    Args:
        lm: the loaded model.
        inputs: model inputs of one prompt (one row).
        intervention: the intervention localised (a name or an intervention).
        question_id: the question's id, on every record.
        components_at: where heads and MLPs are patched (:data:`COMPONENT_POSITIONS`).
        progress: show progress bars over the layers.

    Returns:
        ``(records, summary)``: the tidy frame of :func:`local_records` and the :class:`LocalSummary` (the
        evidence a verdict can cite).

    Raises:
        UserError: the intervention changes no activation.
    """
    grid = localisation(lm, inputs, intervention, components_at=components_at, progress=progress)
    return records_frame(local_records(grid, question_id=question_id)), local_summary(grid)


# ----------------------------------------------------------------------------------- one question
@dataclass
class AttributeResult:
    """Everything ``mclcbf-diag attribute`` computes for one question."""

    records: object  # tidy frame
    summary: dict
    baseline: A.Attribution
    steered: A.Attribution | None
    patch: Grid
    atp: Grid
    agreement: dict
    local: Grid | None = None  # where the intervention acts (:func:`localisation`), with an intervention
    local_summary: LocalSummary | None = None  # its summary (:func:`local_summary`)


def attribute_sample(lm: LoadedModel, question, image, corrupted_image, intervention=None, *,
                     template: str | None = None, corruption: str = "", corrupted_pixels=None,
                     progress: bool = False, components_at: str = "text") -> AttributeResult:
    """DLA of the baseline and the intervened run, the activation-patching grid and attribution patching.

    (Over 60 lines: one straight sequence of runs, then the summary the command prints, field by field.)

    Args:
        lm: the loaded model.
        question: the question (its ``text``, ``question_id`` and ``label``).
        image: the clean image (PIL).
        corrupted_image: the corrupted input's image (PIL); None when ``corrupted_pixels`` is given.
        intervention: the intervention whose run is attributed (its DLA change from the baseline) and localised
            (:func:`localisation`); None: the baseline only.
        template: the prompt template (``<image>`` and ``{question}``); None: the default template.
        corruption: the corruption's name, written in the summary.
        corrupted_pixels: the corrupted input's processed ``pixel_values`` (the VCD noise acts on those), with
            ``corrupted_image`` None.
        progress: show progress bars over the layers.
        components_at: where heads and MLPs are patched (:data:`COMPONENT_POSITIONS`).

    Returns:
        The :class:`AttributeResult`: the tidy records, the summary the command prints, both DLAs, both grids,
        their agreement and (with an intervention) the localisation and its summary.

    Raises:
        UserError: the model normalises its heads' and MLPs' outputs before adding them (no DLA), the prompt
            has no image or no text after it, or the template lacks ``<image>`` or ``{question}``.
    """
    from ..data import build_prompt

    prompt = build_prompt(question.text, template) if template else build_prompt(question.text)
    clean = lm.inputs(prompt, image)
    if corrupted_pixels is not None:
        corrupted = {**clean, "pixel_values": corrupted_pixels.to(clean["pixel_values"].device,
                                                                 clean["pixel_values"].dtype)}
    else:
        corrupted = lm.inputs(prompt, corrupted_image)
    qid = question.question_id
    base = dla(lm, forward(lm, clean, keep=Keep(components=True)).captures[0])
    parts = [dla_records(base, question_id=qid, condition="baseline")]
    steered = None
    if intervention is not None:
        steered = dla(lm, forward(lm, clean, intervention, keep=Keep(components=True)).captures[0])
        parts.append(dla_records(steered, question_id=qid, condition="steered", base=base))
    acts = activations_forward(lm, paired_inputs(lm, clean, corrupted), cache=True)
    grid = activation_patching(lm, clean, corrupted, acts=acts, progress=progress, components_at=components_at)
    atp = attribution_patching(lm, clean, corrupted, acts=acts, directions=DIRECTIONS, components_at=components_at)
    agree = agreement(atp, grid)
    parts += [grid_records(grid, question_id=qid, method="patch"), grid_records(atp, question_id=qid, method="atp"),
              agreement_records(agree, question_id=qid)]
    local = None
    if intervention is not None:
        local = localisation(lm, clean, intervention, components_at=components_at, progress=progress)
        parts.append(local_records(local, question_id=qid))
    records = records_frame(*parts)
    H = base.heads.shape[1]

    def top(scores: torch.Tensor, k: int = 3, noise: float = 0.0) -> list[str]:
        """The k largest |scores|, leaving out those at or under ``noise`` (then fewer than k)."""
        flat = torch.nan_to_num(scores.reshape(-1).abs(), nan=-1.0)
        idx = [i for i in torch.argsort(flat, descending=True)[:k].tolist() if float(flat[i]) > noise]
        return [f"{i // H}.{i % H} ({float(scores.reshape(-1)[i]):+.3g})" for i in idx] or ["none above noise"]

    summary = {
        "question_id": qid, "question": question.text, "label": question.label, "corruption": corruption,
        "components_at": components_at,
        "margin_clean": grid.plain[0], "margin_corrupted": grid.plain[1], "margin_floor": grid.floor,
        "margin_steered": steered.margin if steered is not None else math.nan,
        "dla_sum_error": base.margin - base.total,
        "top_heads_dla": top(base.heads), "top_heads_dla_image": top(base.sources["image"]),
        "top_heads_patch_denoise": top(grid.heads["denoise"]), "top_heads_atp_denoise": top(atp.heads["denoise"]),
        "spearman_heads_denoise": agree["heads:denoise"]["spearman"],
        "atp_failures": sum(len(v["failures"]) for v in agree.values()),
    }
    if steered is not None:
        summary["top_heads_d_dla"] = top(steered.heads - base.heads)
    if local is not None:
        summary["local_gap"] = local.gap
        # a share s of the change is a margin difference s·gap between two runs, each within the margin floor:
        # under 2·floor it is rounding, whichever head it names
        noise = 2 * local.floor / abs(local.gap) if local.gap and math.isfinite(local.gap) else math.inf
        summary["top_heads_local"] = top(local.heads["denoise"], noise=noise)
        # restored: 1 − share is the part of the change lost without that head
        summary["top_heads_restore"] = top(1 - local.heads["noise"], noise=noise)
        found = local_summary(local)
        summary["local"] = found.to_dict()
    return AttributeResult(records, summary, base, steered, grid, atp, agree, local,
                           found if local is not None else None)


# ------------------------------------------------------------------------------------------ a whole split
PUBLISHED = ("mclcbf", "adhh", "pai", "vaf", "var", "vista")
"""The interventions a split's carriers are compared with (each at its default preset; AD-HH at ``paper``)."""



@dataclass
class SplitCarriers:
    """What :func:`split_carriers` found: the per-question records, the counts and the comparison."""

    records: object  # tidy frame (its metrics are in the shared glossary, mclcbf_diag.measurements.records)
    counts: object  # one row per head and MLP: n_dla, n_patch, n_either, n_both, adhh_head
    interventions: object  # one row per intervention: its sites and layers, and which carriers it edits
    adhh_heads: tuple
    summary: dict


def carriers(values: torch.Tensor, margin: float, share: float, floor: float) -> torch.Tensor:
    """Which direct contributions carry a Yes of ``margin`` > 0: toward Yes, at least ``share`` of it and above
    ``floor``.

    Args:
        values: the components' direct logit attributions (any shape, margin units).
        margin: the Yes − No margin of the run.
        share: the least fraction of ``margin`` a carrier contributes.
        floor: the margin's noise floor; a contribution at or under it carries nothing.

    Returns:
        Bool tensor of ``values``' shape.
    """
    return (values > share * margin) & (values > floor)


def patch_carriers(recovery: torch.Tensor, gap: float, share: float, floor: float) -> torch.Tensor:
    """Which patches carry the image's part of a Yes: the clean − corrupted ``gap`` above twice the floor and
    positive, and a recovery of at least ``share`` worth more than twice the floor.

    Args:
        recovery: the patches' normalised recoveries (denoising; any shape; NaN counts as 0).
        gap: the clean − corrupted margin of the plain forwards.
        share: the least recovery a carrier has.
        floor: the margin's noise floor.

    Returns:
        Float64 tensor of ``recovery``'s shape: 1.0 for a carrier, 0.0 otherwise; NaN (all) when the image does
        not raise the Yes.
    """
    if not (math.isfinite(gap) and gap > 2 * floor):
        return torch.full(recovery.shape, math.nan, dtype=torch.float64)
    rec = torch.nan_to_num(recovery.double(), nan=0.0)
    return ((rec >= share) & (rec * gap > 2 * floor)).double()


def _question_carriers(lm: LoadedModel, question, clean: dict, corrupted: dict, *, share: float, components_at: str,
                       progress: bool) -> dict:
    """The tidy records of one wrong Yes (carry_*, carries_* and wrong_yes_margin in the shared glossary)."""
    att = dla(lm, forward(lm, clean, keep=Keep(components=True)).captures[0])
    floor = margin_floor(lm)
    grid = activation_patching(lm, clean, corrupted, directions=("denoise",), components_at=components_at,
                               progress=progress)
    gap = grid.plain[0] - grid.plain[1]
    rows: dict[str, list] = {"layer": [], "head": [], "metric": [], "value": []}

    def add(layer, head, metric, value):
        for k, v in zip(rows, (int(layer), int(head), metric, float(value))):
            rows[k].append(v)

    add(NO_LAYER, NO_HEAD, "wrong_yes_margin", att.margin)
    add(NO_LAYER, NO_HEAD, "carry_patch_gap", gap)
    parts = {"head": (att.heads, grid.heads["denoise"]), "mlp": (att.mlp, grid.mlp["denoise"])}
    for kind, (direct, rec) in parts.items():
        flags = carriers(direct, att.margin, share, floor).double(), patch_carriers(rec, gap, share, floor)
        for idx in np.ndindex(*direct.shape):
            layer, head = (idx[0], idx[1]) if kind == "head" else (idx[0], NO_HEAD)
            add(layer, head, f"carry_dla_{kind}", direct[idx])
            add(layer, head, f"carries_dla_{kind}", flags[0][idx])
            add(layer, head, f"carry_patch_{kind}", rec[idx])
            add(layer, head, f"carries_patch_{kind}", flags[1][idx])
    n = len(rows["value"])
    return {"question_id": [question.question_id] * n, "condition": ["baseline"] * n, "phase": ["prefill"] * n,
            "decode_step": [0] * n, **rows}


def split_carriers(lm: LoadedModel, items, *, share: float = 0.1, components_at: str = "text",
                   template: str | None = None, adhh_calibration: int | None = None,
                   progress: bool = False) -> SplitCarriers:
    """Over the questions of a split, the heads and MLPs that carry the wrong "Yes" on wrong answers.

    ``items``: ``(question, image, corrupt)`` per question (``image`` a PIL image or a function loading it),
    ``corrupt(clean_inputs)`` giving the corrupted input of the same prompt. Each question's answer is read from
    a plain forward; on every wrong Yes (label no, Yes/No on top, margin > 0) a component carries it by direct
    logit attribution when its direct contribution is toward Yes, at least ``share`` of the margin and above the
    margin's noise floor, and by activation patching (denoising) when the image raises the Yes beyond twice the
    floor and restoring the component's clean output recovers at least ``share`` of that (:func:`carriers`,
    :func:`patch_carriers`). The counts are compared with the hallucination heads AD-HH finds on the same model
    (preset ``paper``, ``adhh_calibration`` questions) and with the sites each of :data:`PUBLISHED` edits
    (:func:`edited_sites`).

    Args:
        lm: the loaded model.
        items: ``(question, image, corrupt)`` per question (``image`` a PIL image or a function loading it),
            ``corrupt(clean_inputs)`` giving the corrupted input of the same prompt.
        share: the least share of the margin (DLA) or of the image's part of it (patching) a carrier has.
        components_at: where heads and MLPs are patched (:data:`COMPONENT_POSITIONS`).
        template: the prompt template; None: the default template.
        adhh_calibration: AD-HH's calibration questions; None: its preset's.
        progress: show progress bars.

    Returns:
        The :class:`SplitCarriers`: per-question records, counts per head and MLP (:func:`carrier_counts`),
        one row per intervention (:func:`edited_sites`), AD-HH's heads and a summary (the answers' kinds, the
        carriers found, AD-HH's heads that carry).
    """
    import pandas as pd

    from ..data import build_prompt
    from ..outcomes import read_logits
    from ..progress import tqdm

    items = list(items)
    yes_ids, no_ids = _answer_ids(lm)
    parts, answers, first_inputs = [], {"right": 0, "wrong_yes": 0, "wrong_no": 0, "not_yes_no": 0}, None
    for question, image, corrupt in tqdm(items, desc="wrong answers", unit="question", disable=not progress,
                                         delay=2):
        prompt = build_prompt(question.text, template) if template else build_prompt(question.text)
        clean = lm.inputs(prompt, image() if callable(image) else image)
        first_inputs = first_inputs or clean
        with torch.no_grad():
            logits = lm.model(**clean, logits_to_keep=1).logits[0, -1]
        reading = read_logits(logits, lm.tokens.yes_id, lm.tokens.no_id, yes_ids, no_ids)
        kind = _answer_kind(question.label, reading)
        answers[kind] += 1
        if kind == "wrong_yes":
            parts.append(_question_carriers(lm, question, clean, corrupt(clean), share=share,
                                            components_at=components_at, progress=False))
    records = records_frame(*parts) if parts else frame({k: [] for k in ("question_id", "condition", "phase",
                                                                         "decode_step", "layer", "head", "metric",
                                                                         "value")})
    adhh = ()
    for _ in tqdm(range(first_inputs is not None), desc="AD-HH's hallucination heads", disable=not progress,
                  delay=2):  # one step, a minute or more on a CPU: the bar shows it is under way
        adhh = hallucination_heads(lm, first_inputs, adhh_calibration)
    counts = carrier_counts(records, lm.n_layers, lm.text_config.num_attention_heads, adhh)
    ivs = pd.DataFrame([edited_sites(lm, name, counts, adhh) for name in PUBLISHED])
    found = counts[counts["n_either"] > 0]
    summary = {"questions": len(items), **answers, "share": share, "components_at": components_at,
               "margin_floor": margin_floor(lm), "adhh_heads": [f"{a}.{b}" for a, b in adhh],
               "carriers": [_component(r) for r in found.itertuples()],
               "adhh_heads_carrying": [f"{a}.{b}" for a, b in adhh if _count(counts, "head", a, b) > 0]}
    return SplitCarriers(records, counts, ivs, tuple(adhh), summary)


def _answer_ids(lm: LoadedModel):
    from ..outcomes import answer_ids

    return answer_ids(lm.tokens)


def _answer_kind(label, reading) -> str:
    if not reading.valid:
        return "not_yes_no"
    if label not in ("yes", "no") or reading.answer == label:
        return "right"
    return "wrong_yes" if reading.answer == "yes" else "wrong_no"


def _component(row) -> str:
    return f"{row.layer}.{row.head}" if row.component == "head" else f"layer {row.layer} MLP"


def _count(counts, component: str, layer: int, head: int) -> int:
    sel = counts[(counts.component == component) & (counts.layer == layer) & (counts.head == head)]
    return int(sel["n_either"].iloc[0]) if len(sel) else 0


def carrier_counts(records, n_layers: int, n_heads: int, adhh_heads=()):
    """Per head and MLP, over the wrong Yes answers: how many it carries by DLA and by patching.

    Args:
        records: the tidy ``carries_dla_*`` / ``carries_patch_*`` records of :func:`split_carriers`.
        n_layers: the model's layers.
        n_heads: its attention heads per layer.
        adhh_heads: AD-HH's hallucination heads, ``(layer, head)`` pairs.

    Returns:
        A frame, one row per head and per layer's MLP (head −1): ``component``, ``layer``, ``head``, ``n_dla``,
        ``n_patch``, ``n_either``, ``n_both`` (questions it carries by DLA, by patching, by either, by both),
        ``n_wrong_yes`` (the questions counted) and ``adhh_head`` (whether AD-HH lists the head).
    """
    import pandas as pd

    n = records["question_id"].nunique() if len(records) else 0
    rows = []
    for component in ("head", "mlp"):
        sel = records[records["metric"].isin([f"carries_dla_{component}", f"carries_patch_{component}"])]
        wide = sel.pivot_table(index=["question_id", "layer", "head"], columns="metric", values="value",
                               aggfunc="first", dropna=False) if len(sel) else None
        for layer in range(n_layers):
            for head in (range(n_heads) if component == "head" else (NO_HEAD,)):
                d = p = e = b = 0
                if wide is not None:
                    at = wide.xs((layer, head), level=("layer", "head"))
                    dv = at[f"carries_dla_{component}"].fillna(0) > 0
                    pv = at[f"carries_patch_{component}"].fillna(0) > 0
                    d, p, e, b = int(dv.sum()), int(pv.sum()), int((dv | pv).sum()), int((dv & pv).sum())
                rows.append({"component": component, "layer": layer, "head": head, "n_dla": d, "n_patch": p,
                             "n_either": e, "n_both": b, "n_wrong_yes": n,
                             "adhh_head": component == "head" and (layer, head) in set(adhh_heads)})
    return pd.DataFrame(rows)


def hallucination_heads(lm: LoadedModel, inputs: dict, calibration: int | None = None) -> tuple:
    """The heads AD-HH (preset ``paper``) finds on this model: its own ``prepare`` (cached per process).

    Args:
        lm: the loaded model.
        inputs: model inputs of one question (AD-HH prepares on them).
        calibration: AD-HH's calibration questions; None: its preset's.

    Returns:
        ``((layer, head), …)``: the heads found.
    """
    from ..interventions import resolve
    from ..interventions.base import rows_of

    iv = resolve("adhh", "paper", [f"calibration={calibration}"] if calibration else [])
    iv.prepare(lm, inputs, rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id))
    return tuple(tuple(h) for h in iv.found)


def edited_sites(lm: LoadedModel, name: str, counts, adhh_heads=()) -> dict:
    """What intervention ``name`` (default preset) edits, and which of the carriers in ``counts`` it acts on.

    An attention edit at a layer acts on the heads of that layer (AD-HH: on its listed heads only); a residual
    edit entering a layer acts on no component's output directly, but on the input of every component from
    that layer on (``downstream``). No MLP output is edited by any of them.

    Args:
        lm: the loaded model (its layer count).
        name: the intervention's registry name (AD-HH at preset ``paper``, the others at their default).
        counts: the carrier counts of :func:`carrier_counts`.
        adhh_heads: AD-HH's hallucination heads, ``(layer, head)`` pairs (its layers and heads when ``name`` is
            ``"adhh"``).

    Returns:
        One row: ``intervention``, ``preset``, ``sites``, ``layers``, ``carriers`` (how many), ``acts_on`` and
        ``n_acts_on`` (the carrying heads it edits), ``downstream_of_its_residual_edit`` and ``n_downstream``.
    """
    from ..errors import UserError
    from ..interventions import resolve

    iv = resolve(name, "paper" if name == "adhh" else None, [])
    try:
        sites = sorted(iv.open_sites(True))
    except UserError:
        sites = []
    layers = sorted(adhh_heads and {a for a, _ in adhh_heads}) if name == "adhh" else list(iv.layers(lm.n_layers))
    found = counts[counts["n_either"] > 0]
    heads = found[found.component == "head"]
    on = []
    if "attention" in sites:
        on = [r for r in heads.itertuples() if (name != "adhh" and r.layer in layers)
              or (name == "adhh" and (r.layer, r.head) in set(adhh_heads))]
    downstream = [r for r in found.itertuples() if "residual" in sites and layers and r.layer >= min(layers)]
    return {"intervention": name, "preset": "paper" if name == "adhh" else next(iter(iv.presets)),
            "sites": ", ".join(sites), "layers": (ranges_text(layers) or "none") if name != "adhh" else ", ".join(
                f"{a}.{b}" for a, b in adhh_heads), "carriers": len(found),
            "acts_on": ", ".join(_component(r) for r in on) or "none",
            "n_acts_on": len(on), "downstream_of_its_residual_edit": ", ".join(_component(r) for r in downstream)
            or "none", "n_downstream": len(downstream)}
