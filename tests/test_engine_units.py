"""SweepKnockout (the graded sweep's batched edit) against GradedKnockout's per-row edit; Mix's dispatch of
doses; MC-LCBF's rows of different prompts and doses in one vmapped group against runs of each alone; each
auxiliary view of a question prepared once for all its units (the last part, see its section).
"""

import math
from types import SimpleNamespace

import floors
import pytest
import torch
from plain_refs import three_questions

import mclcbf_diag.engine.runner as runner
from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.runner import forward
from mclcbf_diag.engine.units import Mix, Prefix, SweepKnockout, Unit, _runs, run_units
from mclcbf_diag.experiments.sweep import GradedKnockout
from mclcbf_diag.experiments.verdict import Settings, explain_batch
from mclcbf_diag.interventions import MCLCBF
from mclcbf_diag.interventions.base import Intervention, Row, Site
from mclcbf_diag.interventions.catalog import CausalMMKnobs
from mclcbf_diag.interventions.causalmm import CausalMM
from mclcbf_diag.interventions.opera import OPERA
from mclcbf_diag.interventions.pai import PAI
from mclcbf_diag.interventions.vcd import VCD, VCDKnobs
from mclcbf_diag.interventions.vista import VISTA
from mclcbf_diag.measurements import noise


def _rows(images, pads, length=12):
    rows = []
    for b, (img, pad) in enumerate(zip(images, pads)):
        image = torch.zeros(length - pad, dtype=torch.bool)
        image[list(img)] = True
        rows.append(Row(b, pad, torch.arange(length - pad), image))
    return rows


def _site(rows, probs, start=0):
    run = SimpleNamespace(phase="prefill", decode_step=0, rows=rows, steer=True, dose=1.0, start=start)
    return Site(run, "attention", 0, probs)


SETTINGS = [("target", 0.3), ("factor", 0.0), ("factor", 2.5), ("target", 0.9), ("factor", 1.0)]


@pytest.mark.parametrize("tokens", ["decision", "after_image"])
@pytest.mark.parametrize("images, pads", [
    ([range(2, 7)] * 5, [0] * 5),  # one span, one run
    ([range(2, 7)] * 3 + [range(1, 5)] * 2, [0, 0, 0, 2, 2]),  # two spans, two runs
    ([range(2, 7), [1, 2, 5, 6], range(2, 7), range(2, 7), range(2, 7)], [0] * 5),  # a split image: gathered
])
def test_sweep_edit_equals_the_per_row_edit(tokens, images, pads):
    torch.manual_seed(0)
    rows = _rows(images, pads)
    probs = torch.softmax(torch.randn(len(rows), 3, 12, 12) * 2, -1)
    settings = {r.index: s for r, s in zip(rows, SETTINGS)}
    want = probs.clone()
    GradedKnockout([settings[r.index] for r in rows], tokens=tokens).attention(_site(rows, want))
    got = probs.clone()
    sweep = SweepKnockout(tokens, None)
    sweep.bind(settings)
    sweep.attention(_site(rows, got))
    # the same edit (mass_factors) of the same rows, batched or per row: each probability within the float32
    # floor of a mass of its size (noise.mass_floor: √p, 16 roundings)
    assert bool(((got - want).abs() <= floors.mass_floors(want)).all())
    assert not torch.equal(got, probs)  # the edit did something
    edited = torch.zeros(12, dtype=torch.bool)
    edited[11 if tokens == "decision" else 7:] = True
    assert torch.equal(got[:, :, ~edited], probs[:, :, ~edited])  # other queries untouched
    if tokens == "after_image":  # the queries between the last image token and the end
        assert not torch.equal(got[:, :, 8], probs[:, :, 8])


def test_a_subset_of_rows_is_edited_in_place_and_alone():
    torch.manual_seed(1)
    rows = _rows([range(2, 7)] * 5, [0] * 5)
    probs = torch.softmax(torch.randn(5, 2, 12, 12), -1)
    mine = [rows[1], rows[2], rows[4]]  # two runs: rows 1–2 and row 4
    settings = {r.index: s for r, s in zip(mine, SETTINGS)}
    site = _site(rows, probs.clone())
    site.rows = mine
    sweep = SweepKnockout("decision", None)
    sweep.bind(settings)
    sweep.attention(site)
    assert [(lo, hi) for (lo, hi), _, _ in _runs([1, 2, 4], [(0, 4)] * 3)] == [(1, 3), (4, 5)]
    assert _runs([1, 2, 4], [(0, 4), None, (0, 4)]) is None  # a row whose image keys are not one span
    assert torch.equal(site.tensor[[0, 3]], probs[[0, 3]])
    for r in mine:
        m = site.tensor[r.index, :, 11, 2:7].sum(-1)
        kind, v = settings[r.index]
        base = probs[r.index, :, 11, 2:7].sum(-1)
        expect = torch.full_like(m, v) if kind == "target" else (base * v).clamp(max=1 - 1e-4)
        assert torch.allclose(m, expect, atol=1e-6)
        assert torch.allclose(site.tensor[r.index, :, 11].sum(-1), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize("images", [[range(2, 7)] * 4, [range(2, 7), [1, 2, 5, 6]] * 2])  # in place; gathered
def test_rows_stay_distributions_when_the_image_takes_nearly_all_mass(images):
    # float32 rows whose image mass is ~0.9999: the other keys are divided by their own mass, not
    # by 1 - m, so rounding in the softmax's sum is not amplified (rescale_image_probs's test).
    torch.manual_seed(2)
    rows = _rows(images, [0] * 4)
    img = torch.stack([r.image for r in rows])[:, None, None, :]
    logits = torch.randn(4, 3, 12, 12, dtype=torch.float64) + 11.0 * img
    probs = torch.softmax(logits, -1).float()
    assert float((probs * img).sum(-1).min()) > 0.999
    settings = {r.index: s for r, s in zip(rows, [("target", 0.0), ("factor", 0.0), ("target", 0.4), ("factor", 0.5)])}
    site = _site(rows, probs.clone())
    sweep = SweepKnockout("decision", None)
    sweep.bind(settings)
    sweep.attention(site)
    torch.testing.assert_close(site.tensor[:, :, 11].sum(-1), torch.ones(4, 3), atol=1e-6, rtol=0)


class _Calls(Intervention):
    """Records each residual call: its rows and the dose each row reads."""

    name = "calls"
    sites = frozenset({"residual"})

    def __init__(self, row_doses: bool):
        super().__init__()
        self.row_doses, self.calls = row_doses, []

    def layers(self, n_layers):
        return (0,)

    def residual(self, site):
        self.calls.append({r.index: site.dose_of(r) for r in site.rows})


@pytest.mark.parametrize("row_doses", [False, True])
def test_a_mix_gives_each_row_its_dose(row_doses):
    iv = _Calls(row_doses)
    doses = [1.0, 2.0, 2.0, 0.5]
    mix = Mix([Unit(0, iv, d) for d in doses])
    rows = _rows([range(2, 7)] * 4, [0] * 4)
    mix.begin(rows, 2)
    run = SimpleNamespace(phase="prefill", decode_step=0, rows=rows, steer=True, dose=1.0, start=0)
    mix.residual(Site(run, "residual", 0, torch.zeros(4, 12, 8)))
    # one call with every row when the intervention reads each row's dose, else one call per dose
    want = [dict(enumerate(doses))] if row_doses else [{0: 1.0}, {1: 2.0, 2: 2.0}, {3: 0.5}]
    assert iv.calls == want


class _Kept:
    """A site that keeps what a step records (and forwards it, with the step, only when ``forward``)."""

    def __init__(self, site, forward: bool):
        self._site, self._forward, self.records = site, forward, {}

    def __getattr__(self, name):
        return getattr(self._site, name)

    def record(self, row, metric, value):
        self.records.setdefault(row.index, {})[metric] = value
        if self._forward:
            self._site.record(row, metric, value)

    def add(self, *args, **kwargs):
        if self._forward:
            self._site.add(*args, **kwargs)


STEP_METRICS = ("scale", "theta_rel", "applied_norm", "dh_predicted")


def _assert_same_step(rec, want, tau, where):
    """One row's barrier step by two routes: the same figures, to their floors or to first order.

    h and h after the step (h + Δh recomputed) are attention masses: each within its float32 floor
    (``noise.mass_floor``; the recorded ``dh_recomputed_floor`` for h after). ‖∇h‖ is not compared on its own:
    it sums terms that largely cancel, and its float32 rounding against float64 reaches ~30× the floor of
    a well-conditioned norm on the embedded model's rows. What depends on it is compared to first order in
    the measured differences δh and δ‖g‖: unclamped, ``scale = (τ − h)/(Σg² + guard)``, so
    ``δscale/scale ≤ |δh|/|τ − h| + 2|δ‖g‖|/‖g‖``; ‖θ*‖ and ‖αθ*‖ follow scale·‖g‖ (‖θ*‖/‖x‖ also
    reads x, an input that differs end to end), Δh predicted
    ``dose·(τ − h)·Σg²/(Σg² + guard)`` (only the guard's share of Σg² feels δ‖g‖); each adds one float32
    rounding, and a factor 2 covers second-order terms.
    """
    assert rec["barrier_active"] == want["barrier_active"], where
    dh = rec["barrier_h"] - want["barrier_h"]
    assert abs(dh) <= noise.mass_floor(torch.float32, want["barrier_h"]), where
    if not want["barrier_active"]:
        return False
    one = noise.floor(torch.float32, 1.0, 4)
    rel_g = abs(rec["grad_norm"] - want["grad_norm"]) / want["grad_norm"]
    rel_step = 2 * (abs(dh) / abs(tau - want["barrier_h"]) + 2 * rel_g + one)
    for metric in ("scale", "theta_norm", "applied_norm"):
        assert rec[metric] == pytest.approx(want[metric], rel=rel_step, abs=0), (*where, metric)
    rel_pred = 2 * (abs(dh) / abs(tau - want["barrier_h"]) + 2 * want["guard_share"] * rel_g + one)
    assert rec["dh_predicted"] == pytest.approx(want["dh_predicted"], rel=rel_pred, abs=0), (*where, "dh_predicted")
    h_after, want_after = (r["barrier_h"] + r["dh_recomputed"] for r in (rec, want))
    assert abs(h_after - want_after) <= want["dh_recomputed_floor"] + abs(want["dh_predicted"]) * rel_step, (
        *where, "h after the step")
    return True


def _margin_tolerance(lm, records, alone):
    """Tolerance of the Yes − No margin between two routes whose steps differ by rounding.

    The final-normed state ``y = γ ⊙ x/r`` has ``‖y‖ ≤ ‖γ‖_∞ · √d`` and ``|m| ≤ ‖w_Yes − w_No‖ · ‖y‖`` (the
    margin's scale S); its floor is ``noise.propagation_floor(float32, S, layers, final_norm=True)``. Each
    step whose applied norm differs by δa moves x at its layer by δa, a relative change ``δa/‖x‖``
    (``‖x‖ = ‖θ*‖/(‖θ*‖/‖x‖)``), carried to y to first order at a relative gain of at most 1 (an RMSNorm
    divides out a change of scale), so the tolerance is twice ``S · (floor/S + Σ δa/‖x‖)``.
    """
    w = lm.unembed_weight()
    gamma = lm.final_norm().weight.detach()
    scale = float((w[lm.tokens.yes_id] - w[lm.tokens.no_id]).norm() * gamma.abs().max()) * math.sqrt(gamma.numel())
    moved = 0.0
    for layer, rec in records.items():
        want = alone.layers[layer].metrics
        if rec["barrier_active"] and want["theta_norm"] > 0:
            moved += abs(rec["applied_norm"] - want["applied_norm"]) * want["theta_rel"] / want["theta_norm"]
    return 2 * (noise.propagation_floor(torch.float32, scale, lm.n_layers, final_norm=True) + scale * moved)


def test_mclcbf_rows_of_different_prompts_and_doses_step_as_each_alone(embedded_model, monkeypatch):
    """Three prompts of different lengths (the group's keys are right-padded) and a question twice at different
    doses, all in one vmapped group per layer.

    Two comparisons, both with :func:`_assert_same_step`'s floors (CONTRIBUTING.md, "Tolerances"): at identical
    inputs, each member of a group against the same step of that row alone; end to end, against
    ``runner.forward`` of each row alone, where a layer's inputs also differ by the rounding of the earlier
    steps (an unclamped scale amplifies a one-step difference of h near τ by 1/|τ − h|), and the margin
    within :func:`_margin_tolerance`.
    """
    lm = embedded_model
    questions = load_pope(shipped.pope_file("adversarial"))[:3]
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in questions]
    prompts = [build_prompt(t) for t in ("Is there a dog in the image?", "Is there a big red dog in the image?",
                                         "dog?")]
    cfg = B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected", "tau=0.99", "clamp=none"])
    tau = cfg.tau_prefill
    plan = [(0, 0.5), (1, 1.0), (2, 3.0), (0, 3.0)]
    groups = []
    step_group = MCLCBF._step_group

    def spy(self, site, members, x_t, *rest):  # the group as run, then each member alone on the same inputs
        kept = _Kept(site, forward=True)
        step_group(self, kept, members, x_t, *rest)
        alone = []
        for j, member in enumerate(members):
            solo = _Kept(site, forward=False)
            step_group(self, solo, [member], x_t[j:j + 1], *rest)
            alone.append(solo.records[member[0].index])
        groups.append([(kept.records[m[0].index], a) for m, a in zip(members, alone)])

    monkeypatch.setattr(MCLCBF, "_step_group", spy)
    iv = MCLCBF(cfg)  # one intervention for every unit, as the population runs use it
    got = run_units(Prefix(lm, prompts, images), [Unit(q, iv, d) for q, d in plan], capture=False)
    monkeypatch.undo()
    assert groups and {len(g) for g in groups} == {len(plan)}  # every steered layer: one call with all four rows

    # 1. at identical inputs: a member of the group is the row's step alone
    compared = sum(_assert_same_step(rec, want, tau, (n, j)) for n, group in enumerate(groups)
                   for j, (rec, want) in enumerate(group))
    assert compared >= 3 * len(plan)

    # 2. end to end, against each row run alone
    lengths = {len(lm.inputs(p, images[q])["input_ids"][0]) for q, p in enumerate(prompts)}
    assert len(lengths) == 3
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    moved, active = [], 0
    for (q, dose), (logits, records) in zip(plan, got):
        alone = forward(lm, lm.inputs(prompts[q], images[q]), MCLCBF(cfg), dose=dose).captures[0].steps[0]
        margin = float(alone.final_logits[yes] - alone.final_logits[no])
        assert float(logits[yes] - logits[no]) == pytest.approx(margin, rel=0, abs=_margin_tolerance(lm, records,
                                                                                                     alone))
        assert records and set(records) == {i for i, c in alone.layers.items() if "barrier_h" in c.metrics}
        for layer, rec in sorted(records.items()):
            active += _assert_same_step(rec, alone.layers[layer].metrics, tau, (q, dose, layer))
        moved.append(records[min(records)]["dh_recomputed"])
    assert active >= 3 * len(plan)  # the barrier fires, so the steps are compared, not skipped
    assert moved[0] != pytest.approx(moved[3], rel=1e-3)  # the doses differ in the batch, not only alone


# ------------------------------------------------------------------ each auxiliary view once per question
# Explain's units prepare each auxiliary view of a question once, not once per unit (``Prefix.views``).
#
# A verdict runs many units of one question under one method: the measuring and the intervened run, the doses of
# the dose-response and of the stronger-contrast search, the knob changes of the counterfactuals. A unit's
# auxiliary view (VCD's noised image, CausalMM's counterfactual features, PAI's image-free prompt, VISTA's steering
# vector's image-free prompt, OPERA's candidates) depends on the question and on the knobs its forward reads
# (``Intervention.view_key``), not on the dose: the units now share it, computed once per question batch from the
# prefix forward. Each test runs the same units twice, by that route and by the separate one (every view key None:
# each batch of units prepares its rows on their own, as before), and checks
#
# * every unit's combined scores: the same tokens ruled out, the others within the logit floor (``tests/floors.py``)
#   times what the combination multiplies the auxiliary logits by (α·dose of a contrast; the aux logits of both
#   routes differ by one floor: two float32 forwards of the same view, a batched matmul's summation order apart);
# * the auxiliary rows the model ran (its top-level forwards outside the units' own traced forwards and the prefix
#   forward): one per unit (two for VISTA's two forwards) by the separate route, one per question and distinct view
#   (or OPERA's candidates per question) by the shared one;
# * that a knob the view reads (VCD's noise step, CausalMM's attention map) gives a view of its own, equal to its
#   separate route: the reuse is keyed on what the view depends on, not on the intervention object.

DOSES = (0.5, 1.0, 2.0)
# name: (the intervention, a knob change its view does not read, one it reads (None: none), the aux logits'
# largest coefficient in the combination at the largest dose, model rows per unit by the separate route and per
# question by the shared one)
METHODS = {
    "vcd": (lambda: VCD(VCDKnobs(beta=1e-3)), {"beta": 0.0}, {"noise_step": 999}, 1.0 * max(DOSES), 1, 1),
    # ε is CausalMM's plausibility cutoff (its cutoff knob, as VCD's β): a combination setting, not the view's
    "causalmm": (lambda: CausalMM(CausalMMKnobs(epsilon=1e-3)), {"epsilon": 0.0}, {"attention": "uniform"},
                 1.0 * max(DOSES), 1, 1),
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
    tol = (1 + coef) * floors.logit_floor(lm)
    for u, (scores, records), (ref, ref_records) in zip(todo, got, want):
        assert_scores_close(scores, ref, tol)
        for metric in ("decoding_model_margin", "decoding_aux_margin"):
            a, b = records.get(-1, {}).get(metric), ref_records.get(-1, {}).get(metric)
            assert (a is None) == (b is None)
            if a is not None and math.isfinite(b):
                assert a == pytest.approx(b, abs=2 * floors.logit_floor(lm))
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
    # the aux logits enter with a coefficient of at most α·k_max (VCD: 1·4; PAI's γ − 1: 0.1·4), the model's own at
    # 1 + that: a margin moves by at most (1 + α·k_max) logit floors, a probability by twice that (prob_floor)
    tol = 2 * (1 + settings.k_max) * floors.logit_floor(lm)
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
