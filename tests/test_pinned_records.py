"""Records of the embedded model pinned, so that refactors of the runner or the seam cannot move them.

The figures below were pinned on the current embedded model (``mclcbf_diag/embedded``: 8 Llama
layers, 576 image tokens, steered layers 3–6 under seed-exp6) from the toolkit as it stood when
that model became the default, on sample 25 of the embedded adversarial split. The records must
not move beyond floating-point noise. After a deliberate change of the model or of a metric,
re-pin them with ``python tests/test_pinned_records.py`` (it prints a new ``PINNED``).

The pinned figures came from another machine, whose summation order differs (CONTRIBUTING.md,
"Tolerances"); each is compared within (:func:`_tolerance`) its own floor, plus the 7 significant
digits it was pinned to, plus, after an unclamped residual step, that step's rounding carried to first
order (:func:`_step_errors`): the scale ``(τ − h)/(Σg² + guard)`` (~1e6 here) multiplies a gradient whose
norm sums terms that largely cancel.
"""

import math

import floors
import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.experiments.trace import trace_sample
from mclcbf_diag.measurements import noise
from mclcbf_diag.measurements.records import NO_LAYER

POPE = shipped.POPE
F32 = torch.float32
# ‖∇h‖ sums terms that largely cancel: its float32 rounding (against float64) reaches ~30× the floor of a
# well-conditioned norm on the embedded model's rows (tests/test_engine_units.py, _assert_same_step)
GRAD_CANCELLATION = 30

PINNED = {
    ("span=detected", "tau=0.99", "clamp=none"): {
        ("baseline", 3, "barrier_h"): 5.600353e-05,
        ("baseline", 5, "barrier_h"): 0.000753701,
        ("baseline", -1, "final_margin"): -2.327303,
        ("steered", 3, "ln1_gain_theta"): 1.098449,
        ("steered", 4, "ln1_gain_theta"): 0.08719053,
        ("steered", 3, "attn_image_mass"): 0.9811808,
        ("steered", 4, "attn_image_mass"): 0.9983141,
        ("steered", 3, "scale"): 971949.4,
        ("steered", 3, "theta_rel"): 12.82074,
        ("steered", 3, "dh_recomputed"): 0.9809764,
        ("steered", 3, "dh_realised"): 0.9811249,
        ("steered", 4, "barrier_h"): 0.7435799,
        ("steered", 4, "theta_rel"): 0.9181393,
        ("steered", 4, "propagation"): 187.7287,
        ("steered", -1, "propagation"): 21.56749,
        ("steered", -1, "final_margin"): -0.7922258,
        ("steered", 3, "rounding_survival"): 1,
    },
    ("span=detected", "site=attn_logits", "tau=0.6"): {
        ("baseline", 5, "barrier_h"): 0.0007537006,
        ("steered", 5, "barrier_h"): 0.0007246549,
        ("steered", 5, "dh_predicted"): 0.5992753,
        ("steered", 5, "dh_realised"): 0.5992752,
        ("steered", -1, "final_margin"): -3.016862,
    },
}


def _config(overrides):
    return B.apply_overrides(B.get_preset("seed-exp6"), list(overrides))


def _records(lm, overrides):
    q = load_pope(shipped.pope_file("adversarial"))[25]
    r = trace_sample(lm, q, load_image(resolve_image(q, shipped.IMAGES)), _config(overrides)).records
    return r[(r["head"] == -1) & (r.phase == "prefill")]


def _value(r, condition, layer, metric) -> float | None:
    got = r[(r.condition == condition) & (r.layer == layer) & (r.metric == metric)].value
    return float(got.iloc[0]) if len(got) == 1 else None


def _pinned_rounding(value: float) -> float:
    """Half a unit of the 7th significant digit: the re-pin prints ``%.7g``."""
    return 0.0 if value == 0 else 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 6)


def _step_errors(r, pinned, tau) -> dict[int, float]:
    """ρ_k: the measured relative difference of each unclamped residual step's size from the pinning machine's.

    ‖αθ*‖/‖x‖ (``theta_rel``, pinned at every such step) is the amplifying figure. Its first-order bound from the
    recorded floors: the scale ``(τ − h)/(Σg² + guard)`` times ``g`` moves by ``|δh|/|τ − h| + 3·|δ‖g‖|/‖g‖``
    (twice through Σg², once through g), with δh the floor of h and δ‖g‖ the recorded ``grad_norm_floor``
    times :data:`GRAD_CANCELLATION`; a later step also carries the earlier steps' ρ (twice, to first order).
    """
    rho: dict[int, float] = {}
    steered = r[(r.condition == "steered") & (r.metric == "barrier_active")]
    for k in sorted(int(layer) for layer, v in zip(steered.layer, steered.value) if v == 1):
        got = _value(r, "steered", k, "theta_rel")
        if got is None:
            continue  # not a residual step (the attention-logit site): no ∇h to amplify
        assert ("steered", k, "theta_rel") in pinned, f"pin theta_rel at every residual step (layer {k})"
        want = pinned[("steered", k, "theta_rel")]
        measured = max(abs(got - want) - _pinned_rounding(want), 0.0) / abs(want)
        h, g, g_floor = (_value(r, "steered", k, m) for m in ("barrier_h", "grad_norm", "grad_norm_floor"))
        bound = (2 * sum(rho.values()) + noise.mass_floor(F32, h) / abs(tau - h)
                 + 3 * GRAD_CANCELLATION * g_floor / g)
        assert measured <= bound, (k, "theta_rel", measured, bound)
        rho[k] = measured
    return rho


def _tolerance(lm, r, rho, condition, layer, metric, got, value) -> float:
    """The figure's floor + the pinned rounding + (steered) the steps' ρ carried to first order.

    The floor: the recorded ``<metric>_floor`` row (Δh, propagation); ``noise.mass_floor`` for an attention mass;
    ``floors.margin_floor`` for the margin; else (a gain, a step's size) ``noise.floor`` of the figure over the
    4·d terms of its norms' reductions. A step off by ρ moves what it changed by ρ times the change, to first
    order: ``2·Σρ·|steered − baseline|`` over the steps up to the figure's layer (every step for the final
    figures; the baseline 0 where it has no such figure), the factor 2 for second-order terms.
    """
    floor = _value(r, condition, layer, f"{metric}_floor")
    if floor is None:
        if metric in ("barrier_h", "attn_image_mass"):
            floor = noise.mass_floor(F32, got, value)
        elif metric == "final_margin":
            floor = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
        else:
            floor = noise.floor(F32, value, 4 * lm.text_config.hidden_size)
    tol = floor + _pinned_rounding(value)
    if condition == "steered":
        carried = sum(p for k, p in rho.items() if layer == NO_LAYER or k <= layer)
        base = _value(r, "baseline", layer, metric)
        tol += 2 * carried * abs(got - (base if base is not None and math.isfinite(base) else 0.0))
    return tol


@pytest.mark.parametrize("overrides", sorted(PINNED))
def test_records_equal_the_pinned_ones(embedded_model, overrides):
    r = _records(embedded_model, overrides)
    rho = _step_errors(r, PINNED[overrides], _config(overrides).tau_prefill)
    for (condition, layer, metric), value in PINNED[overrides].items():
        got = r[(r.condition == condition) & (r.layer == layer) & (r.metric == metric)].value
        assert len(got) == 1, (condition, layer, metric)
        got = float(got.iloc[0])
        tol = _tolerance(embedded_model, r, rho, condition, layer, metric, got, value)
        assert got == pytest.approx(value, rel=0, abs=tol), (condition, layer, metric)


if __name__ == "__main__":  # re-pin: print PINNED's keys with the current model's values
    from mclcbf_diag.models import load_model

    lm = load_model()
    print("PINNED = {")
    for overrides, pinned in PINNED.items():
        r = _records(lm, overrides)
        print(f"    {overrides!r}: {{")
        for condition, layer, metric in pinned:
            value = r[(r.condition == condition) & (r.layer == layer) & (r.metric == metric)].value
            print(f"        ({condition!r}, {layer}, {metric!r}): {float(value.iloc[0]):.7g},")
        print("    },")
    print("}")
