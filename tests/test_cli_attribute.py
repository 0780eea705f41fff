"""``mclcbf-diag attribute`` (mclcbf_diag.cli.attribute): refusals in a fresh process, and real runs.

The run's saved figures are checked against references outside the command: the margin of a plain HF
forward of the same prompt and image, and of the corrupted image it names (the minimal pair rendered
here); the DLA's parts against that margin.
"""

from __future__ import annotations

import json
import shutil

import floors
import pandas as pd
import pytest
import torch
from cli_refusals import refused

from mclcbf_diag import shipped
from mclcbf_diag.cli import main
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.data.corrupt import minimal_pair
from mclcbf_diag.embedded.config import EVAL_SEED
from mclcbf_diag.embedded.world import render, sample_scene
from mclcbf_diag.records import documented


def described(metric: str) -> bool:
    """In the glossary: the shared one, or the attribute module's own (its entries for records.METRICS)."""
    return documented(metric)


def _pope(tmp_path, text="Is there a dog in the image?", image_from=0):
    """A one-question POPE file in ``tmp_path`` whose image is a copy of a shipped one (or a grey image)."""
    if image_from is None:
        from PIL import Image

        Image.new("RGB", (336, 336), (90, 90, 90)).save(tmp_path / "grey.png")
        name = "grey.png"
    else:
        q = load_pope(shipped.pope_file("adversarial"))[image_from]
        name = q.image
        shutil.copy(resolve_image(q, shipped.IMAGES), tmp_path / name)
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": "x1", "image": name, "text": text, "label": "yes"}) + "\n")
    return f


@pytest.mark.parametrize("argv, fragments", [
    (["attribute", "--noise-step", "1000"], ["--noise-step", "goes with --corrupt noise"]),
    (["attribute", "--corrupt", "noise", "--noise-step", "1000"], ["--noise-step 1000", "from 0 to 999"]),
    (["attribute", "--corrupt", "blank", "--other-sample", "3"], ["--other-sample goes with --corrupt other"]),
    (["attribute", "--seed", "-1"], ["--seed -1", "non-negative"]),
    (["attribute", "--corrupt", "other", "--other-sample", "0"], ["--other-sample 0 has the same image"]),
    (["attribute", "--corrupt", "other", "--other-sample", "99999"], ["--sample 99999 is out of range"]),
    (["attribute", "--sample", "5000"], ["--sample 5000 is out of range"]),
    (["attribute", "--limit", "3", "--sample", "1"], ["--limit runs over a split", "without --sample"]),
    (["attribute", "--limit", "0"], ["--limit 0", "positive number of questions"]),
    (["attribute", "--share", "0.2"], ["--share and --adhh-calibration go with --limit N"]),
    (["attribute", "--limit", "3", "--share", "1.5"], ["--share 1.5", "fraction of the margin"]),
    (["attribute", "--limit", "3", "--corrupt", "other", "--other-sample", "2"], ["--other-sample picks one image"]),
])
def test_attribute_refusals_are_one_fast_line(tmp_path, argv, fragments):
    _, torch_loaded = refused(argv, tmp_path, *fragments)
    assert not (tmp_path / "reports").exists()
    if "--seed" in argv or "--noise-step" in argv:
        assert not torch_loaded, "a bad number is refused before torch loads"


def test_a_minimal_pair_needs_the_embedded_world(tmp_path):
    f = _pope(tmp_path, image_from=None)
    refused(["attribute", "--pope-file", str(f), "--corrupt", "pair"], tmp_path, "--corrupt pair needs an image",
            "grey.png", "choose --corrupt noise, blank or other")
    g = _pope(tmp_path, text="Is there anything in the image?")
    refused(["attribute", "--pope-file", str(g), "--corrupt", "pair"], tmp_path, "names no single object")


def _margin(lm, text, image):
    with torch.no_grad():
        logits = lm.model(**lm.inputs(build_prompt(text), image)).logits[0, -1]
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def test_attribute_writes_records_and_a_page_with_the_margins_of_plain_forwards(tmp_path, capsys, embedded_model):
    lm = embedded_model
    out = tmp_path / "a"
    assert main(["attribute", "--sample", "0", "--out", str(out)]) == 0  # the embedded default: the minimal pair
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".mclcbf-diag.lock", "attribute.html", "config.json",
                                                    "records.csv", "records.parquet"]
    meta = json.loads((out / "config.json").read_text())
    q = load_pope(shipped.pope_file("adversarial"))[0]
    image = load_image(resolve_image(q, shipped.IMAGES))
    pair, what = minimal_pair(sample_scene(0, EVAL_SEED), "dog")
    assert meta["corrupt"] == "pair" and meta["corruption"] == f"the same scene with the dog {what}"
    tol = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    clean, corrupted = _margin(lm, q.text, image), _margin(lm, q.text, render(pair))
    assert meta["summary"]["margin_clean"] == pytest.approx(clean, abs=tol)
    assert meta["summary"]["margin_corrupted"] == pytest.approx(corrupted, abs=tol)
    records = pd.read_parquet(out / "records.parquet")
    assert all(described(m) for m in records.metric.unique())
    base = records[records.condition == "baseline"]
    total = float(base[base.metric == "dla_total"].value.iloc[0])
    assert abs(total - clean) <= min(1e-5, tol)  # the parts sum to the plain forward's margin
    for d in ("denoise", "noise"):
        r = records[(records.condition == d) & (records.metric == "patch_resid_image") & (records.layer == 0)]
        assert float(r.value.iloc[0]) == pytest.approx(1.0 if d == "denoise" else 0.0, abs=tol / abs(clean - corrupted))
    assert set(records.condition) == {"baseline", "steered", "denoise", "noise"}
    # seed-exp6 moves this margin by about 6e-5 (tiny steps at a few layers): localised all the same
    local = records[(records.condition == "steered") & (records.metric == "local_head")]
    assert len(local) == 8 * 4 and local.value.notna().all()
    assert "intervention  moves the margin by" in printed
    restored = records[(records.condition == "steered") & (records.metric == "restore_head")]
    assert len(restored) == 8 * 4 and restored.value.notna().all()
    html = (out / "attribute.html").read_text()
    assert "Direct logit attribution" in html and "Attribution patching" in html and "<script src=" not in html
    assert "margin      clean" in printed and "wrote" in printed
    csv = pd.read_csv(out / "records.csv")
    assert len(csv) == len(records)


def test_attribute_localises_an_intervention_that_moves_the_margin(tmp_path, capsys, embedded_model):
    out = tmp_path / "l"
    argv = ["attribute", "--sample", "0", "--out", str(out), "--set", "span=detected", "--set", "alpha=50",
            "--set", "tau=0.9", "--components-at", "decision"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "its activations patched into the baseline" in printed and "restoring   the baseline's" in printed
    assert "the change  enters " in printed and "made by " in printed and "worked against by " in printed
    records = pd.read_parquet(out / "records.parquet")
    st = records[records.condition == "steered"]
    clean = float(st[st.metric == "local_margin_clean"].value.iloc[0])
    base = float(st[st.metric == "local_margin_corrupted"].value.iloc[0])
    final = float(records[(records.condition == "baseline") & (records.metric == "dla_total")].value.iloc[0])
    lm = embedded_model
    assert abs(base - final) <= floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    # the steered residual at the decision token entering the last layer carries every step (layers ≤ 6)
    last = st[(st.metric == "local_resid_decision") & (st.layer == lm.n_layers - 1)]
    assert float(last.value.iloc[0]) == pytest.approx(1.0, abs=0.05)
    html = (out / "attribute.html").read_text()
    assert clean != base and "Where the intervention acts" in html and "made and undone" in html
    # restoring the baseline's residual at the decision token entering layer 0 (before any step) leaves all of
    # the change; entering the last layer (after every step at layers ≤ 6) none of it
    back = st[st.metric == "restore_resid_decision"].set_index("layer").value
    assert float(back[0]) == pytest.approx(1.0, abs=0.05) and float(back[lm.n_layers - 1]) == pytest.approx(0, abs=0.05)
    meta = json.loads((out / "config.json").read_text())
    assert meta["summary"]["local"]["measurable"] and meta["summary"]["local"]["enters"]


def test_attribute_with_noise_escapes_the_question_and_keeps_folders_apart(tmp_path, capsys, embedded_model):
    f = _pope(tmp_path, text="Is there a <b>dog</b> in the image?")
    out = tmp_path / "n"
    assert main(["attribute", "--pope-file", str(f), "--out", str(out), "--components-at", "decision"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["corrupt"] == "noise" and "step 500" in meta["corruption"]  # the default off the embedded set
    assert meta["components_at"] == "decision"
    html = (out / "attribute.html").read_text()
    assert "<b>dog</b>" not in html and "&lt;b&gt;dog&lt;/b&gt;" in html
    capsys.readouterr()
    assert main(["trace", "--pope-file", str(f), "--out", str(out)]) == 2
    assert "holds an attribute run" in capsys.readouterr().err
    t = tmp_path / "t"
    assert main(["trace", "--pope-file", str(f), "--out", str(t)]) == 0
    capsys.readouterr()
    assert main(["attribute", "--pope-file", str(f), "--corrupt", "blank", "--out", str(t)]) == 2
    assert "holds a trace" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ over a split
def test_attribute_over_a_split_counts_the_heads_that_carry_the_wrong_yes(tmp_path, capsys, embedded_model):
    """Three questions of the adversarial split (a right answer, a wrong No, a wrong Yes), the minimal-pair
    corruption: the answers against plain HF forwards; the carriers against the documented rule applied to the
    records; the counts against the records; AD-HH's heads against what AD-HH itself found (its per-process
    cache); each intervention's heads against its own layers."""
    from mclcbf_diag.experiments.attribute import PUBLISHED
    from mclcbf_diag.interventions import adhh, resolve

    lm = embedded_model
    questions = [load_pope(shipped.pope_file("adversarial"))[i] for i in (0, 20, 49)]
    f = tmp_path / "three.jsonl"
    f.write_text("".join(json.dumps({"question_id": q.question_id, "image": q.image, "text": q.text,
                                     "label": q.label}) + "\n" for q in questions))
    out = tmp_path / "s"
    assert main(["attribute", "--pope-file", str(f), "--image-dir", str(shipped.IMAGES), "--limit", "3", "--corrupt",
                 "pair", "--adhh-calibration", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".mclcbf-diag.lock", "attribute.html", "config.json",
                                                    "counts.csv", "interventions.csv", "records.csv",
                                                    "records.parquet"]
    margins = [_margin(lm, q.text, load_image(resolve_image(q, shipped.IMAGES))) for q in questions]
    wrong_yes = [q.question_id for q, m in zip(questions, margins) if q.label == "no" and m > 0]
    wrong_no = [q.question_id for q, m in zip(questions, margins) if q.label == "yes" and m < 0]
    assert len(wrong_yes) == 1 and len(wrong_no) == 1
    s = json.loads((out / "config.json").read_text())["summary"]
    assert (s["questions"], s["right"], s["wrong_yes"], s["wrong_no"]) == (3, 1, 1, 1)
    records = pd.read_parquet(out / "records.parquet")
    from mclcbf_diag.measurements.records import METRICS

    split_metrics = {"wrong_yes_margin", *(m for m in METRICS if m.startswith("carr"))}
    assert set(records.question_id) == set(wrong_yes) and set(records.metric) <= split_metrics
    assert all(described(m) for m in records.metric.unique())
    value = lambda m: records[records.metric == m].set_index(["layer", "head"]).value  # noqa: E731
    margin, floor = float(value("wrong_yes_margin").iloc[0]), s["margin_floor"]
    assert margin == pytest.approx(margins[2], abs=floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id))
    for kind in ("head", "mlp"):
        direct = value(f"carry_dla_{kind}")
        assert (value(f"carries_dla_{kind}") == ((direct > s["share"] * margin) & (direct > floor))).all()
    counts = pd.read_csv(out / "counts.csv")
    heads = counts[counts.component == "head"].set_index(["layer", "head"])
    assert (heads.n_dla == value("carries_dla_head").reindex(heads.index).astype(int)).all()
    assert len(counts) == lm.n_layers * (lm.text_config.num_attention_heads + 1) and (counts.n_wrong_yes == 1).all()
    carriers = [f"{a}.{b}" for (a, b), n in heads.n_either.items() if n > 0]
    assert carriers and all(c in s["carriers"] for c in carriers)
    found = [v for k, v in adhh._FOUND.items() if k[1:] == (None, 1)]
    assert [f"{a}.{b}" for a, b in found[-1]] == s["adhh_heads"]
    ivs = pd.read_csv(out / "interventions.csv").set_index("intervention")
    assert list(ivs.index) == list(PUBLISHED)
    pai_layers = resolve("pai").layers(lm.n_layers)
    expected = sorted(c for c in carriers if int(c.split(".")[0]) in pai_layers)
    assert sorted(str(ivs.loc["pai", "acts_on"]).split(", ")) == (expected or ["none"])
    assert "carriers of the wrong Yes" in printed and "AD-HH finds" in printed
    html = (out / "attribute.html").read_text()
    assert "Wrong Yes answers each head and MLP carries" in html and "What each intervention edits" in html
