"""Explain's units prepare each auxiliary view of a question once, not once per unit (``Prefix.views``).

A verdict runs many units of one question under one method: the measuring and the intervened run, the doses of
the dose-response and of the stronger-contrast search, the knob changes of the counterfactuals. A unit's
auxiliary view (VCD's noised image, CausalMM's counterfactual features, PAI's image-free prompt, VISTA's steering
vector's image-free prompt, OPERA's candidates) depends on the question and on the knobs its forward reads
(``Intervention.view_key``), not on the dose: the units now share it, computed once per question batch from the
prefix forward. Each test runs the same units twice, by that route and by the separate one (every view key None:
each batch of units prepares its rows on their own, as before), and checks

* every unit's combined scores: the same tokens ruled out, the others within the logit floor (``tests/floors.py``)
  times what the combination multiplies the auxiliary logits by (α·dose of a contrast; the aux logits of both
  routes differ by one floor: two float32 forwards of the same view, a batched matmul's summation order apart);
* the auxiliary rows the model ran (its top-level forwards outside the units' own traced forwards and the prefix
  forward): one per unit (two for VISTA's two forwards) by the separate route, one per question and distinct view
  (or OPERA's candidates per question) by the shared one;
* that a knob the view reads (VCD's noise step, CausalMM's attention map) gives a view of its own, equal to its
  separate route: the reuse is keyed on what the view depends on, not on the intervention object.
"""

import math

import pytest
import torch
from floors import logit_floor
from plain_refs import three_questions

import mclcbf_diag.engine.runner as runner
from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.engine.units import Prefix, Unit, run_units
from mclcbf_diag.experiments.verdict import Settings, explain_batch
from mclcbf_diag.interventions.base import Intervention
from mclcbf_diag.interventions.causalmm import CausalMM
from mclcbf_diag.interventions.opera import OPERA
from mclcbf_diag.interventions.pai import PAI
from mclcbf_diag.interventions.vcd import VCD, VCDKnobs
from mclcbf_diag.interventions.vista import VISTA

DOSES = (0.5, 1.0, 2.0)
# name: (the intervention, a knob change its view does not read, one it reads (None: none), the aux logits'
# largest coefficient in the combination at the largest dose, model rows per unit by the separate route and per
# question by the shared one)
METHODS = {
    "vcd": (lambda: VCD(VCDKnobs(beta=1e-3)), {"beta": 0.0}, {"noise_step": 999}, 1.0 * max(DOSES), 1, 1),
    # (CausalMM declares no cutoff knob, so every knob is in its key: {} is another object with the same knobs)
    "causalmm": (CausalMM, {}, {"attention": "uniform"}, 1.0 * max(DOSES), 1, 1),
    # γ·log p + (1 − γ)·log p_u, γ − 1 = 0.1·dose: log p_u within two floors (its logsumexp within one)
    "pai": (PAI, {"alpha": 0.5}, None, 2 * 0.1 * max(DOSES), 1, 1),
    # the vector's difference moves the steered residual by λ·s·δv/‖v‖ ≪ one floor (its own test bounds δv); SLA
    # reads the run's own layers
    "vista": (VISTA, {"lam": 0.02}, None, 0.0, 2, 1),
    # a candidate's score: its logit + weight·dose·image share; the shares are masses (floor ≪ a logit's)
    "opera": (OPERA, {"scale_factor": 20.0}, None, 0.0, 1 + 5, 5),
}


class AuxRows:
    """The model's top-level forwards inside the block but those of the units' traced runs and of the prefix: the
    auxiliary views' rows, one count per forward."""

    def __init__(self, lm, monkeypatch):
        self.lm, self.rows, self._inside = lm, [], 0
        for name in ("forward", "prefix_forward"):
            monkeypatch.setattr(runner, name, self._own(getattr(runner, name)))

    def _own(self, fn):
        def wrapped(*args, **kwargs):
            self._inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside -= 1
        return wrapped

    def __enter__(self):
        def hook(module, args, kwargs):
            if not self._inside:
                x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
                self.rows.append(int(x.shape[0]))

        self.handle = self.lm.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def separate(monkeypatch, *classes):
    """The separate route: no view key, so every batch of units prepares its own rows."""
    for cls in classes:
        monkeypatch.setattr(cls, "view_key", Intervention.view_key)


def assert_scores_close(got, want, tol):
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert bool((got[~finite] == want[~finite]).all())
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=tol)


@pytest.fixture(scope="module")
def questions():
    return three_questions()


@pytest.mark.parametrize("name", list(METHODS))
def test_units_share_each_questions_view_and_read_the_same_scores(embedded_model, questions, monkeypatch, name):
    lm = embedded_model
    make, same_view, other_view, coef, per_unit, per_question = METHODS[name]
    n = len(questions[0])

    def units():
        iv = make()
        out = [Unit(q, iv, 1.0, False) for q in range(n)]  # the measuring run: prepared too
        out += [Unit(q, iv, d) for q in range(n) for d in DOSES]  # the intervened run and the dose-response
        out += [Unit(q, iv.replace(**same_view)) for q in range(n)]  # another object, the same view
        if other_view is not None:
            out += [Unit(q, iv.replace(**other_view)) for q in range(n)]
        return out

    def routed(shared: bool):
        mp = pytest.MonkeyPatch()
        try:
            if not shared:
                separate(mp, type(make()))
            prefix = Prefix(lm, *questions)
            todo = units()
            with AuxRows(lm, mp) as aux:
                got = run_units(prefix, todo, capture=False)
            return todo, got, aux.rows
        finally:
            mp.undo()

    todo, got, shared_rows = routed(True)
    _, want, separate_rows = routed(False)
    views = 1 if other_view is None else 2
    assert sum(separate_rows) == per_unit * len(todo)  # every unit's view, as many times as it has units
    assert sum(shared_rows) == per_question * n * views  # each question's view once (per distinct view)
    assert len(shared_rows) == views  # one forward for the batch's questions per view
    tol = (1 + coef) * logit_floor(lm)
    for u, (scores, records), (ref, ref_records) in zip(todo, got, want):
        assert_scores_close(scores, ref, tol)
        for metric in ("decoding_model_margin", "decoding_aux_margin"):
            a, b = records.get(-1, {}).get(metric), ref_records.get(-1, {}).get(metric)
            assert (a is None) == (b is None)
            if a is not None and math.isfinite(b):
                assert a == pytest.approx(b, abs=2 * logit_floor(lm))
    if other_view is not None:  # the other view is its own (and differs from the first)
        aux = [r[-1]["decoding_aux_margin"] for u, (_, r) in zip(todo, got) if u.steer and u.dose == 1.0]
        first, other = aux[n:2 * n], aux[-n:]  # the configured run's views (dose 1), the other view's
        assert all(a != b for a, b in zip(first, other))


PICK = (2, 0, 1)  # test_experiments_verdict's questions: one wrong answer, two right


@pytest.mark.parametrize("name", ["vcd", "pai"])
def test_a_verdict_prepares_each_view_once_per_question(embedded_model, monkeypatch, name):
    """A whole verdict (sweep off: its knockouts read no view): the same rows and dose curves by both routes, and
    the auxiliary rows drop from one per unit of the method to one per question."""
    lm = embedded_model
    qs = load_pope(shipped.pope_file("adversarial"))
    sel = [qs[i] for i in PICK]
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in sel]
    make = METHODS[name][0]
    settings = Settings(k_max=4.0, bisect_steps=2, sweep=False)

    def routed(shared: bool):
        mp = pytest.MonkeyPatch()
        ran = []
        try:
            if not shared:
                separate(mp, type(make()))
            import mclcbf_diag.experiments.verdict as verdict

            def counted(prefix, units, **kw):
                ran.extend(u for u in units if isinstance(u.iv, type(make())))
                return run_units(prefix, units, **kw)

            mp.setattr(verdict, "run_units", counted)
            with AuxRows(lm, mp) as aux:
                out = explain_batch(lm, sel, images, make(), settings)
            return out, aux.rows, len(ran)
        finally:
            mp.undo()

    got, shared_rows, units = routed(True)
    want, separate_rows, units_again = routed(False)
    assert units == units_again and units >= 4 * len(sel)  # several units per question
    assert sum(separate_rows) == units  # one auxiliary row per unit of the method
    assert sum(shared_rows) == len(sel)  # one per question: the doses and the cutoff's fix share its view
    tol = 3 * logit_floor(lm)
    for a, b in zip(got, want):
        for key, value in b.row.items():
            if isinstance(value, float) and math.isfinite(value):
                assert a.row[key] == pytest.approx(value, abs=tol), key
            else:
                assert a.row[key] == value, key
        assert list(a.dose.curve.k) == list(b.dose.curve.k)
        assert list(a.dose.curve.outcome) == list(b.dose.curve.outcome)
        margins = [(x, y) for x, y in zip(a.dose.curve.margin, b.dose.curve.margin) if math.isfinite(y)]
        assert all(x == pytest.approx(y, abs=tol) for x, y in margins)
