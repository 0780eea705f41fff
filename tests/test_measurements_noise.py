"""Noise floors (mclcbf_diag.measurements.noise): hand-worked values, real rounding under them, one verdict per case.

The floors are checked by hand against the formula of the module's docstring, then against
rounding errors measured with plain PyTorch (a softmax mass in bfloat16/float32 against float64,
a residual rounded to bfloat16). The same planted case on a tiny random model, loaded in float32
and in bfloat16, must give the same detected causes; a real bfloat16 effect (a step rounded
away) must still show.
"""

import math

import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag.diagnosis.diagnose import diagnose
from mclcbf_diag.embedded.build import QUESTION
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.interventions import MCLCBF
from mclcbf_diag.measurements import noise
from mclcbf_diag.models import load_model

BF16, F32 = 2.0 ** -7, 2.0 ** -23


def test_machine_epsilons():
    assert noise.eps(torch.bfloat16) == BF16 and noise.eps(torch.float32) == F32
    assert noise.eps(torch.float16) == 2.0 ** -10
    assert noise.measure_dtype(torch.bfloat16) == noise.measure_dtype(torch.float16) == torch.float32
    assert noise.measure_dtype(torch.float64) == torch.float64


def test_floors_by_hand():
    # eps · s · √n
    assert noise.floor(torch.bfloat16, 64.0, 4) == BF16 * 64 * 2
    assert noise.floor(torch.float32, -3.0) == F32 * 3  # the scale's sign does not matter; n = 1
    # a mass: s = √m (logit error √(m(1 − m)) and summation error m in quadrature), the larger of
    # the two masses, n = 16
    assert noise.mass_floor(torch.bfloat16, 0.5) == pytest.approx(BF16 * math.sqrt(0.5) * 4)  # ≈ 0.0221
    assert noise.mass_floor(torch.bfloat16, 0.25, 0.5) == noise.mass_floor(torch.bfloat16, 0.5)
    assert noise.mass_floor(torch.float32, 0.99) == pytest.approx(F32 * math.sqrt(0.99) * 4)  # ≈ 4.7e-7
    assert noise.mass_floor(torch.float32, 0.99) > 2 ** -24 * 4  # above four steps of a float32 near 0.99
    assert noise.mass_floor(torch.float32, 0.0) == 0.0  # nothing on the image: exact
    assert math.isnan(noise.mass_floor(torch.float32, math.nan))
    # propagation: n = 4 per layer since the first changed one, +1 after the final norm
    assert noise.propagation_floor(torch.bfloat16, 64.0, 1) == pytest.approx(1.0)
    assert noise.propagation_floor(torch.bfloat16, 64.0, 1, final_norm=True) == pytest.approx(BF16 * 64 * math.sqrt(5))
    assert noise.propagation_floor(torch.float32, 10.0, 3) == pytest.approx(F32 * 10 * math.sqrt(12))
    assert noise.grad_norm_floor(torch.bfloat16, 0.5) == pytest.approx(BF16 * 0.5 * 4)


def test_below_resolved_and_show():
    assert noise.below(1e-4, 1e-3) and not noise.below(-2e-3, 1e-3) and not noise.below(1e-3, 1e-3)
    assert not noise.below(1e-9, None) and not noise.below(1e-9, math.nan) and not noise.below(None, 1.0)
    assert noise.resolved(5e-4, 1e-3) == 0.0 and noise.resolved(0.5, 1e-3) == 0.5
    assert noise.show(5e-4, 1e-3) == "below noise" and noise.show(0.0123, 1e-3) == "0.0123"
    assert noise.show(0.0123, 1e-3, ".2f") == "0.01" and noise.show(math.nan, 1.0) == "n/a"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pull", [0.0, 0.5])  # masses 0.57-0.77; with keys pulled towards the queries, 0.98-1
def test_a_softmax_mass_rounds_within_its_floor(dtype, pull):
    """Image mass of softmax rows computed as eager attention does (logits in dtype) vs float64."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(300, 32, generator=gen, dtype=torch.float64)
    image = torch.zeros(300, dtype=torch.bool)
    image[5:200] = True
    if pull:
        image[1:] = True
        k[1:] += pull * q.mean(0)
    exact = torch.softmax(q @ k.T / math.sqrt(32), -1)[:, image].sum(-1)
    logits = (q.to(dtype) @ k.to(dtype).T) * (32 ** -0.5)
    rounded = torch.softmax(logits, -1, dtype=torch.float32).to(dtype).float()[:, image].sum(-1).double()
    err = (rounded - exact).abs()
    floors = torch.tensor([noise.mass_floor(dtype, float(m)) for m in exact], dtype=torch.float64)
    assert bool((err < floors).all()), float((err / floors).max())
    assert float((err / floors).max()) > 0.01  # the floor is of the size of the noise, not far above it
    if pull and dtype == torch.float32:  # near m = 1 the summation's rounding dominates: a logit-only
        assert float(exact.min()) > 0.98  # scale √(m(1 − m)) would sit far under the error measured here
        logit_only = torch.tensor([noise.floor(dtype, math.sqrt(m * (1 - m)), 16) for m in exact.tolist()])
        assert float((err / logit_only).max()) > 5


def test_a_residual_rounded_to_bfloat16_moves_within_its_floor():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4096, generator=gen) * 3
    step = torch.randn(16, 4096, generator=gen) * 1e-4  # mostly rounded away: what remains is rounding
    moved = ((x + step).to(torch.bfloat16).float() - x.to(torch.bfloat16).float()).norm(dim=-1)
    floors = torch.tensor([noise.propagation_floor(torch.bfloat16, float(n), 1) for n in x.norm(dim=-1)])
    assert bool((moved < floors).all()) and bool((moved > 0).all())


# ------------------------------------------------------------------ one planted case, two dtypes
@pytest.fixture(scope="module")
def both(saved_tiny_dir):
    return {dt: load_model(str(saved_tiny_dir), dtype=dt) for dt in ("float32", "bfloat16")}


def _trace(lm, overrides):
    iv = MCLCBF(B.apply_overrides(B.get_preset("seed-exp6"), list(overrides)))
    return trace_sample(lm, QUESTION.format(name="dog"), sample_scene(0, 0).image(), iv)


def _fired(result, metric):
    r = result.records
    s = r[(r.condition == "steered") & (r["head"] == -1) & (r.phase == "prefill") & (r.layer >= 0)]
    wide = s.pivot_table(index="layer", columns="metric", values="value")
    return wide[wide["barrier_active"] > 0][metric] if metric in wide else None


@pytest.mark.parametrize("overrides", [("span=detected", "tau=0.99"),  # the clamp binds; Δh ≈ 1e-3
                                       ("span=detected", "tau=0.99", "clamp=none")])  # a step far past linear
def test_the_same_case_gets_the_same_verdict_in_float32_and_bfloat16(both, overrides, capsys):
    results = {dt: _trace(lm, overrides) for dt, lm in both.items()}
    verdicts = {dt: sorted(c.id for c in diagnose(r.records) if c.detected) for dt, r in results.items()}
    assert verdicts["float32"] == verdicts["bfloat16"] and verdicts["float32"]
    # h is summed in float32 in both runs: Δh recomputed agrees (a bfloat16 h would read 0 here)
    rec32, rec16 = _fired(results["float32"], "dh_recomputed"), _fired(results["bfloat16"], "dh_recomputed")
    assert len(rec32) and (rec16 != 0).all()
    assert rec16.to_numpy() == pytest.approx(rec32.to_numpy(), rel=0.05)
    # the model's own bfloat16 attention: Δh realised is either below its floor or close to float32's
    real16, floor16 = _fired(results["bfloat16"], "dh_realised"), _fired(results["bfloat16"], "dh_realised_floor")
    real32 = _fired(results["float32"], "dh_realised")
    for ly in real16.index:
        assert abs(real16[ly]) < floor16[ly] or real16[ly] == pytest.approx(real32[ly], abs=floor16[ly])
    # the float32 floors are far below the float32 figures (h ≈ 0.97 here: a floor of ~8 float32 steps
    # there, against a Δh of ≥ 2e-5, ~340 steps)
    assert (_fired(results["float32"], "dh_recomputed_floor") < rec32.abs() / 20).all()
    if "clamp=none" not in overrides:
        from mclcbf_diag.cli.trace import print_outcome_summary

        print_outcome_summary(results["bfloat16"].summary(), results["bfloat16"].intervention)
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("Δh"))
        assert "realised below noise" in line and "recomputed below noise" not in line


def test_a_real_bfloat16_effect_still_shows(both):
    """α = 0.01: the step is ~1e-4 of ‖x‖, which bfloat16 rounds away; float32 keeps it.

    τ = 0.99: with 576 image tokens the random model already puts h ≈ 0.97 on the image, so
    τ = 0.9 would leave the barrier inactive (no step at all, nothing to round).
    """
    overrides = ("span=detected", "tau=0.99", "alpha=0.01")
    verdicts = {dt: {c.id for c in diagnose(_trace(lm, overrides).records) if c.detected} for dt, lm in both.items()}
    assert verdicts["bfloat16"] - verdicts["float32"] == {"rounding_absorbed"}
    assert verdicts["float32"] <= verdicts["bfloat16"]
