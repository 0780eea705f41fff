"""mclcbf-diag compare: finished POPE runs side by side, figures read back from each run's own files."""

import json
import math
import shutil
from dataclasses import dataclass

import floors
import pandas as pd
import pytest
import torch

from mclcbf_diag import shipped
from mclcbf_diag.cli import main
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions import Intervention, registry
from mclcbf_diag.measurements import noise
from mclcbf_diag.pope.compare import REPORTED, compare_runs, markdown_table


def test_compare_reads_each_run(tmp_path, capsys):
    runs = {"seed": ["--preset", "seed-exp6"], "pai": ["--intervention", "pai"]}
    for name, opts in runs.items():
        assert main(["pope", "--split", "adversarial", "--limit", "16", *opts, "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    table = compare_runs([tmp_path / "seed", tmp_path / "pai"])
    assert list(table.intervention) == ["mclcbf", "pai"]
    for row, name in zip(table.itertuples(), runs):
        metrics = pd.read_csv(tmp_path / name / "metrics.csv")
        flips = pd.read_csv(tmp_path / name / "flips.csv")
        assert row.accuracy == metrics[metrics.condition == "steered"].accuracy.iloc[0]
        logit = flips[flips.answer == "logit"].iloc[0]
        assert (row.unchanged, row.fixed, row.broken, row.derailed) == tuple(
            int(logit[k]) for k in ("unchanged", "fixed", "broken", "derailed"))
        assert row.unchanged + row.fixed + row.broken + row.derailed == row.n == 16
        assert row.reported_on_llava_1_5_7b == REPORTED[row.intervention]
    assert main(["compare", str(tmp_path / "seed"), str(tmp_path / "pai"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| `pai` |" in out and (tmp_path / "cmp" / "compare.html").is_file()


def test_compare_refuses_an_unfinished_folder(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "run.json is missing" in capsys.readouterr().err


_SAMPLE_T1 = {"strategy": "sample", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "num_beams": 1, "seed": 2}


@pytest.mark.parametrize("name, run, shown", [
    # a figure beside the paper's own preset (or the default) and decoding: greedy, or beam (its first token is
    # the greedy one's); VCD's sampled at T = 1, whatever the seed
    ("pai", {}, REPORTED["pai"]),
    ("pai", {"preset": "paper"}, REPORTED["pai"]),
    ("opera", {}, REPORTED["opera"]),
    ("vcd", {"decoding": _SAMPLE_T1}, REPORTED["vcd"]),
    ("vcd", {"preset": "pope", "decoding": {**_SAMPLE_T1, "seed": 0}}, REPORTED["vcd"]),
    # another decoding: which one the figure is for, not the figure
    ("vcd", {}, "the paper's figure is for sampling at T = 1, not this run's decoding"),
    ("vcd", {"decoding": {**_SAMPLE_T1, "temperature": 3.0}},
     "the paper's figure is for sampling at T = 1, not this run's decoding"),
    ("pai", {"decoding": _SAMPLE_T1}, "the paper's figure is for greedy decoding, not this run's decoding"),
    ("opera", {"decoding": _SAMPLE_T1}, "the paper's figure is for beam search (5 beams), not this run's decoding"),
    # not the paper's settings: a part switched off, another preset, an override, another prompt
    ("pai", {"preset": "attention-only"}, ""),
    ("vista", {"preset": "steering-only"}, ""),
    ("vcd", {"preset": "driver", "decoding": _SAMPLE_T1}, ""),
    ("vaf", {"overrides": ["alpha=1.3"]}, ""),
    ("mclcbf", {"preset": "fixed"}, ""),
    ("mclcbf", {"preset": "original"}, REPORTED["mclcbf"]),
    ("vaf", {"prompt": "Is there a cat? Answer no."}, ""),
    # no figure (what the paper evaluates, or not verified): beside every decoding and preset
    ("dola", {"decoding": _SAMPLE_T1}, REPORTED["dola"]),
    ("dola", {"preset": "halc-first-token"}, REPORTED["halc"]),
    ("halc", {"decoding": _SAMPLE_T1}, REPORTED["halc"]),
    ("halc", {"preset": "model-fallback"}, REPORTED["halc"]),
    ("causalmm", {"preset": "random", "decoding": _SAMPLE_T1}, REPORTED["causalmm"]),
    ("adhh", {"preset": "llava-1.5-7b"}, REPORTED["adhh"]),
    ("knockout", {}, ""),
])
def test_a_papers_figure_shows_only_beside_its_own_settings(name, run, shown):
    from mclcbf_diag.pope.compare import _reported

    assert _reported(name, run) == shown


def test_every_sampled_method_reports_its_spread_over_seeds(tmp_path, capsys):
    """Two seeds of a sampled DoLa run (not only VCD): compare says the accuracy's mean ± standard deviation and
    range over the seeds, worked out here from each run's answers."""
    import statistics

    def pope(*opts, name):
        assert main(["pope", "--split", "adversarial", "--limit", "8", "--batch-size", "8", *opts,
                     "--out", str(tmp_path / name)]) == 0
        return tmp_path / name

    runs = [pope("--intervention", "dola", "--decoding", "sample", "--seed", str(s), name=f"dola-{s}") for s in (0, 1)]
    greedy_vcd = pope("--intervention", "vcd", name="vcd")
    capsys.readouterr()
    assert main(["compare", *map(str, runs), str(greedy_vcd), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    acc = [100 * sum(r["steered_answer"] == r["label"] for r in _rows(run)) / 8 for run in runs]
    line = next(x for x in out.splitlines() if "over seeds" in x)
    assert line.startswith("- `dola` --decoding sample over seeds 0, 1 (mean ± standard deviation, range): "
                           f"adversarial accuracy {statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f} "
                           f"({min(acc):.1f}–{max(acc):.1f}), Δ accuracy "), line
    assert f"{line}\n" in (tmp_path / "cmp" / "compare_findings.md").read_text()
    # the summary: DoLa's two seeds folded into one row (no greedy DoLa run: empty cells), greedy VCD alone
    summary = (tmp_path / "cmp" / "compare_summary.md").read_text()
    assert summary in out + "\n"
    dola = next(x for x in summary.splitlines() if x.startswith("| `dola` |"))
    assert dola.startswith(f"| `dola` | (defaults) | adversarial | – | – | – | – | – | sample (0, 1) | "
                           f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f} |"), dola
    assert sum(x.startswith("| `vcd` | (defaults) | adversarial |") for x in summary.splitlines()) == 1
    assert "Greedy beside sampled" in (tmp_path / "cmp" / "compare.html").read_text()
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv", keep_default_na=False).set_index("run")
    assert table.loc[str(runs[0]), "reported_on_llava_1_5_7b"] == REPORTED["dola"]
    assert table.loc[str(greedy_vcd), "reported_on_llava_1_5_7b"] == (
        "the paper's figure is for sampling at T = 1, not this run's decoding")


# --------------------------------------------------------------------------- Δ image mass and cost
@dataclass(frozen=True)
class AddKnobs:
    layers: tuple[int, ...] = (1, 2)
    scale: float = 4.0


class ResidualAdd(Intervention):
    """Add ``scale`` × a fixed random direction to the decision token's residual entering ``layers``."""

    name = "test-residual-add"
    Knobs = AddKnobs
    presets = {"default": AddKnobs()}
    sites = frozenset({"residual"})

    def layers(self, n_layers):
        return tuple(layer for layer in self.knobs.layers if layer < n_layers)

    def first_edited(self, row):
        return row.decision

    def vector(self, d):
        return torch.randn(d, generator=torch.Generator().manual_seed(0)) * self.knobs.scale

    def residual(self, site):
        if site.steer:
            for row in site.rows:
                site.add(row, [site.current(row)], self.vector(site.tensor.shape[-1])[None])


def _reference_masses(lm, question, iv=None):
    """Plain HF eager forward, output_attentions=True: the last row's head-mean mass on image keys, per layer.

    With ``iv``, its vector is added by a forward pre-hook on the decoder layers (no toolkit code).
    """
    inputs = lm.inputs(build_prompt(question.text), load_image(resolve_image(question, shipped.IMAGES)))
    handles = []
    if iv is not None:
        layers = lm.model.get_submodule("model.language_model.layers")
        v = iv.vector(lm.text_config.hidden_size)

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x[:, -1] += v.to(x.dtype)

        handles = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in iv.layers(lm.n_layers)]
    try:
        with torch.no_grad():
            att = lm.model(**inputs, output_attentions=True).attentions
    finally:
        for h in handles:
            h.remove()
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    return [float(a[0, :, -1, image].sum(-1).mean()) for a in att]


MASS_QUANTUM = 1e-6  # answers.jsonl keeps image masses to 6 decimals (pope.answer: round(·, 6))


def _mean_tolerance(*per_question: list[float]) -> float:
    """Tolerance of a mean over questions of (sums or differences of) masses read back from answers.jsonl, against
    plain forwards: the mean of the masses' float32 floors (``floors.mass_floor``), plus half the stored quantum
    for each mass rounded on the way."""
    n = len(per_question[0])
    floor = sum(floors.mass_floor(m) for masses in per_question for m in masses) / n
    return floor + len(per_question) * MASS_QUANTUM / 2


@pytest.fixture
def residual_add(monkeypatch):
    monkeypatch.setitem(registry(), ResidualAdd.name, ResidualAdd)
    return ResidualAdd()


def test_delta_image_mass_equals_a_plain_forward_and_cost_is_positive(tmp_path, capsys, embedded_model, residual_add):
    out = tmp_path / "add"
    # 6 questions in batches of 4 and 2: padded rows and a second batch
    assert main(["pope", "--split", "adversarial", "--limit", "6", "--batch-size", "4", "--intervention",
                 residual_add.name, "--out", str(out)]) == 0
    capsys.readouterr()
    row = compare_runs([out]).iloc[0]
    questions = load_pope(shipped.pope_file("adversarial"))[:6]
    base = [_reference_masses(embedded_model, q) for q in questions]
    steered = [_reference_masses(embedded_model, q, residual_add) for q in questions]
    n = embedded_model.n_layers
    ref = [sum(s[i] - b[i] for b, s in zip(base, steered)) / len(questions) for i in range(n)]
    # the batched, padded pope run against each question's plain forward: within the masses' floors
    d_tol = [_mean_tolerance([b[i] for b in base], [s[i] for s in steered]) for i in range(n)]
    for i in range(n):
        assert row[f"d_image_mass_L{i}"] == pytest.approx(ref[i], rel=0, abs=d_tol[i]), i
        assert row[f"baseline_image_mass_L{i}"] == pytest.approx(sum(b[i] for b in base) / 6, rel=0,
                                                                  abs=_mean_tolerance([b[i] for b in base])), i
    # exact: layer 0 comes before the first edit, the same plain forward with and without the hook
    assert ref[0] == 0 and max(abs(d) for d in ref[1:]) > 1e-3  # the step reaches attention from layer 1 on
    assert row.edited_layers == "1–2"
    assert row.d_image_mass_edited == pytest.approx((ref[1] + ref[2]) / 2, rel=0, abs=(d_tol[1] + d_tol[2]) / 2)
    top = max(range(n), key=lambda i: abs(ref[i]))  # discrete: the two largest |Δ| differ by 10⁴ tolerances
    assert row.d_image_mass_max_layer == top and row.d_image_mass_max == pytest.approx(ref[top], rel=0, abs=d_tol[top])
    # cost: the run's seconds per question, above the bare forward's (inputs + plain baseline forward)
    assert row.seconds_per_question > row.bare_seconds_per_question > 0
    assert row.cost_vs_bare == pytest.approx(row.seconds_per_question / row.bare_seconds_per_question)
    assert row.cost_vs_bare > 1 and "thread" in row.timed_on
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith(f"| `{residual_add.name}`"))
    assert f"(L{top})" not in line and f", L{top})" in line and "×)" in line
    assert "s/question (× bare)" in text and "Δ image mass" in text
    layers = pd.read_csv(tmp_path / "cmp" / "compare_layers.csv")
    assert list(layers.layer) == list(range(n)) and list(layers.edited) == [i in (1, 2) for i in range(n)]
    for got, want, tol in zip(layers.d_image_mass.tolist(), ref, d_tol):
        assert got == pytest.approx(want, rel=0, abs=tol)
    # (baseline + Δ) − baseline in float64, masses at most 1: two float64 roundings (noise.floor)
    assert (layers.steered_image_mass - layers.baseline_image_mass).tolist() == pytest.approx(
        layers.d_image_mass.tolist(), rel=0, abs=noise.floor(torch.float64, 1.0, 2))
    wide = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert wide.loc[0, "cost_vs_bare"] == pytest.approx(row.cost_vs_bare)
    assert "Δ image mass per layer" in (tmp_path / "cmp" / "compare.html").read_text()


def test_a_merged_run_is_timed_by_its_parts_and_old_runs_show_na(tmp_path, capsys):
    for i in (0, 1):
        assert main(["pope", "--split", "adversarial", "--limit", "4", "--batch-size", "2", "--intervention", "pai",
                     "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")]) == 0
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    capsys.readouterr()
    parts = [json.loads((tmp_path / f"s{i}" / "timing.json").read_text())["sessions"] for i in (0, 1)]
    assert [sum(s["questions"] for s in p) for p in parts] == [2, 2]
    row = compare_runs([tmp_path / "m"]).iloc[0]
    seconds = sum(s["seconds"] for p in parts for s in p)
    assert row.seconds_per_question == pytest.approx(seconds / 4)
    assert row.bare_seconds_per_question == pytest.approx(
        sum(s["inputs_seconds"] + s["baseline_seconds"] for p in parts for s in p) / 4)
    # a run written before the image masses and the timing existed: the columns say n/a, nothing breaks
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "s0", old)
    (old / "timing.json").unlink()
    run = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps({**run, "shard": None}))  # a whole run of its own (a shard is refused)
    rows = [json.loads(x) for x in (old / "answers.jsonl").read_text().splitlines()]
    (old / "answers.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if "image_mass" not in k}) + "\n"
                                               for r in rows))
    table = compare_runs([old])
    assert math.isnan(table.iloc[0].seconds_per_question) and math.isnan(table.iloc[0].d_image_mass_edited)
    assert markdown_table(table).splitlines()[-1].split(" | ")[10:12] == ["n/a", "n/a"]


# --------------------------------------------------------------------------- is the difference real (issue #31)
def _fingerprint(inputs: dict, i: int) -> tuple[float, float]:
    """Which image row ``i`` of a batch shows: mean and standard deviation of its pixels (or of its image features,
    where the batch shares the vision tower's outputs between rows)."""
    if "pixel_values" in inputs:
        x = inputs["pixel_values"][i]
    else:
        x = inputs["mm_encoder_outputs"]["image"].pooler_output[i]
    x = x.double()
    return float(x.mean()), float(x.std())


@dataclass(frozen=True)
class OracleKnobs:
    scale: float = 20.0
    uniform: bool = False  # push every question toward Yes (a pure yes/no shift) instead of the chosen ones


class OraclePush(Intervention):
    """An oracle: at the decision token entering the last layer, add ``scale`` × the unit (W_yes − W_no) direction
    toward the label of each chosen question (``targets``: prompt ids and image fingerprint → label), nothing
    elsewhere; with ``uniform``, toward Yes at every question."""

    name = "test-oracle-push"
    Knobs = OracleKnobs
    presets = {"default": OracleKnobs()}
    sites = frozenset({"residual"})
    targets: dict = {}

    def layers(self, n_layers):
        return (n_layers - 1,)

    def first_edited(self, row):
        return row.decision

    def prepare(self, lm, inputs, rows):
        w = lm.unembed_weight().float()
        d = w[lm.tokens.yes_id] - w[lm.tokens.no_id]
        self._direction = d / d.norm()
        self._sign = {}
        for r in rows:
            if self.knobs.uniform:
                self._sign[r.index] = 1.0
                continue
            ids, fp = tuple(r.ids.tolist()), _fingerprint(inputs, r.index)
            for (t_ids, t_fp), label in self.targets.items():
                # the same image through another batch: features within float32 rounding of each other
                if t_ids == ids and all(abs(a - b) <= 1e-4 * (1 + abs(b)) for a, b in zip(fp, t_fp)):
                    self._sign[r.index] = 1.0 if label == "yes" else -1.0

    def residual(self, site):
        if site.steer:
            for row in site.rows:
                if row.index in self._sign:
                    push = self._sign[row.index] * self.knobs.scale * self._direction
                    site.add(row, [site.current(row)], push[None].to(site.tensor.dtype))


ORACLE_LIMIT = 72  # the adversarial split's first 72 questions hold 7 wrong baseline answers


@pytest.fixture(scope="module")
def oracle_runs(tmp_path_factory, embedded_model):
    """Two runs on the embedded model: the oracle fixing the chosen (every) wrong baseline answer, and a uniform
    push toward Yes; the wrong answers are found by a plain forward per question (no toolkit run)."""
    from mclcbf_diag.engine.batch import batch_inputs

    tmp = tmp_path_factory.mktemp("oracle")
    targets, wrong = {}, []
    for q in load_pope(shipped.pope_file("adversarial"))[:ORACLE_LIMIT]:
        inputs = batch_inputs(embedded_model, [build_prompt(q.text)], [load_image(resolve_image(q, shipped.IMAGES))])
        with torch.no_grad():
            logits = embedded_model.model(**inputs).logits[0, -1]
        margin = float(logits[embedded_model.tokens.yes_id] - logits[embedded_model.tokens.no_id])
        if ("yes" if margin > 0 else "no") != q.label:
            targets[(tuple(inputs["input_ids"][0].tolist()), _fingerprint(inputs, 0))] = q.label
            wrong.append(q.question_id)
    registry()[OraclePush.name] = OraclePush
    OraclePush.targets = targets
    try:
        for name, extra in (("oracle", ["--intervention", OraclePush.name]),
                            ("uniform", ["--intervention", OraclePush.name, "--set", "uniform=true",
                                         "--set", "scale=8"]),
                            ("noop", ["--intervention", "knockout", "--set", "factor=1"])):  # a ×1 edit: no change
            assert main(["pope", "--split", "adversarial", "--limit", str(ORACLE_LIMIT), "--batch-size", "24",
                         *extra, "--out", str(tmp / name)]) == 0
    finally:
        registry().pop(OraclePush.name, None)
    return tmp, wrong


def _rows(folder):
    return [json.loads(x) for x in (folder / "answers.jsonl").read_text().splitlines()]


def test_a_planted_real_improvement_is_significant_and_a_yes_shift_is_labelled_so(oracle_runs, capsys):
    from scipy.stats import binomtest

    from mclcbf_diag.measurements import stats as S

    tmp, wrong = oracle_runs
    capsys.readouterr()
    oracle, uniform = _rows(tmp / "oracle"), _rows(tmp / "uniform")
    assert len(wrong) >= 6  # enough for an exact McNemar p below 0.05 with nothing broken (2 / 2⁶)
    # the oracle fixes exactly the chosen questions, validly, and touches nothing else
    assert sorted(r["question_id"] for r in oracle if r["outcome"] == "fixed") == sorted(wrong)
    assert all(r["outcome"] in ("fixed", "unchanged") and r["steered_valid"] for r in oracle)
    m = pd.read_csv(tmp / "oracle" / "metrics.csv").set_index("condition").loc["steered"]
    assert m.mcnemar_p == pytest.approx(binomtest(len(wrong), len(wrong)).pvalue, rel=1e-12) and m.mcnemar_p < 0.05
    assert m.d_accuracy_lo > 0 and m.gain_over_control_lo > 0 and m.bias_label == S.BEYOND
    assert not m.explained_by_yes_shift
    # the uniform push changes answers, all toward Yes, and its bias control matches it
    u = pd.read_csv(tmp / "uniform" / "metrics.csv").set_index("condition").loc["steered"]
    assert sum(r["outcome"] != "unchanged" for r in uniform) >= 5 and u.d_yes_ratio_lo > 0
    assert u.bias_label == S.EXPLAINED and u.explained_by_yes_shift and u.gain_over_control_lo <= 0
    # the ledger: every changed question, with the control's answer; the oracle's fixes survive their control
    ledger = pd.read_csv(tmp / "oracle" / "flips_questions.csv")
    assert sorted(ledger.question_id) == sorted(wrong) and ledger.survives_control.sum() >= 1
    led_u = pd.read_csv(tmp / "uniform" / "flips_questions.csv")
    assert len(led_u) == sum(r["outcome"] != "unchanged" for r in uniform)
    for row in led_u.itertuples():  # the control's answer: yes iff baseline margin + offset > 0
        assert row.control_answer == ("yes" if row.baseline_margin + row.bias_offset > 0 else "no")
    # compare: the columns, Holm over the two runs, sorted by the interval's lower end
    table = compare_runs([tmp / "uniform", tmp / "oracle"], resamples=2000)
    assert list(table.run) == [str(tmp / "oracle"), str(tmp / "uniform")] and list(table["rank"]) == [1, 2]
    assert list(table.mcnemar_p_holm) == pytest.approx(S.holm(table.mcnemar_p.tolist()))
    want = S.paired_records(oracle, resamples=2000)
    got = table.iloc[0]
    for k in ("mcnemar_p", "d_accuracy_lo", "d_accuracy_hi", "gain_over_control_lo", "control_accuracy"):
        assert got[k] == pytest.approx(want[k], rel=0, abs=1e-15), k
    assert list(table.bias_label) == [S.BEYOND, S.EXPLAINED]
    assert main(["compare", str(tmp / "uniform"), str(tmp / "oracle"), "--resamples", "500",
                 "--out", str(tmp / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "Δ accuracy [95%]" in out and "McNemar p (Holm)" in out and "Holm's adjustment" in out
    assert f"| {S.BEYOND} |" in out and f"| {S.EXPLAINED} |" in out
    csv = pd.read_csv(tmp / "cmp" / "compare.csv")
    assert {"d_accuracy_lo", "gain_over_control_hi", "control_f1", "explained_by_yes_shift", "rank"} <= set(csv)
    page = (tmp / "cmp" / "compare.html").read_text()
    assert "Holm" in page and S.EXPLAINED in page


def test_relabelled_labels_move_the_intervals_and_the_ranks(oracle_runs, capsys, tmp_path):
    """Planted label noise: a file that relabels the oracle's fixed questions with the baseline's (wrong) answers
    turns each fix into a break; its interval moves down by exactly those questions and the ranks change: the run
    that changes nothing moves from second to first, the oracle from first to second."""
    tmp, wrong = oracle_runs
    oracle = _rows(tmp / "oracle")
    noisy = {str(r["question_id"]): r["baseline_answer"] for r in oracle if r["outcome"] == "fixed"}
    path = tmp_path / "noisy.json"
    path.write_text(json.dumps({"adversarial": noisy}))
    from mclcbf_diag.data.labels import load_labels

    runs = [tmp / "uniform", tmp / "oracle", tmp / "noop"]
    table = compare_runs(runs, load_labels(path), resamples=2000)
    assert list(dict.fromkeys(table.label_set))[0] == "question file" and len(table) == 6
    first, second = table[table.label_set == "question file"], table[table.label_set != "question file"]
    assert list(first.run) == [str(tmp / k) for k in ("oracle", "noop", "uniform")]
    assert list(second.run) == [str(tmp / k) for k in ("noop", "oracle", "uniform")]
    assert list(second.rank_change) == [-1, 1, 0] and first.rank_change.isna().all()
    by, by0 = second.set_index("run"), first.set_index("run")
    o, o0 = by.loc[str(tmp / "oracle")], by0.loc[str(tmp / "oracle")]
    n = len(oracle)
    assert (o.fixed, o.broken) == (0, len(wrong)) and o.d_accuracy == pytest.approx(-len(wrong) / n)
    # the same resamples: every resample's Δ moves down by 2 × (its count of relabelled questions) / n
    assert o.d_accuracy_hi < o0.d_accuracy_lo and o.mcnemar_p == o0.mcnemar_p  # the same discordant count
    noop = by.loc[str(tmp / "noop")]
    assert (noop.d_accuracy_lo, noop.d_accuracy_hi, noop.bias_label) == (0, 0, "no change")
    assert by.loc[str(tmp / "uniform"), "d_yes_ratio"] == by0.loc[str(tmp / "uniform"), "d_yes_ratio"]  # not a label
    assert main(["compare", *map(str, runs), "--labels", str(path), "--resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert "| rank (change) |" in out and "| 2 (+1) | `test-oracle-push`" in out and "relabelled (noisy.json" in out


def _copied_run(source, dest, **identity):
    """A copy of a finished run folder whose run.json carries ``identity``'s keys on top of its own."""
    shutil.copytree(source, dest)
    run = json.loads((dest / "run.json").read_text())
    (dest / "run.json").write_text(json.dumps({**run, **identity}))
    return dest


def test_compare_refuses_a_shard_and_marks_a_partial_merge(oracle_runs, tmp_path):
    tmp, _ = oracle_runs
    shard = _copied_run(tmp / "uniform", tmp_path / "shard", shard="1/4")
    with pytest.raises(UserError, match=r"shard 1/4 of a run.*merge its shards first"):
        compare_runs([shard])
    partial = _copied_run(tmp / "uniform", tmp_path / "partial",
                          partial={"expected": 100, "present": 72, "missing_shards": ["3/4"]})
    table = compare_runs([partial, tmp / "oracle"], resamples=200)
    assert table.set_index("run").loc[str(partial), "partial"] == "72 of 100 questions"
    assert table.set_index("run").loc[str(tmp / "oracle"), "partial"] == ""
    assert "adversarial (partial: 72 of 100 questions)" in markdown_table(table)


def test_compare_labels_for_other_splits_are_unused_or_refused(oracle_runs, tmp_path, capsys):
    from mclcbf_diag.data.labels import load_labels

    tmp, _ = oracle_runs
    both = tmp_path / "both.csv"
    oracle = _rows(tmp / "oracle")
    flip = oracle[0]
    both.write_text("split,question_id,label\n"
                    f"adversarial,{flip['question_id']},{'no' if flip['label'] == 'yes' else 'yes'}\nrandom,1,no\n")
    table = compare_runs([tmp / "oracle"], load_labels(both), resamples=200)  # the random entry is unused
    relabelled = table[table.label_set != "question file"].iloc[0]
    original = table[table.label_set == "question file"].iloc[0]
    assert relabelled.accuracy == pytest.approx(original.accuracy + (-1 if flip["steered_answer"] == flip["label"]
                                                                     else 1) / len(oracle))
    other = tmp_path / "other.csv"
    other.write_text("split,question_id,label\nrandom,1,no\n")
    with pytest.raises(UserError, match="relabels no question of the runs compared"):
        compare_runs([tmp / "oracle"], load_labels(other), resamples=200)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("split,question_id,label\nadversarial,99999,no\n")
    with pytest.raises(UserError, match=r"oracle: labels file .*'99999' is not in split 'adversarial'"):
        compare_runs([tmp / "oracle"], load_labels(unknown), resamples=200)
    assert main(["compare", str(tmp / "oracle"), str(tmp / "noop"), "--labels", str(both), "--resamples", "200",
                 "--out", str(tmp_path / "cmp")]) == 0
    capsys.readouterr()
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "Is the difference real?" in page and "rank change" in page and "relabelled (both.csv" in page


def test_a_run_made_with_labels_says_so_in_its_settings(oracle_runs, tmp_path):
    tmp, _ = oracle_runs
    run = _copied_run(tmp / "noop", tmp_path / "relabelled",
                      labels={"file": "/x/fixed labels.json", "sha256": "0" * 64, "entries": 3})
    row = compare_runs([run], resamples=200).iloc[0]
    assert row.settings == "--set factor=1 --labels fixed labels.json"  # the run's own knob, then its labels


@pytest.mark.parametrize("name", ["lean-no", "look-carefully"])
def test_a_prompt_control_pairs_its_baseline_with_the_default_prompts(oracle_runs, tmp_path, name):
    from scipy.stats import binomtest

    from mclcbf_diag.data.prompts import PROMPT_CONTROLS

    tmp, _ = oracle_runs
    assert main(["pope", "--split", "adversarial", "--limit", str(ORACLE_LIMIT), "--batch-size", "24",
                 "--prompt", name, "--out", str(tmp_path / name)]) == 0
    assert json.loads((tmp_path / name / "run.json").read_text())["prompt"] == PROMPT_CONTROLS[name]
    table = compare_runs([tmp / "noop", tmp_path / name])
    control = table[table.intervention == "prompt control"].set_index("split").loc["adversarial"]
    assert control.settings.startswith(f"--prompt {name}")
    # by hand: the default prompt's baseline answers against this run's baseline answers, question by question
    # (a valid Yes/No answer that is no longer one is derailed; only valid changes are fixes or breaks)
    plain = {r["question_id"]: r for r in _rows(tmp / "noop")}
    worded = _rows(tmp_path / name)
    counts = {"fixed": 0, "broken": 0, "derailed": 0, "unchanged": 0}
    for r in worded:
        b = plain[r["question_id"]]
        if b["baseline_valid"] and not r["baseline_valid"]:
            counts["derailed"] += 1
        elif b["baseline_answer"] == r["baseline_answer"]:
            counts["unchanged"] += 1
        else:
            counts["fixed" if r["baseline_answer"] == r["label"] else "broken"] += 1
    assert {k: int(control[k]) for k in counts} == counts
    # McNemar counts a derailed answer as wrong: its discordant pairs are right ↔ wrong-or-not-Yes/No

    def right(answer, valid, label):
        return bool(valid) and answer == label

    pairs = [(right(plain[r["question_id"]]["baseline_answer"], plain[r["question_id"]]["baseline_valid"], r["label"]),
              right(r["baseline_answer"], r["baseline_valid"], r["label"])) for r in worded]
    fixed, broken = sum(not a and b for a, b in pairs), sum(a and not b for a, b in pairs)
    assert control.accuracy == pytest.approx(sum(r["baseline_answer"] == r["label"] for r in worded) / len(worded))
    assert control.accuracy_valid == pytest.approx(sum(b for _, b in pairs) / len(pairs))
    assert control.mcnemar_p == pytest.approx(binomtest(fixed, fixed + broken).pvalue if fixed + broken else 1.0)
    # the prompt run's own row (its intervention under that wording) is still there
    assert ((table.run == str(tmp_path / name)) & (table.intervention != "prompt control")).any()
    # without a default-prompt run among those compared there is nothing to pair with: no control row
    alone = compare_runs([tmp_path / name])
    assert not (alone.intervention == "prompt control").any()
    # nor with a default-prompt run decoded otherwise (its baselines are sampled, this run's greedy)
    sampled = _copied_run(tmp / "noop", tmp_path / "sampled", decoding={
        "strategy": "sample", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "num_beams": 1, "seed": 0})
    assert not (compare_runs([sampled, tmp_path / name]).intervention == "prompt control").any()


def test_the_findings_follow_the_intervals(oracle_runs):
    from mclcbf_diag.pope.compare import findings

    tmp, wrong = oracle_runs
    table = compare_runs([tmp / "oracle", tmp / "uniform", tmp / "noop"])
    said = findings(table)
    assert len(said) == 3
    row = table[table.run == str(tmp / "oracle")].iloc[0]
    oracle, noop, uniform_said = (next(x for x in said if x.startswith(f"`{row.intervention}` (defaults)")),
                                  next(x for x in said if x.startswith("`knockout`")),
                                  next(x for x in said if "uniform=true" in x))
    assert row.d_accuracy_lo > 0 and "gains accuracy on adversarial" in oracle  # the oracle's interval lies above 0
    assert f"{100 * row.d_accuracy:+.1f} [{100 * row.d_accuracy_lo:+.1f}, {100 * row.d_accuracy_hi:+.1f}]" in oracle
    assert f"fixed/broken(+derailed) {len(wrong)}/0" in oracle and "beyond a yes/no shift" in oracle
    assert "changes no answer" in noop and "bias control" not in noop
    uniform = table[table.run == str(tmp / "uniform")].iloc[0]
    word = ("gains accuracy" if uniform.d_accuracy_lo > 0 else "loses accuracy" if uniform.d_accuracy_hi < 0
            else "no change beyond chance")
    assert word in uniform_said
