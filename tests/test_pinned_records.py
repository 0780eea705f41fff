"""Records of the embedded model pinned from before the intervention seam existed.

The figures below were produced by the toolkit's first version (one MC-LCBF-specific runner)
on sample 25 of the embedded adversarial split. The seam moved every line of that code; the
records must not move beyond floating-point noise.
"""


import pytest

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.trace import trace_sample

POPE = shipped.POPE

PINNED = {
    ("span=detected", "tau=0.99", "clamp=none"): {
        ("baseline", 1, "barrier_h"): 0.211263, ("baseline", 3, "barrier_h"): 0.000240,
        ("baseline", -1, "final_margin"): 0.820850,
        ("steered", 1, "ln1_gain_theta"): 2.366390, ("steered", 3, "ln1_gain_theta"): 0.426964,
        ("steered", 1, "attn_image_mass"): 0.758250, ("steered", 3, "attn_image_mass"): 0.867153,
        ("steered", 1, "scale"): 720.734680, ("steered", 1, "theta_rel"): 4.950300,
        ("steered", 1, "dh_recomputed"): 0.580057, ("steered", 1, "dh_realised"): 0.546987,
        ("steered", 3, "barrier_h"): 0.522119, ("steered", 3, "theta_rel"): 0.176363,
        ("steered", 3, "propagation"): 31.347315, ("steered", -1, "propagation"): 18.871208,
        ("steered", -1, "final_margin"): -1.733853, ("steered", 1, "rounding_survival"): 1.0,
    },
    ("span=detected", "site=attn_logits", "tau=0.6"): {
        ("baseline", 2, "barrier_h"): 0.000706, ("steered", 2, "barrier_h"): 0.001078,
        ("steered", 2, "dh_predicted"): 0.598922, ("steered", 2, "dh_realised"): 0.598922,
        ("steered", -1, "final_margin"): -0.720111,
    },
}


@pytest.mark.parametrize("overrides", sorted(PINNED))
def test_records_equal_the_first_version(embedded_model, overrides):
    q = load_pope(shipped.pope_file("adversarial"))[25]
    cfg = B.apply_overrides(B.get_preset("seed-exp6"), list(overrides))
    r = trace_sample(embedded_model, q, load_image(resolve_image(q, shipped.IMAGES)), cfg).records
    r = r[(r["head"] == -1) & (r.phase == "prefill")]
    for (condition, layer, metric), value in PINNED[overrides].items():
        got = r[(r.condition == condition) & (r.layer == layer) & (r.metric == metric)].value
        assert len(got) == 1, (condition, layer, metric)
        assert float(got.iloc[0]) == pytest.approx(value, rel=1e-4, abs=2e-6), (condition, layer, metric)
