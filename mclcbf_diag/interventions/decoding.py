"""What every decoding-level method shares: the ``logits`` site, its records, its auxiliary forwards.

A decoding-level method changes no activation: the model computes what it always computes, and
the method changes the distribution the answer is read from (:class:`~.base.Readout`). So its
intervened forward may continue from the baseline's cached prefix at the decision token
(:meth:`first_edited`), and a measuring run opens no site. :meth:`DecodingMethod.combine` is the
method (pure, on one row's logits), :meth:`DecodingMethod.auxiliary` its auxiliary forward run on its own.

Where the auxiliary view differs from the question only in its image features (VCD's noised image,
CausalMM's counterfactual features: :meth:`~.base.Intervention.aux_features`), a runner runs it as
extra rows of the main rows' own batched forward, stacked under them with the same ids, mask and
positions (:func:`~.views.with_aux_rows`), and hands their logits to
:meth:`DecodingMethod.prepare_batched`: one forward computes both, and :meth:`DecodingMethod.combine`
reads them. Each row of a batch computes what it computes alone, up to the summation order of
batched matmuls, so both routes give the same scores within the margin's noise floor.

In generation (:mod:`mclcbf_diag.engine.decode`) the same view continues a KV cache of its own from
step to step (:meth:`DecodingMethod.decode_views`: its prompt once, then one position per generated
token), and its logits at the last position reach :meth:`DecodingMethod.combine` through
:meth:`DecodingMethod.use_decode_views`; a method whose auxiliary forward is no such view (CausalMM's
language level) is prepared again over the whole sequence at every step.

Every steered row records, at layer −1 (the shared glossary's ``decoding_*`` metrics):
the model's own Yes − No margin, the auxiliary forward's, the combined scores' before the
plausibility cutoff, and whether the cutoff removed the Yes or the No token. ``final_margin`` of
the run is the combined distribution's, ±inf where the cutoff removed exactly one of them.
"""

from __future__ import annotations

import torch

from .base import Batched, Intervention, Readout, Row, View, auxiliary_forward, knob_key
from .contrast import contrast, margin, plausible


class DecodingMethod(Intervention):
    """Base of the methods that only act on the answer's distribution (the ``logits`` site).

    ``cutoff_knob`` names the knob of its plausibility cutoff (None: it has none), for the rule and the
    counterfactual fix that undo the cutoff, and for the default :meth:`combine`. ``strength_knob`` names the knob
    of its contrast's strength (VCD's α, CausalMM's γ): a method that names one gets the default :meth:`combine`,
    the contrast (1 + s·dose)·ℓ − s·dose·ℓ' of its own logits with its auxiliary forward's, cut to the tokens the
    cutoff keeps; a method whose scores take another form (DoLa's, HALC's) leaves it None and overrides
    :meth:`combine`.
    """

    sites = frozenset({"logits"})
    row_doses = True
    cutoff_knob: str | None = None
    strength_knob: str | None = None

    def rules(self) -> list:
        from .decoding_rules import contrast_rules

        return contrast_rules(self.cutoff_knob)

    def fixes(self) -> dict[str, dict]:
        return {} if self.cutoff_knob is None else {"no_cutoff": {self.cutoff_knob: 0.0}}

    def cause_fix(self, cause_id: str) -> str | None:
        return "no_cutoff" if cause_id == "cutoff_removes_flip" and self.cutoff_knob is not None else None

    def layer_sets(self, evidence) -> tuple[list[int], list[int], list[int]]:
        """It acts once, on the answer's distribution (layer −1), wherever it read it."""
        acted = [-1] if evidence.scalar("decoding_model_margin") is not None else []
        return acted, acted, acted

    def idle_reason(self, records) -> str:
        return "the combined distribution gives the model's own answer"

    def trace_summary(self, steered, baseline) -> dict:
        return decoding_summary(steered)

    def summary_lines(self, summary: dict) -> list[str]:
        return decoding_lines(summary)

    def open_sites(self, steer: bool) -> frozenset[str]:
        return self.sites if steer else frozenset()

    def auxiliary_forwards(self) -> int | None:
        return 0  # the methods that run one say so

    def first_edited(self, row: Row) -> int | None:
        return row.decision  # nothing before the answer changes

    def activation_part(self):
        return None  # it changes no activation

    def prepare(self, lm, inputs: dict, rows: list[Row]) -> None:
        self.prepare_batched(lm, inputs, rows, Batched())

    def prepare_batched(self, lm, inputs: dict, rows: list[Row], batched: Batched) -> None:
        """The auxiliary logits as the runner computed them in the batch's own forward, else from their own.

        ``batched.aux_logits`` holds the rows of :meth:`~.base.Intervention.aux_features`' view; without them a separate
        forward (:meth:`auxiliary`) computes the logits.

        Args:
            lm: the loaded model.
            inputs: the batch's model inputs.
            rows: the batch rows prepared.
            batched: what the runner kept of the batch's own forwards (its ``aux_logits``).
        """
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))
        self._aux: dict[int, torch.Tensor] = {}
        logits = batched.aux_logits
        if logits is None:
            with auxiliary_forward():  # not the question's own forward: pope's records skip it
                logits = self.auxiliary(lm, inputs, rows)
        if logits is not None:
            self._aux = {r.index: logits[b].detach().float().cpu() for b, r in enumerate(rows)}

    def view_key(self):
        """Its class and knobs but the plausibility cutoff's (which only the combination reads; a dose only scales
        the contrast): the auxiliary forward's key, where the auxiliary logits are all it prepares (the class
        prepares through :meth:`prepare_batched` here); None for a method that prepares more (it keys its own)."""
        cls = type(self)
        own = cls.prepare is DecodingMethod.prepare and cls.prepare_batched is DecodingMethod.prepare_batched
        return knob_key(self, (self.cutoff_knob,) if self.cutoff_knob else ()) if own else None

    def prepared_views(self, rows: list[Row]) -> list:
        """Each row's auxiliary logits [vocab] (None: the method runs none)."""
        return [self._aux.get(r.index) for r in rows]

    def use_views(self, lm, rows: list[Row], views: list) -> None:
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))
        self._aux = {r.index: v for r, v in zip(rows, views) if v is not None}

    def decode_views(self, lm, inputs: dict, rows: list[Row]) -> dict[str, View] | None:
        """Its one auxiliary forward as a view a generation loop continues by its own cache: the view :meth:`views`
        names (a plain forward of other inputs: VCD's noised image, CausalMM's counterfactual features); {} for a
        method that runs none (DoLa); None where the auxiliary forward is not such a view (CausalMM's language
        level, an edit of attention inside the model) or the method prepares more than the auxiliary logits."""
        cls = type(self)
        if cls.prepare is not DecodingMethod.prepare or cls.prepare_batched is not DecodingMethod.prepare_batched:
            return None
        if cls.auxiliary is DecodingMethod.auxiliary:
            return {}
        views = self.views(lm, inputs, rows)
        if len(views) != 1:
            return None
        return {name: View(view, probed=True) for name, view in views.items()}

    def use_decode_views(self, lm, rows: list[Row], outputs: dict) -> None:
        """The auxiliary logits from the view's output (none for a method that runs no view)."""
        self._yes_no = (int(lm.tokens.yes_id), int(lm.tokens.no_id))
        self._aux = {}
        for out in outputs.values():  # at most one view
            self._aux = {r.index: out.logits[b].detach().float().cpu() for b, r in enumerate(rows)}

    def auxiliary(self, lm, inputs: dict, rows: list[Row]) -> torch.Tensor | None:
        """[len(rows), vocab] logits of the auxiliary forward run on its own, row b for ``rows[b]`` (None: the
        method needs none); the separate route of the rows a runner can batch (:meth:`aux_features`)."""
        return None

    def combine(self, site: Readout, row: Row, logits: torch.Tensor, aux: torch.Tensor | None, dose: float):
        """``(scores before the cutoff, tokens kept by it)`` [vocab] for one row.

        The default (a method with a :attr:`strength_knob`): :func:`~.contrast.contrast` (1 + s·dose)·ℓ − s·dose·ℓ'
        with s the knob's value, and the tokens :func:`~.contrast.plausible` keeps under knob :attr:`cutoff_knob`
        (every token without one). A method without a strength knob overrides it.

        Args:
            site: the ``logits`` readout.
            row: the row combined.
            logits: [vocab] the model's own logits at the row's decision position.
            aux: [vocab] the auxiliary forward's logits for the row (:meth:`auxiliary`); None without one.
            dose: scales the method (1: as configured; it scales the contrast's strength, the cutoff stays).

        Returns:
            ``(scores, keep)``: the [vocab] scores, and the bool [vocab] tokens kept (None: every token), as
            :func:`answer_from` takes them.
        """
        if self.strength_knob is None:
            raise NotImplementedError(f"{type(self).__name__} names no strength_knob and does not override combine")
        scores = contrast(logits, aux, getattr(self.knobs, self.strength_knob) * dose)
        keep = None if self.cutoff_knob is None else plausible(logits, getattr(self.knobs, self.cutoff_knob))
        return scores, keep

    def readout(self, site: Readout) -> None:
        for row in site.rows:
            logits = site.logits[row.index]
            aux = self._aux.get(row.index)
            aux = None if aux is None else aux.to(logits.device)
            raw, keep = self.combine(site, row, logits, aux, site.dose_of(row))
            answer_from(site, row, raw, keep, self._yes_no, aux)


def answer_from(site: Readout, row: Row, raw: torch.Tensor, keep: torch.Tensor | None, yes_no: tuple[int, int],
                aux: torch.Tensor | None = None) -> None:
    """Set the row's scores to ``raw`` with the tokens outside ``keep`` at −inf, and record the shared
    ``decoding_*`` terms.

    Args:
        site: the ``logits`` readout.
        row: the row answered.
        raw: [vocab] the method's scores before the plausibility cutoff.
        keep: bool [vocab] the tokens the cutoff keeps; None: every token.
        yes_no: the (Yes, No) token ids the margins read.
        aux: [vocab] the auxiliary distribution's logits, if the method has one (its margin is recorded).
    """
    yes, no = yes_no
    scores = raw if keep is None else raw.masked_fill(~keep, -torch.inf)
    site.set(row, scores)
    site.record(row, "decoding_model_margin", margin(site.logits[row.index], yes, no))
    if aux is not None:
        site.record(row, "decoding_aux_margin", margin(aux, yes, no))
    site.record(row, "decoding_contrast_margin", margin(raw, yes, no))
    site.record(row, "decoding_cut_yes", 0.0 if keep is None else float(not bool(keep[yes])))
    site.record(row, "decoding_cut_no", 0.0 if keep is None else float(not bool(keep[no])))


TERMS = ("model_margin", "aux_margin", "contrast_margin", "cut_yes", "cut_no")


def decoding_summary(steered) -> dict:
    """The ``decoding_*`` terms of a traced run (its per-layer frame of the steered condition; layer −1), if any."""
    if -1 not in steered.index:
        return {}
    row = steered.loc[-1]
    return {f"decoding_{t}": float(row[f"decoding_{t}"]) for t in TERMS
            if f"decoding_{t}" in row.index and row[f"decoding_{t}"] == row[f"decoding_{t}"]}


def decoding_lines(summary: dict) -> list[str]:
    """One line for ``trace`` and ``explain``: the margins the method combined, and what its cutoff ruled out."""
    if "decoding_model_margin" not in summary:
        return []
    parts = [f"model {summary['decoding_model_margin']:+.4g}"]
    if "decoding_aux_margin" in summary:
        parts.append(f"contrasted with {summary['decoding_aux_margin']:+.4g}")
    parts.append(f"combined {summary.get('decoding_contrast_margin', float('nan')):+.4g} before the cutoff")
    cut = [name for name, key in (("Yes", "decoding_cut_yes"), ("No", "decoding_cut_no")) if summary.get(key, 0) > 0.5]
    tail = f"; the cutoff ruled out {' and '.join(cut)}" if cut else ""
    return [f"  decoding margins: {', '.join(parts)}{tail}"]


class WithLogitPart:
    """An activation edit with a logit-level part of its own (PAI's image-free contrast, VISTA's self-logits
    augmentation), mixed in before :class:`~mclcbf_diag.interventions.base.Intervention`: the ``logits`` site opens
    while the logit part is on (:attr:`logit_part_on`: knob :attr:`logit_knob` is not :attr:`logit_off`), the trace
    reports the decoding terms, and the activation part alone (what attribution localises) is the same intervention
    with that knob off."""

    logit_knob: str = ""
    logit_off: float = 0.0

    @property
    def logit_part_on(self) -> bool:
        """Whether the logit-level part runs (knob :attr:`logit_knob` is not :attr:`logit_off`)."""
        return getattr(self.knobs, self.logit_knob) != self.logit_off

    def open_sites(self, steer: bool) -> frozenset[str]:
        if not steer:
            return frozenset()
        return self.sites | {"logits"} if self.logit_part_on else self.sites

    def trace_summary(self, steered, baseline) -> dict:
        return decoding_summary(steered)

    def summary_lines(self, summary: dict) -> list[str]:
        return decoding_lines(summary)

    def activation_part(self):
        return self.replace(**{self.logit_knob: self.logit_off})
