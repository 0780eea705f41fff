"""The logits site end to end: a decoding-level method's scores on every runner path, its readouts, its records.

The method here is made up for the test (the answer's logits plus one layer's readout, with a
plausibility cutoff); the references are plain HF forwards with ``output_hidden_states``.
"""

import math

import pytest
import torch

from mclcbf_diag import shipped
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image
from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs
from mclcbf_diag.engine.runner import Keep, forward, greedy
from mclcbf_diag.engine.units import Prefix, Unit, run_units
from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.catalog import KnockoutKnobs
from mclcbf_diag.interventions.contrast import plausible
from mclcbf_diag.interventions.decoding import DecodingMethod
from mclcbf_diag.interventions.knockout import AttentionKnockout
from mclcbf_diag.measurements.records import documented

READ = 1  # the readout layer (its output)


class LayerMix(DecodingMethod):
    """logits + dose · lm_head(h_READ), tokens under half the top one's probability ruled out."""

    name = "layer-mix-test"

    def readout_layers(self, n_layers):
        return (-1, READ)

    def readout(self, site):
        self.seen = {(i, norm): site.layer_logits(i, final_norm=norm) for i in (-1, READ) for norm in (True, False)}
        super().readout(site)

    def combine(self, site, row, logits, aux, dose):
        return logits + dose * self.seen[(READ, False)][row.index], plausible(logits, 0.5)


def reference(lm, prompt, image, dose=1.0):
    """Plain HF forward: the scores, and the readouts of hidden_states[READ + 1] and [0] with and without the norm."""
    with torch.no_grad():
        out = lm.model(**lm.inputs(prompt, image), output_hidden_states=True)
        hs, head, norm = out.hidden_states, lm.model.lm_head, lm.model.model.language_model.norm
        z = out.logits[0, -1].float()
        reads = {(i, n): head(norm(hs[i + 1][0, -1]) if n else hs[i + 1][0, -1]).float() for i in (-1, READ)
                 for n in (True, False)}
    scores = (z + dose * reads[(READ, False)]).masked_fill(z < math.log(0.5) + z.max(), -math.inf)
    return z, scores, reads


@pytest.fixture(scope="module")
def batch():
    qs = load_pope(shipped.pope_file("adversarial"))[4:7]
    prompts = [build_prompt(q.text) for q in qs]
    prompts[2] = prompts[2].replace("?", " anywhere at all?")  # three lengths: left padding
    return prompts, [load_image(resolve_image(q, shipped.IMAGES)) for q in qs]


def close(a, b):
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin)
    assert torch.allclose(a[fin], b[fin], atol=1e-4, rtol=1e-5)


def test_the_readouts_and_scores_of_one_run(embedded_model, batch):
    lm, (prompts, images) = embedded_model, batch
    iv = LayerMix()
    cap = forward(lm, lm.inputs(prompts[0], images[0]), iv).captures[0]
    z, scores, reads = reference(lm, prompts[0], images[0])
    for key, value in reads.items():
        close(iv.seen[key][0], value)
    close(cap.steps[0].final_logits, scores)
    rec = cap.row_records
    assert rec["decoding_model_margin"] == pytest.approx(float(z[lm.tokens.yes_id] - z[lm.tokens.no_id]), abs=1e-4)
    assert rec["decoding_cut_yes"] + rec["decoding_cut_no"] >= 1  # a confident model: one of them is cut at 0.5
    assert all(documented(m) for m in rec)
    # measuring: nothing opened, nothing recorded, the model's own logits
    base = forward(lm, lm.inputs(prompts[0], images[0]), iv, steer=False).captures[0]
    close(base.steps[0].final_logits, z)
    assert not any(m.startswith("decoding_") for m in base.row_records)


def test_every_runner_path_gives_the_same_scores(embedded_model, batch):
    lm, (prompts, images) = embedded_model, batch
    refs = [reference(lm, p, im, dose=0.5)[1] for p, im in zip(prompts, images)]
    inputs = batch_inputs(lm, prompts, images)
    iv = LayerMix()
    res = forward(lm, inputs, iv, keep=Keep(layers=False))
    last, records = res.logits, res.records
    ref_full = [reference(lm, p, im)[1] for p, im in zip(prompts, images)]
    for b in range(3):
        close(last[b], ref_full[b])
        assert "decoding_contrast_margin" in records[b][-1]
    # a mix of units: two doses and a knockout row in one forward, continued from the prompt's cache
    units = [Unit(0, iv, dose=0.5), Unit(1, AttentionKnockout(KnockoutKnobs(factor=0.5))), Unit(2, iv, dose=0.5),
             Unit(1, iv, dose=0.5)]
    got = run_units(Prefix(lm, prompts, images), units, capture=False)
    for (logits, rec), q in zip([got[0], got[2], got[3]], (0, 2, 1)):
        close(logits, refs[q])
        assert rec[-1]["decoding_model_margin"] == rec[-1]["decoding_model_margin"]
    # the batched answers and the answer pair (cached prefix) read the same scores
    pair = answer_pair(lm, prompts, images, iv)[1]
    alone = answer_batch(lm, prompts, images, iv, True)
    for a, b, r in zip(pair, alone, ref_full):
        m = float(r[lm.tokens.yes_id] - r[lm.tokens.no_id])
        assert a["answer"] == b["answer"] == ("yes" if m > 0 else "no")
        for got in (a["margin"], b["margin"]):  # NaN: both answers ruled out; ±inf: one of them
            assert (math.isnan(m) and math.isnan(got)) or got == m or abs(got - m) < 1e-3


def test_captured_generation_is_refused_and_answers_are_generated_by_the_loop(embedded_model, batch):
    from mclcbf_diag.engine.batch import batch_inputs
    from mclcbf_diag.engine.decode import generate

    lm, (prompts, images) = embedded_model, batch
    # the runner refuses generate() under nnsight (trace takes engine/decode's loop instead)
    with pytest.raises(UserError, match="generate through mclcbf_diag.engine.decode.generate"):
        forward(lm, lm.inputs(prompts[0], images[0]), LayerMix(), generate=greedy(2))
    got = answer_batch(lm, prompts[:1], images[:1], LayerMix(), True, max_new_tokens=2)
    inputs = batch_inputs(lm, prompts[:1], images[:1], share_images=False)
    gen = generate(lm, inputs, LayerMix(), max_new_tokens=2)
    new = gen.sequences[0, inputs["input_ids"].shape[1]:]
    assert got[0]["text"] == lm.processor.tokenizer.decode(new, skip_special_tokens=True)


def test_trace_prints_the_margins_the_method_combined():
    import pandas as pd

    from mclcbf_diag.interventions.decoding import decoding_lines, decoding_summary

    steered = pd.DataFrame({"decoding_model_margin": [-6.327], "decoding_aux_margin": [-6.61],
                            "decoding_contrast_margin": [-6.045], "decoding_cut_yes": [1.0], "decoding_cut_no": [0.0],
                            "resid_post_norm": [3.0]}, index=pd.Index([-1], name="layer"))
    assert decoding_lines(decoding_summary(steered)) == [
        "  decoding margins: model -6.327, contrasted with -6.61, combined -6.045 before the cutoff; the cutoff "
        "ruled out Yes"]
    assert decoding_lines(decoding_summary(steered.drop(index=-1))) == []  # not a decoding method's run


def test_the_default_combine_is_the_contrast_of_the_knobs_a_method_names():
    """VCD and CausalMM name their strength and cutoff knobs and share DecodingMethod's combine; by hand, with
    ℓ = (2, 0, 1), ℓ' = (1, 1, 1), strength 1 at dose 0.5: 1.5·ℓ − 0.5·ℓ' = (2.5, −0.5, 1); cutoff 0.2 keeps the
    tokens with ℓ ≥ log 0.2 + 2 ≈ 0.39. Without a cutoff knob every token is kept; without a strength knob a method
    must write its own."""
    from mclcbf_diag.interventions.causalmm import CausalMM, CausalMMKnobs
    from mclcbf_diag.interventions.vcd import VCD, VCDKnobs

    logits, aux = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    for iv in (VCD(VCDKnobs(alpha=1.0, beta=0.2)), CausalMM(CausalMMKnobs(gamma=1.0, epsilon=0.2))):
        assert type(iv).combine is DecodingMethod.combine
        scores, keep = iv.combine(None, None, logits, aux, 0.5)
        assert scores.tolist() == [2.5, -0.5, 1.0] and keep.tolist() == [True, False, True]

    class NoCutoff(VCD):
        cutoff_knob = None

    scores, keep = NoCutoff(VCDKnobs(alpha=2.0)).combine(None, None, logits, aux, 1.0)
    assert scores.tolist() == [4.0, -2.0, 1.0] and keep is None
    with pytest.raises(NotImplementedError, match="strength_knob"):
        DecodingMethod.combine(LayerMix(), None, None, logits, aux, 1.0)


@pytest.mark.parametrize("name", ["vcd", "dola", "causalmm", "opera", "pai", "vista"])
def test_a_measuring_run_reads_the_models_own_answer(embedded_model, batch, name):
    """A measuring (baseline) run opens no logits site: its final logits are the plain model's, with no decoding
    record, whatever the method."""
    from plain_refs import plain_model

    from mclcbf_diag.interventions import resolve

    lm, (prompts, images) = embedded_model, batch
    cap = forward(lm, lm.inputs(prompts[2], images[2]), resolve(name), steer=False).captures[0]
    with torch.no_grad():
        plain = plain_model(lm)(**lm.inputs(prompts[2], images[2]), logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(cap.steps[0].final_logits.float(), plain.float(), rtol=0, atol=1e-5)
    assert cap.steps[0].model_logits is None and not any(m.startswith("decoding_") for m in cap.row_records)
