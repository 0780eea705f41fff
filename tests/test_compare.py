"""mclcbf-diag compare: finished POPE runs side by side, figures read back from each run's own files."""

import json
import math
import shutil
from dataclasses import dataclass

import floors
import pandas as pd
import pytest
import torch

from mclcbf_diag import noise, shipped
from mclcbf_diag.cli import main
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.interventions import Intervention, registry
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
