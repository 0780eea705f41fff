"""Many small experiments on many questions, each a row of one batched continuation of the baseline.

A *unit* is one run of one question: an intervention, a dose on what it changes, and whether
it steers or only measures (:class:`Unit`). Every experiment of a verdict (the intervened run,
knockouts, the graded sweep, the dose-response, the cause tests, the counterfactual fixes)
only changes the decision token or the text tokens after the image, so all of them continue
from one baseline forward of the question batch (:class:`Prefix`):

* **One prefix per question batch.** :func:`mclcbf_diag.engine.runner.prefix_forward` runs the
  batch once (left-padded, the vision tower once per distinct image) and keeps its KV cache,
  its prompt embeddings (image features merged in) and the residual entering every layer at
  the text after the image.
* **Units as rows.** :func:`run_units` lays the units out as the rows of a batch (a
  question's row repeated once per unit), cuts the cache just before the batch's first
  edited position (the earliest :meth:`~mclcbf_diag.interventions.base.Intervention.first_edited`
  over its rows; a causal model's earlier positions are the same in every unit) and runs only
  the remaining positions, fed as embeddings, so even a cut before an image token is exact
  (but for Gemma 3, whose image tokens attend to later ones of the same image: a chunk cut before an
  image token runs the whole prompt from its embeddings, with the prompt's ``token_type_ids``).
  Units that edit only the decision token and those that edit after the image go in separate
  batches (one position vs. the text after the image); batches are cut so one layer's
  attention tensors stay under :data:`ATTENTION_BUDGET` bytes.
* **The prefix is shared, not copied.** Every row of a batch attends to its question's
  cached keys and values in place (:mod:`mclcbf_diag.models.shared_prefix`): a unit costs
  its few positions, not a copy of the ~590-position prefix.
* **Layers before the first edit are not run.** A unit changes nothing before the first layer
  its intervention acts on, so a logits-only batch starts at the earliest such layer of its
  rows, from the residual the prefix forward had there (kept for the text after the image);
  batches are formed by that layer (late-editing units together).
* **Each row its own intervention** (:class:`Mix`): at every site the runner offers, the
  rows are grouped by (intervention, dose, steer) and each group's intervention sees a site
  holding only its rows, with its dose and steer flag; an intervention that reads each row's
  dose (:attr:`~mclcbf_diag.interventions.base.Intervention.row_doses`, MC-LCBF) gets all
  its doses in one group, so its own batching (MC-LCBF's vmapped gradients) spans them.
* **Each auxiliary view once per question.** A decoding-level method's auxiliary forward (VCD's noised
  image, CausalMM's counterfactual features, PAI's image-free prompt, VISTA's steering vector, OPERA's
  candidates) depends on the question and on the knobs it reads, never on the dose, so the units of a
  verdict (the traced run, the dose-response, the stronger-contrast search, the cutoff's fix) share it:
  an intervention with a :meth:`~mclcbf_diag.interventions.base.Intervention.view_key` is prepared from
  :meth:`Prefix.views`, which computes each (question, key) once for the question batch, from the prefix
  forward where the method can use it (its cache, logits and last-position states:
  :meth:`~mclcbf_diag.interventions.base.Intervention.prepare_batched`; a view that differs in its image
  features only runs as one forward of the questions' rows, the tower once per distinct image), and
  keeps it for every later unit. Any other intervention is prepared per batch of units on its rows' whole
  prompts.

A unit's answer equals a separate run of that question alone up to the summation order of
batched matmuls (≪ 1e-4 in float32).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..interventions.attention_edits import mass_factors
from ..interventions.base import Intervention, rows_of
from ..models.adapter import sequence_inputs
from ..models.mrope import position_rows

# Bytes of one layer's attention scores and probabilities per batch of units. Smaller batches keep
# their tensors in cache (the measured choice: docs/performance.md).
ATTENTION_BUDGET = 48 * 2**20
MAX_UNITS = 1024  # rows per batch at most


@dataclass(frozen=True, eq=False)
class Unit:
    """One run of question ``q`` (its row in the :class:`Prefix`) under ``iv``."""

    q: int
    iv: Intervention
    dose: float = 1.0
    steer: bool = True
    setting: object = None  # a per-row setting for interventions that take one (``bind``)


class Mix(Intervention):
    """Each batch row its own unit: the runner's sites are dispatched to each unit's intervention."""

    name = "mix"

    def __init__(self, units: list[Unit]):
        super().__init__()
        self.units = list(units)
        self._ivs = list({id(u.iv): u.iv for u in self.units}.values())

    @property
    def interventions(self) -> list:
        """The distinct interventions of the units."""
        return self._ivs

    def layers(self, n_layers: int) -> tuple[int, ...]:
        self._layers = {id(iv): set(iv.layers(n_layers)) for iv in self._ivs}
        return tuple(sorted(set().union(*self._layers.values())))

    def open_sites(self, steer: bool) -> frozenset[str]:
        return frozenset().union(*(u.iv.open_sites(u.steer) for u in self.units))

    def readout_layers(self, n_layers: int) -> tuple[int, ...]:
        return tuple(sorted(set().union(*(iv.readout_layers(n_layers) for iv in self._ivs))))

    def first_edited(self, row) -> int | None:
        return self.units[row.index].iv.first_edited(row)

    def prepare(self, lm, inputs: dict, rows) -> None:
        self._prepare_each(lm, inputs, rows, self._ivs)

    def _prepare_each(self, lm, inputs: dict, rows, ivs) -> None:
        for iv in ivs:
            if type(iv).prepare is not Intervention.prepare:
                iv.prepare(lm, inputs, [r for r in rows if self.units[r.index].iv is iv])

    def prepare_from(self, prefix: "Prefix", idx: torch.Tensor, rows) -> None:
        """:meth:`prepare` of a batch of units continuing ``prefix`` (row b: question ``idx[b]``): an intervention
        with a :meth:`~mclcbf_diag.interventions.base.Intervention.view_key` gets each question's views from the
        prefix (:meth:`Prefix.views`, computed once per question batch); any other is prepared on the rows' whole
        prompts (:meth:`Prefix.full_inputs`)."""
        alone = []
        for iv in self._ivs:
            key = iv.view_key()
            if key is None:
                alone.append(iv)
                continue
            mine = [r for r in rows if self.units[r.index].iv is iv]
            iv.use_views(prefix.lm, mine, prefix.views(iv, key, [int(idx[r.index]) for r in mine]))
        if any(type(iv).prepare is not Intervention.prepare for iv in alone):
            inputs = prefix.full_inputs(idx, pixels=any(iv.reads_pixels for iv in alone))
            self._prepare_each(prefix.lm, inputs, rows, alone)

    def begin(self, rows, n_layers: int) -> None:
        self.layers(n_layers)
        self._groups: dict[tuple, list] = {}
        for iv in self._ivs:
            mine = [r for r in rows if self.units[r.index].iv is iv]
            iv.bind({r.index: self.units[r.index].setting for r in mine})
            iv.begin(mine, n_layers)
        for r in rows:
            u = self.units[r.index]
            self._groups.setdefault((id(u.iv), None if u.iv.row_doses else u.dose, u.steer), []).append(r)

    def _dispatch(self, kind: str, site) -> None:
        for (key, dose, steer), rows in self._groups.items():
            iv = self.units[rows[0].index].iv
            if (kind != "logits" and site.layer not in self._layers[key]) or kind not in iv.open_sites(steer):
                continue
            sub = copy.copy(site)
            sub.rows, sub.steer = rows, steer
            if dose is None:  # the intervention reads each row's own dose
                sub.dose, sub.doses = 1.0, {r.index: self.units[r.index].dose for r in rows}
            else:
                sub.dose, sub.doses = dose, None
            getattr(iv, "readout" if kind == "logits" else kind)(sub)

    def residual(self, site) -> None:
        self._dispatch("residual", site)

    def attention(self, site) -> None:
        self._dispatch("attention", site)

    def pattern(self, site) -> None:
        self._dispatch("pattern", site)

    def readout(self, site) -> None:
        self._dispatch("logits", site)

    def row_records(self, row) -> dict[str, float]:
        return self.units[row.index].iv.row_records(row)


class Prefix:
    """One baseline forward of a question batch: logits, KV cache and embeddings to continue from."""

    def __init__(self, lm, prompts: list[str], images: list):
        from .batch import batch_inputs
        from .runner import prefix_forward

        self.lm = lm
        self.inputs = batch_inputs(lm, prompts, images)
        self.ids, self.mask = self.inputs["input_ids"], self.inputs["attention_mask"]
        self.positions = self.inputs["position_ids"]
        self.rows = rows_of(self.ids, self.mask, lm.tokens.image_token_id)
        # the residuals entering each layer are kept from the first text position after any image on
        self.states_from = min(r.pad + r.last_image + 1 for r in self.rows)
        run = prefix_forward(lm, self.inputs, states_from=self.states_from)
        self.logits, self.embeds, self.layer_inputs = run.logits, run.embeds, run.layer_inputs
        self.cache = run.cache
        self.kv = [(layer.keys, layer.values) for layer in run.cache.layers]
        self._views: dict = {}  # (question, view key) → what an intervention prepared for it

    def views(self, iv: Intervention, key, questions: list[int]) -> list:
        """What ``iv`` prepares for each of ``questions`` (:meth:`~mclcbf_diag.interventions.base.Intervention.
        prepared_views`), under its view ``key``: computed the first time a key is asked for, for every question of
        the batch that lacks it, from this forward where the intervention can use it
        (:meth:`~mclcbf_diag.interventions.base.Intervention.prepare_batched`: the cache, logits and last-position
        states of the whole prompts; an auxiliary view that differs in its image features only runs as one forward
        of those rows), and kept for every later unit of the batch."""
        missing = [q for q in range(len(self.rows)) if (q, key) not in self._views]
        if missing:
            rows = [self.rows[q] for q in missing]
            self._prepare(iv, rows)
            self._views.update({(q, key): view for q, view in zip(missing, iv.prepared_views(rows))})
        return [self._views[q, key] for q in questions]

    def _prepare(self, iv: Intervention, rows: list) -> None:
        from ..interventions.base import Batched
        from ..interventions.views import last_logits, row_inputs, with_view_features

        lm = self.lm
        states = torch.stack([s[:, -1].float() for s in self.layer_inputs], 1)  # [B, layers, d] at the last position
        batched = Batched(cache=self.cache, logits=self.logits, states=states)
        features = iv.aux_features(lm, self.inputs, rows)  # None unless the inputs share image features
        if features is not None:  # the tower once per distinct view image, the rows' forward once
            batched = dataclasses.replace(batched, aux_logits=last_logits(lm, with_view_features(
                row_inputs(self.inputs, rows), features)))
        iv.prepare_batched(lm, self.inputs, rows, batched)

    def full_inputs(self, idx: torch.Tensor, pixels: bool = True) -> dict:
        """The model inputs of rows ``idx`` over the whole prompt (for an intervention's prepare); the pixels beside
        shared features only with ``pixels``."""
        out = {"input_ids": self.ids[idx], "attention_mask": self.mask[idx],
               "position_ids": position_rows(self.positions, idx), **self.token_types(idx)}
        mm = self.inputs.get("mm_encoder_outputs")
        if mm is not None:
            from ..interventions.views import rows_of_shared

            out["mm_encoder_outputs"] = rows_of_shared(mm, idx.tolist(), pixels=pixels)
        else:
            out["pixel_values"] = self.inputs["pixel_values"][idx]
        return out

    def token_types(self, idx: torch.Tensor) -> dict:
        """Gemma 3's ``token_type_ids`` of rows ``idx`` (its image tokens attend to each other), or nothing."""
        return sequence_inputs(self.inputs, rows=idx)

    def row_attention_bytes(self, start: int) -> int:
        """Bytes of one row's attention scores and probabilities at one layer, continuing from ``start``."""
        T, heads = self.ids.shape[1], self.lm.model.config.get_text_config().num_attention_heads
        return 3 * heads * (T - start) * T * 4


class SweepKnockout(Intervention):
    """The graded sweep's edits of one (token set, layer window), each row its own setting.

    The edit of :class:`mclcbf_diag.experiments.sweep.GradedKnockout` (a row's ``("target", t)`` or
    ``("factor", f)``, bound per row through :attr:`Unit.setting`), all rows of a site edited
    together: each row's factors on image and on other keys are computed at once (1 on the
    queries it does not edit), and where consecutive rows share one contiguous span of image
    keys (the usual case: one question's units) the probabilities are multiplied in place,
    slice by slice, without a gathered copy. Image mass is summed in float32 over that span,
    or as ``(p · mask).sum`` otherwise: equal to the per-row edit up to the summation order.
    """

    name = "sweep_knockout"
    sites = frozenset({"attention"})

    def __init__(self, tokens: str, window):
        super().__init__()
        self.tokens, self.window = tokens, window
        self.settings: dict[int, tuple[str, float]] = {}
        self._layouts: dict = {}

    def layers(self, n_layers: int) -> tuple[int, ...]:
        return tuple(range(n_layers)) if self.window is None else tuple(i for i in self.window if 0 <= i < n_layers)

    def open_sites(self, steer: bool) -> frozenset[str]:
        return self.sites if steer else frozenset()

    def first_edited(self, row) -> int | None:
        return row.decision if self.tokens == "decision" else int(row.after_image()[0])

    def bind(self, settings: dict) -> None:
        self.settings = dict(settings)
        self._layouts: dict = {}

    def _layout(self, site):
        """What every layer's edit of these rows shares (the same at each layer of one forward):
        the earliest edited query, per row the edited queries, the image keys, the setting; and
        the runs of rows (consecutive batch rows whose image keys are one contiguous span)."""
        probs, rows = site.tensor, site.rows
        key = (tuple(r.index for r in rows), tuple(probs.shape[-2:]), site.phase, site.start)
        if key not in self._layouts:
            dev, S = probs.device, probs.shape[-2]
            decision = self.tokens == "decision" or site.phase == "decode"
            # rows of one prompt (a question's units) share their layout: computed once per prompt
            per_prompt: dict = {}
            prompt_of = [(r.pad, r.image.numpy().tobytes()) for r in rows]
            for r, k in zip(rows, prompt_of):
                if k not in per_prompt:
                    mask = site.key_mask(r, r.image)
                    on = mask.nonzero()[:, 0]
                    contiguous = len(on) > 0 and int(on[-1]) + 1 - int(on[0]) == len(on)
                    per_prompt[k] = (mask, (int(on[0]), int(on[-1]) + 1) if contiguous else None,
                                     None if decision else site.query_index(r, r.after_image()))
            layouts = [per_prompt[k] for k in prompt_of]
            queries = torch.zeros(len(rows), S, dtype=torch.bool)
            if decision:  # every row's current position is the last one
                queries[:, S - 1] = True
            else:
                for j, (_, _, q) in enumerate(layouts):
                    queries[j, q] = True
            first = int(queries.any(0).nonzero().min())  # the earliest query any row edits
            kinds = [self.settings[r.index] for r in rows]
            image = torch.stack([m for m, _, _ in layouts])  # [R, K]
            self._layouts[key] = (
                torch.tensor([r.index for r in rows], device=dev), first, queries[:, None, first:, None].to(dev),
                image[:, None, None].to(dev),  # [R, 1, 1, K]
                torch.tensor([v for _, v in kinds], dtype=torch.float32, device=dev)[:, None, None, None],
                torch.tensor([k == "target" for k, _ in kinds], device=dev)[:, None, None, None],
                _runs([r.index for r in rows], [span for _, span, _ in layouts]))
        return self._layouts[key]

    def attention(self, site) -> None:
        probs = site.tensor
        idx, first, keep, image, value, is_target, runs = self._layout(site)
        if runs is None:
            return self._attention_gathered(probs, idx, first, keep, image, value, is_target)
        for (lo, hi), (a, b), (j0, j1) in runs:
            p = probs[lo:hi, :, first:]  # a view: the rows are edited in place
            m = p[..., a:b].sum(-1, keepdim=True, dtype=torch.float32)  # [r, H, S', 1]
            o = (p[..., :a].sum(-1, keepdim=True, dtype=torch.float32)
                 + p[..., b:].sum(-1, keepdim=True, dtype=torch.float32))
            c_img, c_oth = _factors(m, o, value[j0:j1], is_target[j0:j1], keep[j0:j1])
            p[..., a:b].mul_(c_img.to(p.dtype))
            p[..., :a].mul_(c_oth.to(p.dtype))
            p[..., b:].mul_(c_oth.to(p.dtype))

    @staticmethod
    def _attention_gathered(probs, idx, first, keep, image, value, is_target) -> None:
        """Any rows, any image keys: the edit on a gathered copy, written back."""
        p = probs[idx, :, first:].float()  # [R, H, S', K]
        imgf = image.to(p.dtype)
        m = (p * imgf).sum(-1, keepdim=True)  # [R, H, S', 1]
        o = (p * (1 - imgf)).sum(-1, keepdim=True)
        c_img, c_oth = _factors(m, o, value, is_target, keep)
        probs[idx, :, first:] = (p * (imgf * c_img + (1 - imgf) * c_oth)).to(probs.dtype)


def _factors(m, o, value, is_target, keep):
    """:func:`~mclcbf_diag.interventions.attention_edits.mass_factors` toward each row's target
    (``("target", t)``: t; ``("factor", f)``: f·m; both below 1), and 1 on the queries a row does
    not edit (``keep`` false)."""
    t = torch.where(is_target, value.clamp(max=1 - 1e-4), (m * value).clamp(max=1 - 1e-4))
    one = torch.ones_like(m)
    c_img, c_oth = mass_factors(m, o, t)
    return torch.where(keep, c_img, one), torch.where(keep, c_oth, one)


def _runs(indices: list[int], spans: list):
    """``[((row lo, row hi), (key a, key b), (j0, j1))]``: maximal runs of consecutive batch rows
    whose image keys are the same contiguous span ``[a, b)`` (``spans``: each row's, None where
    its image keys are not one contiguous span); None when some row's are not."""
    if any(span is None for span in spans):
        return None
    out, j0 = [], 0
    for j in range(1, len(indices) + 1):
        if j == len(indices) or indices[j] != indices[j - 1] + 1 or spans[j] != spans[j0]:
            out.append(((indices[j0], indices[j - 1] + 1), spans[j0], (j0, j)))
            j0 = j
    return out


def _first(u: Unit, row) -> int | None:
    f = u.iv.first_edited(row)
    return None if f is None else row.pad + f


def run_units(prefix: Prefix, units: list[Unit], *, capture: bool, patterns: bool = False):
    """Every unit's ``(logits [vocab], capture or records)``, in the order of ``units``.

    ``capture``: a :class:`~mclcbf_diag.engine.runner.RunCapture` per unit, else the unit's per-layer records (as
    :func:`~mclcbf_diag.engine.runner.forward` keeps them; with ``patterns`` also those the interventions'
    ``pattern`` sites record, e.g. MC-LCBF's Δh realised).
    """
    T = prefix.ids.shape[1]
    starts = [_first(u, prefix.rows[u.q]) for u in units]
    kinds = [2 if s is None else 0 if s == T - 1 else 1 for s in starts]  # decision token, after it, unknown
    layers = [0 if capture else min(u.iv.layers(prefix.lm.n_layers), default=0) for u in units]
    out: list = [None] * len(units)
    for kind in (0, 1, 2):
        # by first edited layer and position (rows that edit late share a chunk), then by question
        members = sorted((i for i in range(len(units)) if kinds[i] == kind),
                         key=lambda i: (-layers[i], -(starts[i] or 0), units[i].q))
        if not members:
            continue
        low = 0 if kind == 2 else min(starts[i] for i in members)
        size = max(1, min(MAX_UNITS, ATTENTION_BUDGET // max(1, prefix.row_attention_bytes(low))))
        for c in range(0, len(members), size):
            chunk = sorted(members[c:c + size], key=lambda i: units[i].q)
            for j, res in zip(chunk, _run_chunk(prefix, [units[j] for j in chunk], capture, patterns)):
                out[j] = res
    return out


def _run_chunk(prefix: Prefix, units: list[Unit], capture: bool, patterns: bool = False):
    from ..models.shared_prefix import SharedPrefix, continuation_mask, continuing
    from .runner import Continuation, Keep, forward

    lm = prefix.lm
    idx = torch.tensor([u.q for u in units])
    ids, mask, pos = prefix.ids[idx], prefix.mask[idx], position_rows(prefix.positions, idx)
    mix = Mix(units)
    rows = rows_of(ids, mask, lm.tokens.image_token_id)
    firsts = [_first(u, r) for u, r in zip(units, rows)]
    start = 0 if any(f is None for f in firsts) else max(0, min(firsts))
    token_types = prefix.token_types(idx)
    types = token_types.get("token_type_ids")
    if types is not None and bool(types[:, start:].any()):
        start = 0  # Gemma 3: an image token continued would attend to later ones, which a causal continuation hides
    mix.prepare_from(prefix, idx, rows)
    embeds, keep = prefix.embeds[idx, start:], Keep(layers=capture, patterns=patterns)
    if start == 0:
        res = forward(lm, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos,
                           **token_types}, mix, keep=keep, full_ids=ids, prepare=False)
    else:
        shared = SharedPrefix([k for k, _ in prefix.kv], [v for _, v in prefix.kv], start, idx)
        feed = {"inputs_embeds": embeds, "attention_mask": continuation_mask(mask, start, embeds.dtype),
                "position_ids": pos[..., start:]}  # [B, S] or Qwen-VL's [3, B, S]
        # no edit before the mix's first layer: the layers before it are the prefix forward's
        skip = 0 if capture or start < prefix.states_from else min(mix.layers(lm.n_layers), default=0)
        entering = prefix.layer_inputs[skip][idx, start - prefix.states_from:] if skip else None
        with continuing(lm, shared):
            cont = Continuation(start, {i: k for i, (k, _) in enumerate(prefix.kv)}, idx.tolist(), mask, skip, entering)
            res = forward(lm, feed, mix, keep=keep, full_ids=ids, continuation=cont, prepare=False, use_cache=False)
    per_row = res.captures if capture else res.records
    return [(res.logits[b], per_row[b]) for b in range(len(units))]


__all__ = ["ATTENTION_BUDGET", "MAX_UNITS", "Mix", "Prefix", "SweepKnockout", "Unit", "run_units"]
