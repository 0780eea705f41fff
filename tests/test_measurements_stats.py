"""mclcbf_diag.measurements.stats: paired tests and the bias control, against scipy and a slow pure-Python reference.

Pure: no model. The references are written here independently of the module: the exact
binomial test of scipy, a bootstrap that loops over resamples and questions in Python, and
hand-worked Holm and offset cases.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from mclcbf_diag.measurements import stats


# --------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (0, 1), (3, 3), (5, 1), (1, 9), (12, 30), (40, 41), (300, 250),
                                 (0, 25), (677, 640)])
def test_mcnemar_equals_scipy_exact_binomial(b, c):
    want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    # exact integers against scipy's float pmf sums: agreement to a few ulps of 1
    assert stats.mcnemar_exact(b, c) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_mcnemar_hand_worked():
    # b = 5, c = 0: 2 · (1/2)^5 = 1/16
    assert stats.mcnemar_exact(5, 0) == 2 / 32
    # b = 1, c = 4: 2 · (1 + 5) / 32 = 12/32
    assert stats.mcnemar_exact(1, 4) == 12 / 32
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 2)


# --------------------------------------------------------------------------- Holm
def test_holm_hand_worked():
    # sorted: 0.005×4 = 0.02; 0.01×3 = 0.03; 0.03×2 = 0.06; 0.04×1 = 0.04 → max(0.06, 0.04) = 0.06
    got = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    # capped at 1; NaN (no test) stays NaN and does not count in m (m = 2 here)
    assert stats.holm([0.6, math.nan, 0.2]) == pytest.approx([0.6, math.nan, 0.4], nan_ok=True)
    assert stats.holm([0.7, 0.9]) == [1.0, 1.0]
    assert stats.holm([]) == []


# --------------------------------------------------------------------------- the bias offset
def test_bias_offset_hand_worked_with_ties():
    m = [3.0, 1.0, 1.0, -2.0]
    # sorted 3, 1, 1, −2, padded 4 … −3: b = −(m(K) + m(K+1))/2
    assert stats.bias_offset(m, None, 0) == -3.5
    assert stats.bias_offset(m, None, 1) == -2.0
    # K = 2 falls inside the tie 1, 1: reachable 1 and 3 are equally near, the smaller wins
    assert stats.bias_offset(m, None, 2) == -2.0
    assert stats.bias_offset(m, None, 3) == 0.5
    assert stats.bias_offset(m, None, 4) == 2.5
    assert stats.bias_offset(m, None, 9) == 2.5  # beyond the usable rows: all yes
    for k, want_yes in [(0, 0), (1, 1), (2, 1), (3, 3), (4, 4)]:
        ctrl = stats.control_answers(m, None, stats.bias_offset(m, None, k))
        assert int(ctrl.yes.sum()) == want_yes and int(ctrl.no.sum()) == 4 - want_yes


def test_bias_control_tie_rule_and_invalid_rows():
    # yes iff margin + b > 0: a margin of exactly −b answers no
    ctrl = stats.control_answers([1.0, -1.0], None, 1.0)
    assert ctrl.yes.tolist() == [True, False] and ctrl.no.tolist() == [False, True]
    # invalid or non-finite baseline rows take no part: neither yes nor no, whatever the offset
    margins, valid = [3.0, math.nan, 5.0, -1.0], [True, True, False, True]
    assert stats.bias_offset(margins, valid, 1) == -1.0  # usable 3, −1: midpoint
    ctrl = stats.control_answers(margins, valid, 100.0)
    assert ctrl.yes.tolist() == [True, False, False, True] and ctrl.no.tolist() == [False] * 4
    assert math.isnan(stats.bias_offset([math.nan], None, 1))


def test_best_offset_equals_a_brute_force_scan():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(1, 25))
        labels = np.where(rng.random(n) < 0.5, "yes", "no")
        margins = np.round(rng.normal(0, 2, n), 1)  # rounded: ties
        valid = rng.random(n) < 0.9
        b, acc = stats.best_offset(labels, margins, valid)
        usable = [m for m, v in zip(margins, valid) if v]
        if not usable:
            assert math.isnan(b) and math.isnan(acc)
            continue
        # brute force: every threshold on a fine grid; invalid rows wrong
        grid = np.arange(-(max(usable) + 2), -(min(usable) - 2), 0.01)
        best = max(sum(v and (("yes" if m + g > 0 else "no") == lab) for m, v, lab in zip(margins, valid, labels))
                   for g in grid)
        assert acc == best / n
        right = sum(v and (("yes" if m + b > 0 else "no") == lab) for m, v, lab in zip(margins, valid, labels))
        assert right == best


# --------------------------------------------------------------------------- the bootstrap: slow reference
def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, by hand."""
    v = sorted(values)
    pos = q / 100 * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _ref_scores(labels, answers, valid):
    """accuracy, F1, yes-ratio with an invalid answer neither yes nor no (wrong; a negative prediction)."""
    n = len(labels)
    tp = sum(1 for lab, a, v in zip(labels, answers, valid) if v and a == "yes" and lab == "yes")
    n_yes = sum(1 for a, v in zip(answers, valid) if v and a == "yes")
    pos = sum(1 for lab in labels if lab == "yes")
    right = sum(1 for lab, a, v in zip(labels, answers, valid) if v and a == lab)
    return right / n, (2 * tp / (n_yes + pos) if n_yes + pos else 0.0), n_yes / n


def _reference(labels, ba, bv, bm, na, nv, resamples, seed, offset):
    """The paired bootstrap one resample and one question at a time (same seed → same resamples)."""
    n = len(labels)
    ca = ["yes" if (m + offset > 0) else "no" for m in bm]
    cv = [v and math.isfinite(m) for v, m in zip(bv, bm)]
    rng = np.random.default_rng(seed)
    d_acc, d_f1, d_yes, gain = [], [], [], []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n).tolist()
        lab = [labels[i] for i in idx]
        b = _ref_scores(lab, [ba[i] for i in idx], [bv[i] for i in idx])
        s = _ref_scores(lab, [na[i] for i in idx], [nv[i] for i in idx])
        c = _ref_scores(lab, [ca[i] for i in idx], [cv[i] for i in idx])
        d_acc.append(s[0] - b[0])
        d_f1.append(s[1] - b[1])
        d_yes.append(s[2] - b[2])
        gain.append(s[0] - c[0])
    return {name: (_percentile(v, 2.5), _percentile(v, 97.5))
            for name, v in (("d_accuracy", d_acc), ("d_f1", d_f1), ("d_yes_ratio", d_yes),
                            ("gain_over_control", gain))}


def _planted(rng, n):
    labels = list(np.where(rng.random(n) < 0.5, "yes", "no"))
    bm = list(np.round(rng.normal(0, 2, n) + np.where(np.array(labels) == "yes", 1.0, -1.0), 2))
    ba = ["yes" if m > 0 else "no" for m in bm]
    bv = list(rng.random(n) < 0.95)
    nm = [m + float(rng.normal(0.3, 1.0)) for m in bm]
    na = ["yes" if m > 0 else "no" for m in nm]
    nv = list(rng.random(n) < 0.85)  # derailed answers
    return labels, ba, bv, bm, na, nv


@pytest.mark.parametrize("seed,n", [(0, 12), (1, 31), (7, 50)])
def test_bootstrap_intervals_equal_a_slow_reference(seed, n):
    labels, ba, bv, bm, na, nv = _planted(np.random.default_rng(100 + seed), n)
    got = stats.paired(labels, ba, bv, bm, na, nv, resamples=300, seed=seed)
    want = _reference(labels, ba, bv, bm, na, nv, 300, seed, got["bias_offset"])
    for name, (lo, hi) in want.items():
        # the same resamples, summed in another order: float64 sums of ≤ 50 terms of size ≤ 1
        assert got[f"{name}_lo"] == pytest.approx(lo, rel=0, abs=1e-12), name
        assert got[f"{name}_hi"] == pytest.approx(hi, rel=0, abs=1e-12), name
    b0, s0 = _ref_scores(labels, ba, bv), _ref_scores(labels, na, nv)
    assert got["d_accuracy"] == pytest.approx(s0[0] - b0[0], abs=1e-15)
    assert got["d_f1"] == pytest.approx(s0[1] - b0[1], abs=1e-15)
    assert got["d_yes_ratio"] == pytest.approx(s0[2] - b0[2], abs=1e-15)
    # McNemar's b and c, with derailed answers wrong
    rb = [v and a == lab for lab, a, v in zip(labels, ba, bv)]
    rn = [v and a == lab for lab, a, v in zip(labels, na, nv)]
    b = sum(not x and y for x, y in zip(rb, rn))
    c = sum(x and not y for x, y in zip(rb, rn))
    assert (got["fixed_valid"], got["broken_valid"]) == (b, c)
    assert got["mcnemar_p"] == pytest.approx(binomtest(b, b + c).pvalue if b + c else 1.0, rel=1e-12)
    # the control answers yes as often as the intervention (or the nearest count ties allow)
    assert got["control_yes_ratio"] == pytest.approx(s0[2], abs=1.5 / n)


def test_bootstrap_blocks_draw_the_resamples_in_order():
    n = 9
    blocks = np.concatenate(list(stats.resample_blocks(n, 1234, seed=3, block=500)))
    rng = np.random.default_rng(3)
    assert blocks.shape == (1234, n)
    assert (blocks == np.stack([rng.integers(0, n, size=n) for _ in range(1234)])).all()
    # the sums: each resample's multiplicities times the columns
    cols = np.arange(2 * n, dtype=float).reshape(n, 2)
    sums = stats.bootstrap_sums(cols, 1234, seed=3)
    assert np.array_equal(sums, cols[blocks].sum(axis=1))


def test_the_same_seed_gives_the_same_record_and_another_seed_another():
    args = _planted(np.random.default_rng(3), 80)
    a, b = stats.paired(*args, resamples=500, seed=11), stats.paired(*args, resamples=500, seed=11)
    assert a == b or all(a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
                         for k in a)
    c = stats.paired(*args, resamples=500, seed=12)
    assert (c["d_accuracy_lo"], c["d_accuracy_hi"]) != (a["d_accuracy_lo"], a["d_accuracy_hi"])
    assert c["d_accuracy"] == a["d_accuracy"]
    assert list(stats.COLUMNS) == list(a)


# --------------------------------------------------------------------------- planted cases
def _world(rng, n=600):
    labels = np.where(rng.random(n) < 0.5, "yes", "no")
    margins = rng.normal(0, 1.5, n) + np.where(labels == "yes", 1.2, -1.2)
    return labels, margins


def test_a_pure_yes_shift_is_matched_by_its_control_and_labelled_so():
    labels, m = _world(np.random.default_rng(0))
    shifted = m + 0.9  # the intervention only moves every margin toward Yes
    base = np.where(m > 0, "yes", "no")
    new = np.where(shifted > 0, "yes", "no")
    r = stats.paired(labels, base, None, m, new, None, resamples=2000)
    assert r["fixed_valid"] > 0 and r["broken_valid"] > 0 and r["d_yes_ratio_lo"] > 0  # it does change answers
    ctrl = stats.control_answers(m, None, r["bias_offset"])
    assert (ctrl.yes == (new == "yes")).all()  # the control gives exactly its answers
    assert r["control_accuracy"] == pytest.approx(np.mean(new == labels)) and r["gain_over_control"] == 0
    assert (r["gain_over_control_lo"], r["gain_over_control_hi"]) == (0, 0)
    assert r["control_shares_fixes"] == 1.0
    assert r["bias_label"] == stats.EXPLAINED and r["explained_by_yes_shift"]
    assert r["control_mcnemar_p"] == 1.0


def test_a_planted_real_improvement_is_significant_and_beyond_a_yes_shift():
    rng = np.random.default_rng(1)
    labels, m = _world(rng)
    base = np.where(m > 0, "yes", "no")
    wrong = np.flatnonzero(base != labels)
    fixed = rng.choice(wrong, size=len(wrong) * 2 // 3, replace=False)  # an oracle fixes two thirds of them
    new = base.copy()
    new[fixed] = labels[fixed]
    r = stats.paired(labels, base, None, m, new, None, resamples=2000)
    assert (r["fixed_valid"], r["broken_valid"]) == (len(fixed), 0)
    assert r["mcnemar_p"] == stats.mcnemar_exact(len(fixed), 0) < 1e-6
    assert r["d_accuracy_lo"] > 0 and r["gain_over_control_lo"] > 0
    assert r["bias_label"] == stats.BEYOND and not r["explained_by_yes_shift"]
    assert r["control_shares_fixes"] < 0.5


def test_an_intervention_that_changes_nothing_is_no_change():
    labels, m = _world(np.random.default_rng(2), 50)
    base = np.where(m > 0, "yes", "no")
    r = stats.paired(labels, base, None, m, base, None, resamples=200)
    assert r["bias_label"] == stats.NO_CHANGE and not r["explained_by_yes_shift"]
    assert (r["mcnemar_p"], r["d_accuracy_lo"], r["d_accuracy_hi"]) == (1.0, 0, 0)
    assert math.isnan(r["control_shares_fixes"])


def test_derailed_answers_count_as_wrong_and_never_yes():
    labels = ["yes", "yes", "no", "no"]
    base = ["yes", "no", "no", "yes"]
    # the intervention "answers" yes on every row, but rows 0 and 2 derail (not a Yes/No answer)
    r = stats.paired(labels, base, None, [1.0, -1.0, -2.0, 0.5], ["yes"] * 4, [False, True, False, True],
                     resamples=50)
    # row 0 right → derailed: broken; row 1 wrong → right: fixed; row 2 right → derailed; row 3 wrong → wrong
    assert (r["fixed_valid"], r["broken_valid"]) == (1, 2)
    assert r["d_accuracy"] == pytest.approx(1 / 4 - 2 / 4)
    assert r["d_yes_ratio"] == 0  # two valid yes before, two after
    # F1: before tp 1, yes 2, pos 2 → 0.5; after tp 1 (row 1), yes 2 → 0.5
    assert r["d_f1"] == 0


def test_planted_label_noise_moves_the_intervals_and_swaps_the_ranks():
    """Two interventions under true and under noisy labels: the one that answers the truth on the relabelled
    questions loses exactly those questions' gain, its interval moves down, and the ranking swaps."""
    rng = np.random.default_rng(4)
    truth, m = _world(rng, 800)
    base = np.where(m > 0, "yes", "no")
    wrong = rng.permutation(np.flatnonzero(base != truth))
    a_fixes, b_fixes = wrong[:40], wrong[40:64]
    a, b = base.copy(), base.copy()
    a[a_fixes], b[b_fixes] = truth[a_fixes], truth[b_fixes]
    noisy = truth.copy()
    noisy[a_fixes] = base[a_fixes]  # the relabelled file agrees with the baseline's wrong answers there
    res = {(name, lab_name): stats.paired(labs, base, None, m, ans, None, resamples=1000)
           for name, ans in (("a", a), ("b", b)) for lab_name, labs in (("truth", truth), ("noisy", noisy))}
    n = len(truth)
    assert res["a", "truth"]["d_accuracy"] == pytest.approx(40 / n)
    assert res["a", "noisy"]["d_accuracy"] == pytest.approx(-40 / n)  # each fix is now a break
    assert res["b", "noisy"]["d_accuracy"] == res["b", "truth"]["d_accuracy"] == pytest.approx(24 / n)
    assert res["a", "truth"]["d_accuracy_lo"] > 0 > res["a", "noisy"]["d_accuracy_hi"]
    # the intervals: paired resamples are the same draws, so a's interval moves by the 80 questions' swing
    assert res["a", "noisy"]["d_accuracy_hi"] < res["a", "truth"]["d_accuracy_lo"]
    rank = lambda lab: sorted("ab", key=lambda k: -res[k, lab]["d_accuracy_lo"])  # noqa: E731
    assert rank("truth") == ["a", "b"] and rank("noisy") == ["b", "a"]


def test_without_usable_margins_there_is_no_control():
    labels = ["yes", "no", "yes", "no"]
    r = stats.paired(labels, ["yes", "yes", "no", "no"], None, [math.nan] * 4, ["yes", "no", "yes", "no"], None,
                     resamples=100)
    assert (r["fixed_valid"], r["broken_valid"]) == (2, 0) and r["mcnemar_p"] == 0.5
    assert r["bias_label"] == stats.NO_CONTROL and not r["explained_by_yes_shift"]
    for k in ("bias_offset", "control_accuracy", "gain_over_control_lo", "control_shares_fixes", "best_offset"):
        assert math.isnan(r[k]), k
    assert "No bias control" in stats.describe(r)
