"""SweepKnockout (the graded sweep's batched edit) against GradedKnockout's per-row edit; Mix's dispatch of
doses; MC-LCBF's rows of different prompts and doses in one vmapped group against runs of each alone."""

from types import SimpleNamespace

import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.experiments import GradedKnockout
from mclcbf_diag.interventions import MCLCBF
from mclcbf_diag.interventions.base import Intervention, Row, Site
from mclcbf_diag.population.units import Mix, Prefix, SweepKnockout, Unit, _runs, run_units
from mclcbf_diag.runner import run


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
    assert torch.allclose(got, want, atol=1e-6)
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


def test_mclcbf_rows_of_different_prompts_and_doses_step_as_each_alone(embedded_model, monkeypatch):
    # three prompts of different lengths (the group's keys are right-padded) and a question twice
    # at different doses, all in one vmapped group per layer, against runner.run of each alone (the
    # unclamped steps are large, so the batch's summation order grows to ~1e-4 by the last layer)
    lm = embedded_model
    questions = load_pope(shipped.pope_file("adversarial"))[:3]
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in questions]
    prompts = [build_prompt(t) for t in ("Is there a dog in the image?", "Is there a big red dog in the image?",
                                         "dog?")]
    cfg = B.apply_overrides(B.get_preset("seed-exp6"), ["span=detected", "tau=0.99", "clamp=none"])
    plan = [(0, 0.5), (1, 1.0), (2, 3.0), (0, 3.0)]
    sizes = []
    step_group = MCLCBF._step_group
    monkeypatch.setattr(MCLCBF, "_step_group", lambda self, site, members, *a: (
        sizes.append(len(members)), step_group(self, site, members, *a))[1])
    iv = MCLCBF(cfg)  # one intervention for every unit, as the population runs use it
    got = run_units(Prefix(lm, prompts, images), [Unit(q, iv, d) for q, d in plan], capture=False)
    assert sizes and set(sizes) == {len(plan)}  # every steered layer: one call with all four rows
    monkeypatch.undo()
    lengths = {len(lm.inputs(p, images[q])["input_ids"][0]) for q, p in enumerate(prompts)}
    assert len(lengths) == 3
    yes, no = lm.tokens.yes_id, lm.tokens.no_id
    moved, active = [], 0
    for (q, dose), (logits, records) in zip(plan, got):
        alone = run(lm, lm.inputs(prompts[q], images[q]), MCLCBF(cfg), dose=dose).steps[0]
        assert float(logits[yes] - logits[no]) == pytest.approx(
            float(alone.final_logits[yes] - alone.final_logits[no]), abs=1e-4)
        assert records and set(records) == {i for i, c in alone.layers.items() if "barrier_h" in c.metrics}
        for layer, rec in records.items():
            want = alone.layers[layer].metrics
            assert rec["barrier_active"] == want["barrier_active"]
            if not rec["barrier_active"]:
                continue
            active += 1
            for metric in ("barrier_h", "scale", "theta_rel", "applied_norm", "dh_predicted", "dh_recomputed"):
                assert rec[metric] == pytest.approx(want[metric], rel=1e-3, abs=1e-7), (q, dose, layer, metric)
        moved.append(records[min(records)]["dh_recomputed"])
    assert active >= 3 * len(plan)  # the barrier fires, so the steps are compared, not skipped
    assert moved[0] != pytest.approx(moved[3], rel=1e-3)  # the doses differ in the batch, not only alone
