"""diagnosis/counterfactual.py: a cause test's run, its identity, its variant of the intervention, and the joint
run of several causes (hand-worked cases)."""

import pytest

from mclcbf_diag.diagnosis.counterfactual import Counterfactual, joint


def test_joint_counterfactuals():
    C = Counterfactual
    a, b = C(why="a", knobs={"clamp": "none"}), C(why="b", knobs={"guard": 1e-9}, dose=2.0)
    assert joint([a, b]) == C(why="a and b", knobs={"clamp": "none", "guard": 1e-9}, dose=2.0)
    assert joint([a, C(why="c", knobs={"clamp": "scale"})]) is None  # one knob, two values
    assert joint([a, C(why="d", untestable="no")]) is None
    assert joint([a, C(why="g", dtype="float32")]) is None
    assert joint([a, None]) is None
    # one search: each of its settings carries the others' changes; two searches do not combine
    search = C(why="e", search=(C(why="e1", knobs={"tau_prefill": 0.5}), C(why="e2", knobs={"tau_prefill": 0.9})))
    settings = (C(why="e1 and a", knobs={"tau_prefill": 0.5, "clamp": "none"}),
                C(why="e2 and a", knobs={"tau_prefill": 0.9, "clamp": "none"}))
    assert joint([search, a]) == C(why="e and a", search=settings)
    assert joint([search, search]) is None
    assert joint([search, C(why="h", knobs={"tau_prefill": 0.2})]) is None  # τ set twice
    fn = joint([C(why="f", knobs_of=lambda k: {"tau_prefill": k["t"]}), a])
    assert fn.knobs_of({"t": 0.3}) == {"tau_prefill": 0.3} and fn.knobs == {"clamp": "none"}


def test_a_counterfactual_names_its_run():
    """The key tells runs apart (testers run each once), and the variant is what the run changes."""
    from mclcbf_diag.interventions import MCLCBF

    C = Counterfactual
    assert C(why="a", knobs={"clamp": "none"}).key == C(why="a", knobs={"clamp": "none"}).key
    assert C(why="a", knobs={"clamp": "none"}).key != C(why="a", knobs={"clamp": "scale"}).key
    assert C(why="a", dose=2.0).key != C(why="a", dose=4.0).key != C(why="a", dose=4.0, goal_only=True).key
    # hashable although its knobs are a dict: a set of runs holds each once
    assert len({C(why="a", knobs={"clamp": "none"}), C(why="a", knobs={"clamp": "none"}), C(why="b")}) == 2
    iv = MCLCBF.from_preset("seed-exp6")
    variant, dose = C(why="x", knobs={"clamp": "none"}, dose=3.0).variant(iv)
    assert variant.knobs.clamp == "none" and dose == 3.0 and iv.knobs.clamp != "none"
    both, _ = C(why="y", knobs_of=lambda k: {"tau_prefill": k.tau_decode}, knobs={"clamp": "none"}).variant(iv)
    assert both.knobs.tau_prefill == iv.knobs.tau_decode and both.knobs.clamp == "none"
    assert C(why="z").variant(iv) == (iv, 1.0)
    with pytest.raises(ValueError):
        C(why="w", dtype="float32").variant(iv)
    wide = C(why="v", dtype="float32", goal_only=True, dose=2.0)
    assert wide.in_model_dtype() == C(why="v", dose=2.0) and wide.runs() == [wide]
