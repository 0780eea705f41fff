"""Records of the embedded model pinned, so that refactors of the runner or the seam cannot move them.

The figures below were pinned on the current embedded model (``mclcbf_diag/embedded``: 8 Llama
layers, 576 image tokens, steered layers 3–6 under seed-exp6) from the toolkit as it stood when
that model became the default, on sample 25 of the embedded adversarial split. The records must
not move beyond floating-point noise. After a deliberate change of the model or of a metric,
re-pin them with ``python tests/test_pinned_records.py`` (it prints a new ``PINNED``).
"""


import pytest

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.trace import trace_sample

POPE = shipped.POPE

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


def _records(lm, overrides):
    q = load_pope(shipped.pope_file("adversarial"))[25]
    cfg = B.apply_overrides(B.get_preset("seed-exp6"), list(overrides))
    r = trace_sample(lm, q, load_image(resolve_image(q, shipped.IMAGES)), cfg).records
    return r[(r["head"] == -1) & (r.phase == "prefill")]


@pytest.mark.parametrize("overrides", sorted(PINNED))
def test_records_equal_the_pinned_ones(embedded_model, overrides):
    r = _records(embedded_model, overrides)
    for (condition, layer, metric), value in PINNED[overrides].items():
        got = r[(r.condition == condition) & (r.layer == layer) & (r.metric == metric)].value
        assert len(got) == 1, (condition, layer, metric)
        assert float(got.iloc[0]) == pytest.approx(value, rel=1e-4, abs=2e-6), (condition, layer, metric)


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
