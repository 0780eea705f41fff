"""``trace --max-new-tokens`` under a decoding-level method: every generated step recorded, the tokens the method chose.

A decoding-level method (VCD, DoLa …) chooses every token from its combined scores, so the trace's two runs are
:mod:`mclcbf_diag.engine.decode`'s loop with every layer captured. Checked here against independent routes:

* the tokens against the loop run on its own without captures (the routes whose greedy equals the released VCD and
  DoLa loops: ``tests/test_engine_decode.py``) and the generated text against ``pope --generate``'s
  (:func:`~mclcbf_diag.engine.batch.answer_batch`);
* step 0 against the first-token trace (a full forward of the prompt instead of a continuation of its cached
  prefix): the same records, each value within its noise floor (:mod:`floors`);
* every step's records against a plain trace with generation (``generate`` under nnsight, an activation edit):
  the same layers, heads and metrics, plus the method's own terms at layer −1;
* the CLI on the embedded model, end to end, and its one-line refusal of OPERA's beam search.

The question "Is there a dog?" about the adversarial split's first image makes the embedded model (and both
methods) go on past the answer for three tokens ("dog and fr"), so decode steps 1 and 2 exist.
"""

from __future__ import annotations

import json
import math

import floors
import pandas as pd
import pytest
import torch
from cli_refusals import refused

from mclcbf_diag import shipped
from mclcbf_diag.cli import main
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import answer_batch, batch_inputs
from mclcbf_diag.engine.decode import generate
from mclcbf_diag.errors import UserError
from mclcbf_diag.experiments.trace import decoded, trace_sample
from mclcbf_diag.interventions import resolve
from mclcbf_diag.interventions.dola import DoLa, DoLaKnobs
from mclcbf_diag.interventions.vcd import VCD, VCDKnobs
from mclcbf_diag.measurements import noise

TEXT = "Is there a dog?"
N = 3
KEY = ["condition", "layer", "head", "metric"]
METHODS = {"vcd": lambda: VCD(VCDKnobs()), "dola": lambda: DoLa(DoLaKnobs())}
EXACT = {"answer_yes", "top_token_id", "top_is_yes_no", "logits_finite", "nonfinite_values", "sink_is_bos",
         "sink_position", "decoding_cut_yes", "decoding_cut_no", "dola_premature_layer"}


@pytest.fixture(scope="module")
def image():
    return load_image(resolve_image(load_pope(shipped.pope_file("adversarial"))[0], shipped.IMAGES))


@pytest.fixture(scope="module")
def traces(embedded_model, image):
    """Per method: the generated trace and the first-token trace of the question."""
    return {name: (trace_sample(embedded_model, TEXT, image, make(), max_new_tokens=N),
                   trace_sample(embedded_model, TEXT, image, make()))
            for name, make in METHODS.items()}


def steps_of(records: pd.DataFrame, condition: str) -> list[tuple[str, int]]:
    sub = records[records.condition == condition]
    return sorted({(str(p), int(s)) for p, s in sub[["phase", "decode_step"]].itertuples(index=False)},
                  key=lambda t: t[1])


def keys(records: pd.DataFrame, condition: str, phase: str, step: int) -> set:
    r = records[(records.condition == condition) & (records.phase == phase) & (records.decode_step == step)]
    return {(int(a), int(h), str(m)) for a, h, m in r[["layer", "head", "metric"]].itertuples(index=False)}


def premature_floor(lm, per_layer: pd.DataFrame) -> float:
    """DoLa's premature margin ``(w_Yes − w_No) · h`` (no final norm) of two routes: ``‖w_Yes − w_No‖`` times the
    floor of a state ``h`` at the largest residual norm recorded, after the whole model
    (``noise.propagation_floor``)."""
    w = lm.unembed_weight()
    row = float((w[lm.tokens.yes_id] - w[lm.tokens.no_id]).float().norm())
    norms = per_layer[per_layer.metric.isin(["resid_post_norm", "resid_pre_in_norm"])].value
    return row * noise.propagation_floor(torch.float32, float(norms.max()), floors.depth(lm))


def routed_mass_floor(lm, x_a: torch.Tensor, x_b: torch.Tensor, layer: int, head: int, m: float) -> float:
    """Floor of an attention mass of two routes whose decision token entered ``layer`` as ``x_a`` and ``x_b`` (a full
    forward of the prompt, a continuation of its cached prefix: the other keys are the same plain forward's).

    To first order in the measured difference (CONTRIBUTING "Tolerances", rule 2): a softmax row moves by
    ``δp_j = p_j (δs_j − Σ p δs)``, so a mass m over any set of keys by at most ``2 m (1 − m) max_j |δs_j|``; a score
    ``s_j = scaling · q · k_j`` by ``scaling (‖δq‖ max‖k‖ + ‖q‖ ‖δk_own‖)``, with ``δq``, ``δk_own`` the head's
    projections of the measured ``norm(x_b) − norm(x_a)`` (RoPE keeps norms) and ``max‖k‖ ≤ ‖W_k‖₂ ‖γ‖_∞ √d + ‖b_k‖``
    (a normed state is at most ``‖γ‖_∞ √d``). Plus the mass's own float32 rounding (``floors.mass_floor``)."""
    w = lm.layer_weights(layer).to(torch.float64)
    assert w.q_norm_weight is None and w.k_norm_weight is None  # the embedded model (LLaMA): no per-head norms
    hd, d = w.head_dim, w.ln_weight.numel()
    rows = slice(head * hd, (head + 1) * hd)
    kv = head // (w.n_heads // w.n_kv_heads)
    wq, wk = w.q_weight[rows], w.k_weight[kv * hd:(kv + 1) * hd]
    bq = 0 if w.q_bias is None else w.q_bias[rows]
    bk = 0.0 if w.k_bias is None else float(w.k_bias[kv * hd:(kv + 1) * hd].norm())
    ya, yb = w.norm(x_a.double()), w.norm(x_b.double())
    dq, dk, q = float((wq @ (yb - ya)).norm()), float((wk @ (yb - ya)).norm()), float((wq @ ya + bq).norm())
    k_max = float(torch.linalg.matrix_norm(wk, 2)) * float(w.ln_weight.abs().max()) * math.sqrt(d) + bk
    return floors.mass_floor(m) + 2 * m * (1 - m) * w.scaling * (dq * k_max + q * dk)


def tolerance(lm, name: str, metric: str, want: float, per_layer: pd.DataFrame) -> float:
    """The noise floor of one record computed by two routes (a full forward and a cached continuation); attention
    masses: :func:`routed_mass_floor`, not here."""
    margin = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)
    if metric in EXACT:
        return 0.0  # a count, a flag or an index: the same in both routes
    if metric in ("p_yes", "p_no"):
        return floors.prob_floor(lm)
    if metric.startswith("resid_"):  # a residual's norm after at most every layer of the model
        return floors.state_floor(torch.tensor([want]), floors.depth(lm))
    if metric.startswith("final_logit:"):
        return floors.logit_floor(lm)
    if metric in ("logit_lens_margin", "decoding_model_margin", "decoding_aux_margin"):
        return margin
    if metric in ("final_margin", "decoding_contrast_margin"):  # the combined scores' margin (the steered run's)
        if name == "vcd":
            return (1 + 2 * VCDKnobs().alpha) * margin  # (1 + α)·z − α·z_noised
        return margin + premature_floor(lm, per_layer)  # log p_final − log p_premature: the normalisers cancel
    return math.nan  # not compared (the norms' Jacobian gains, propagation: ratios and differences of the above)


def same(got: float, want: float, tol: float) -> bool:
    """Equal (±inf: a token the cutoff ruled out; NaN: both ruled out) or within ``tol``."""
    return (math.isnan(got) and math.isnan(want)) or got == want or abs(got - want) <= tol


@pytest.mark.parametrize("name", list(METHODS))
def test_generated_trace_is_the_decode_loop_and_pope_generate(embedded_model, image, traces, name):
    lm = embedded_model
    result, _ = traces[name]
    prompt = build_prompt(TEXT)
    inputs = batch_inputs(lm, [prompt], [image], share_images=False)
    S = inputs["input_ids"].shape[1]
    for cap, steer in ((result.steered, True), (result.baseline, False)):
        loop = generate(lm, inputs, METHODS[name](), max_new_tokens=N, steer=steer, keep_scores=True)
        assert cap.generated[0].tolist() == loop.sequences[0].tolist()  # every token, prompt first
        assert len(cap.steps) == N == loop.new_tokens
        assert [(s.phase, s.decode_step) for s in cap.steps] == [("prefill", 0), ("decode", 1), ("decode", 2)]
        pope = answer_batch(lm, [prompt], [image], METHODS[name](), steer, max_new_tokens=N)[0]["text"]
        assert decoded(lm, cap) == pope == lm.processor.tokenizer.decode(loop.sequences[0, S:],
                                                                          skip_special_tokens=True)
        if not steer:
            continue
        per_step = result.records[result.records.condition == "steered"]
        for k, step in enumerate(loop.steps):  # the method's margin at every step: the loop's scores'
            at = per_step[(per_step.decode_step == k) & (per_step.layer == -1)].set_index("metric").value
            want = float(step["scores"][0, lm.tokens.yes_id] - step["scores"][0, lm.tokens.no_id])
            tol = tolerance(lm, name, "final_margin", want, per_step[per_step.decode_step == k])
            assert same(at["final_margin"], want, tol), (k, at["final_margin"], want, tol)
            assert "decoding_model_margin" in at and "decoding_contrast_margin" in at
            assert ("decoding_aux_margin" in at) == (name == "vcd")  # DoLa's contrast is a layer, not a forward
    assert decoded(lm, result.steered) == "dog and fr"  # the three tokens the module docstring promises


@pytest.mark.parametrize("name", list(METHODS))
def test_step_zero_records_are_the_first_token_traces(embedded_model, traces, name):
    lm = embedded_model
    generated, first = traces[name]
    a = generated.records[(generated.records.phase == "prefill")].set_index(KEY).value
    b = first.records.set_index(KEY).value
    assert set(a.index) == set(b.index)  # the same conditions (view:noised image for VCD), layers, heads, metrics
    assert ("view:noised image" in set(first.records.condition)) == (name == "vcd")
    entering = {i: (first.baseline.steps[0].layers[i].resid_pre, generated.baseline.steps[0].layers[i].resid_pre)
                for i in range(lm.n_layers)}  # a decoding-level method edits no activation: the steered run's too
    compared = 0
    for key, want in b.items():
        cond, layer, head, metric = key
        got = a[key]
        if metric.startswith("attn_"):  # per head; the mean over heads within the mean of their floors
            heads = range(lm.text_config.num_attention_heads) if head < 0 else [head]
            tol = sum(floors.mass_floor(b[(cond, layer, h, metric)]) if cond.startswith("view:")  # a full forward
                      else routed_mass_floor(lm, *entering[layer], layer, h, b[(cond, layer, h, metric)])
                      for h in heads) / len(heads)  # of the same inputs in both routes: a view's own floor
        else:
            tol = tolerance(lm, name, metric, want, first.records[first.records.condition == cond])
        if math.isnan(tol):
            continue
        compared += 1
        assert same(got, want, tol), (key, got, want, tol)
    assert compared > 0.5 * len(b)


def test_every_step_records_what_a_plain_generated_trace_records(embedded_model, image, traces):
    """The plain trace: PAI's attention edit alone (no logit part: ``generate`` under nnsight), whose measuring
    baseline opens no site, so its baseline records are the probes alone, as a decoding-level method's are."""
    plain = trace_sample(embedded_model, TEXT, image, resolve("pai", None, ["contrast_gamma=1"]), max_new_tokens=N)
    want_steps = [("prefill", 0), ("decode", 1), ("decode", 2)]
    assert steps_of(plain.records, "baseline") == want_steps
    for name, (result, _) in traces.items():
        r = result.records
        assert steps_of(r, "baseline") == steps_of(r, "steered") == want_steps
        if name == "vcd":
            assert steps_of(r, "view:noised image") == want_steps  # the auxiliary forward of every step
        for phase, s in want_steps:
            base = keys(r, "baseline", phase, s)
            assert base == keys(plain.records, "baseline", phase, s)
            if name == "vcd":
                assert keys(r, "view:noised image", phase, s) == base
            prop = {k for k in keys(r, "steered", phase, s) if k[2].startswith("propagation")}
            assert prop == {k for k in keys(plain.records, "steered", phase, s) if k[2].startswith("propagation")}
            own = keys(r, "steered", phase, s) - base - prop
            assert own and all(layer == -1 and head == -1 and m.split("_")[0] in ("decoding", "dola")
                               for layer, head, m in own), own


def test_trace_cli_generates_under_vcd_and_writes_its_page(tmp_path, capsys, embedded_model):
    out = tmp_path / "t"
    assert main(["trace", "--sample", "0", "--intervention", "vcd", "--max-new-tokens", str(N), "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert {"config.json", "records.csv", "records.parquet", "trace.html"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "config.json").read_text())
    q = load_pope(shipped.pope_file("adversarial"))[0]
    img = load_image(resolve_image(q, shipped.IMAGES))
    pope = answer_batch(embedded_model, [build_prompt(q.text)], [img], VCD(VCDKnobs()), True, max_new_tokens=N)
    assert meta["summary"]["text_after"] == pope[0]["text"]
    assert f"steered {pope[0]['text']!r}" in printed
    records = pd.read_parquet(out / "records.parquet")
    n = len(steps_of(records, "steered"))
    assert n >= 2 and set(records[records.decode_step > 0].phase) == {"decode"}
    page = (out / "trace.html").read_text()
    assert "decode step 1" in page and "Across generation steps" in page


def test_trace_refuses_operas_beam_before_torch_loads(tmp_path):
    _, torch_loaded = refused(["trace", "--intervention", "opera", "--max-new-tokens", "2"], tmp_path,
                              "--intervention opera --max-new-tokens 2", "beam search",
                              "pope --intervention opera --decoding beam")
    assert not torch_loaded and not (tmp_path / "reports").exists()


def test_trace_sample_refuses_operas_beam_as_the_cli_does(embedded_model, image, tmp_path):
    """The library call refuses OPERA with ``max_new_tokens`` too (it would otherwise run the step loop greedily under
    OPERA's first-token penalty), with the CLI's line, before any forward."""
    line, _ = refused(["trace", "--intervention", "opera", "--max-new-tokens", "2"], tmp_path)
    with pytest.raises(UserError) as err:
        trace_sample(embedded_model, TEXT, image, resolve("opera"), max_new_tokens=2)
    assert line == f"mclcbf-diag: error: {err.value}"


def test_the_loops_captures_of_a_padded_batch_are_each_rows_own(embedded_model):
    """``generate(..., keep=Keep())`` on three left-padded questions of three lengths: the same tokens as the loop
    without captures, and each row's run holds its own unpadded sequence and one step per token it read, up to the
    step that chose its end token, each with the scores that step chose from."""
    from plain_refs import three_questions

    from mclcbf_diag.engine.decode import end_ids
    from mclcbf_diag.engine.runner import Keep

    lm = embedded_model
    batch = batch_inputs(lm, *three_questions(), share_images=False)
    kept = generate(lm, batch, VCD(VCDKnobs()), max_new_tokens=N, keep=Keep(), keep_scores=True)
    plain = generate(lm, batch, VCD(VCDKnobs()), max_new_tokens=N)
    assert torch.equal(kept.sequences, plain.sequences)
    S, lengths = batch["input_ids"].shape[1], batch["attention_mask"].sum(-1).tolist()
    assert len(set(lengths)) == 3
    for b, cap in enumerate(kept.captures()):
        pad, n = S - lengths[b], len(cap.steps)
        assert cap.prompt_len == lengths[b] == len(cap.detected)
        assert int(cap.detected.sum()) == int((batch["input_ids"][b] == lm.tokens.image_token_id).sum())
        assert cap.generated[0].tolist() == kept.sequences[b, pad:S + n].tolist()
        assert (int(cap.generated[0, -1]) in end_ids(lm)) == (n < kept.new_tokens)  # it stopped at its end token
        assert [(s.phase, s.decode_step) for s in cap.steps] == [("prefill", 0)] + [("decode", k) for k in range(1, n)]
        for k, step in enumerate(cap.steps):  # exact: the scores the step chose from are its captured final logits
            assert torch.equal(step.final_logits.float().cpu(), kept.steps[k]["scores"][b])
            assert step.n_keys == lengths[b] + k
