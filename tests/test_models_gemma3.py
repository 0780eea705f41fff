"""Gemma 3 (``Gemma3ForConditionalGeneration``) end to end, on tiny random checkpoints built and saved here.

The checkpoint: a 32-px SigLIP tower of 4-px patches (8 × 8) average-pooled to 16 soft tokens (a 4 × 4 grid), three
Gemma 3 text layers (sliding, global, sliding) with per-head q/k norms, ``query_pre_attn_scalar`` ≠ head_dim, a local
rotary base and a linearly scaled global one, every norm weight away from Gemma's 0 (its ``1 + w`` matters). The
tokenizer is the embedded one with Gemma's image tokens added (``<start_of_image>``, ``<image_soft_token>``,
``<end_of_image>``). The same weights are saved twice: with a sliding window of 26 tokens (shorter than the prompt:
the decision token's sliding layers see the image's last 8 tokens only; the one-forward trace is exact past it) and
of 128 (longer: pope's cached prefix and explain's continuations, which refuse prompts past a window, run on it).

References are plain transformers forwards of each prompt alone (``output_attentions``, float32): the processor's
``token_type_ids`` make one image's tokens attend to each other both ways, so every layer after the first sees other
image keys than a causal run would; the decision token's own row is causal (its row is the same under either mask,
but the keys it reads are not).
"""

import dataclasses

import numpy as np
import pytest
import torch
from plain_refs import plain_forward, yes_no_margin
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from mclcbf_diag.embedded.build import CHAT_TEMPLATE, build_tokenizer, padded_vocab_size
from mclcbf_diag.embedded.world import sample_scene

try:
    from transformers.models.gemma3 import Gemma3ImageProcessorPil as ImageProcessor
except ImportError:  # 5.18 names the PIL processor Gemma3ImageProcessor
    from transformers.models.gemma3 import Gemma3ImageProcessor as ImageProcessor

TOL = 1e-5
PROMPT = "USER: <image>\nIs there a dog in the image?\nASSISTANT:"
QUESTIONS = ["Is there a dog in the image?", "Is there a cat in the image?"]
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
WINDOW = 26  # the decision token (position 41) sees keys 16 … 41: half the image (8 … 23)


def tiny_processor() -> Gemma3Processor:
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *IMAGE_TOKENS.values()]})
    tok._set_model_specific_special_tokens(IMAGE_TOKENS)  # tok.boi_token, tok.image_token_id, …
    images = ImageProcessor(size={"height": 32, "width": 32})
    return Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=16, chat_template=CHAT_TEMPLATE)


def tiny_model(tok) -> Gemma3ForConditionalGeneration:
    text = Gemma3TextConfig(vocab_size=padded_vocab_size(tok), hidden_size=64, intermediate_size=96,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            query_pre_attn_scalar=24, layer_types=LAYER_TYPES, sliding_window=16,
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                             "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 10000.0}},
                            max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=4)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                          boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                          image_token_index=tok.image_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # Gemma's x̂·(1 + w): w away from 0
                p.copy_(torch.randn_like(p) * 0.5)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)  # initialised to 0
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    processor = tiny_processor()
    model = tiny_model(processor.tokenizer)
    out = {}
    for window in (WINDOW, 128):
        model.config.text_config.sliding_window = window
        folder = tmp_path_factory.mktemp(f"gemma3_w{window}")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        out[window] = str(folder)
    return out


@pytest.fixture(scope="module")
def windowed(folders):
    from mclcbf_diag.models import load_model

    return load_model(folders[WINDOW])


@pytest.fixture(scope="module")
def g3(folders):
    from mclcbf_diag.models import load_model

    return load_model(folders[128])


def _image(k: int):
    return sample_scene(2, k).image()


def _prompt(question: str) -> str:
    return PROMPT.replace(QUESTIONS[0], question)


def test_gemma3_is_a_supported_family_with_its_adapter(windowed):
    from mclcbf_diag.models.adapter import GEMMA3, TEXT_MATH
    from mclcbf_diag.models.families import config_problem

    assert type(windowed.model).__name__ == "Gemma3ForConditionalGeneration" and windowed.adapter is GEMMA3
    assert config_problem(windowed.model.config.to_dict()) is None
    assert TEXT_MATH["gemma3_text"].window == "attention"
    enc = windowed.inputs(PROMPT, _image(0))
    image = enc["input_ids"][0] == windowed.tokens.image_token_id
    assert int(image.sum()) == 16 and windowed.image_grid(enc) == (4, 4)  # the pooled grid, not the 8 × 8 patches
    assert torch.equal(enc["token_type_ids"][0].bool(), image)
    assert torch.equal(windowed.grid_mask(image), image)
    w = [windowed.layer_weights(i).window for i in range(3)]
    positions = torch.nonzero(image).flatten()
    decision = len(image) - 1
    assert w == [WINDOW, None, WINDOW] and positions[0] <= decision - WINDOW < positions[-1]  # half the image hidden


def test_the_image_tokens_attend_both_ways_and_that_matters(windowed):
    """The reference is not a causal run: the image's first token sees its last one, and the decision token's
    layer-1 row differs from a causal run's."""
    inputs, out, _ = plain_forward(windowed, PROMPT, _image(0))
    image = torch.nonzero(inputs["input_ids"][0] == windowed.tokens.image_token_id).flatten()
    assert float(out.attentions[1][0, :, image[0], image[-1]].min()) > 0
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        plain = windowed.model(**causal, output_attentions=True)
    assert not torch.allclose(plain.attentions[1][0, :, -1], out.attentions[1][0, :, -1], atol=1e-4)


def test_config_problems_are_refused_in_one_line(windowed):
    from mclcbf_diag.models.families import config_problem

    cfg = windowed.model.config.to_dict()
    for key, value, fragment in (("attn_logit_softcapping", 50.0, "soft-capping"),
                                 ("use_bidirectional_attention", True, "bidirectionally"),
                                 ("model_type", "gemma2", "text model is 'gemma2'")):
        bad = {**cfg, "text_config": {**cfg["text_config"], key: value}}
        problem = config_problem(bad)
        assert fragment in problem and "\n" not in problem
    llava = {"model_type": "llava", "text_config": cfg["text_config"]}
    assert "text model is 'gemma3_text'" in config_problem(llava)  # only under Gemma 3's own adapter


def test_pan_and_scan_is_refused_in_one_line(windowed):
    from mclcbf_diag.errors import UserError

    processor = windowed.processor
    enc = processor(text=PROMPT.replace("<image>", "<start_of_image>"), images=_image(0).resize((96, 32)),
                    do_pan_and_scan=True, pan_and_scan_min_crop_size=8, return_tensors="pt")
    assert len(enc["pixel_values"]) > 1  # the original and its crops
    with pytest.raises(UserError, match=r"pan-and-scan crops are not measured yet"):
        windowed.image_grid(enc)


def test_a_processor_that_crops_is_refused_before_the_weights(folders, tmp_path):
    import shutil

    from mclcbf_diag.errors import UserError
    from mclcbf_diag.models.loading import prepare_model

    folder = tmp_path / "pan_and_scan"
    shutil.copytree(folders[128], folder)
    processor = tiny_processor()
    processor.image_processor.do_pan_and_scan = True
    processor.save_pretrained(folder)
    with pytest.raises(UserError, match=r"crops images \(do_pan_and_scan\).*set do_pan_and_scan to false"):
        prepare_model(str(folder))


def test_trace_equals_a_plain_forward_and_its_look_ahead(windowed):
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.report.overlay import attention_maps

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1, 2])
    lm = windowed
    for k, question in enumerate(QUESTIONS):
        inputs, out, outputs = plain_forward(lm, _prompt(question), _image(k))
        result = trace_sample(lm, question, _image(k), config)
        r = result.records
        base = r[(r.condition == "baseline") & (r["head"] == -1) & (r.phase == "prefill")]
        per = {m: dict(zip(g.layer, g.value)) for m, g in base.groupby("metric")}
        image = inputs["input_ids"][0] == lm.tokens.image_token_id
        norm, head = lm.final_norm(), lm.model.lm_head
        for i in range(lm.n_layers):
            want = float(out.attentions[i][0, :, -1, image].sum(-1).mean())
            assert want > 0.05  # in the sliding layers too: the window keeps some image keys
            assert per["attn_image_mass"][i] == pytest.approx(want, rel=0, abs=TOL)
            assert per["barrier_h"][i] == pytest.approx(want, rel=0, abs=TOL)
            assert per["resid_pre_norm"][i] == pytest.approx(float(out.hidden_states[i][0, -1].norm()), rel=TOL)
            assert per["resid_post_norm"][i] == pytest.approx(float(outputs[i][0, -1].norm()), rel=TOL)
            with torch.no_grad():
                lens = yes_no_margin(lm, head(norm(outputs[i][0, -1])))
            assert per["logit_lens_margin"][i] == pytest.approx(lens, rel=0, abs=TOL)
        margin = yes_no_margin(lm, out.logits[0, -1])
        assert result.value("final_margin", "baseline") == pytest.approx(margin, rel=0, abs=TOL)
        assert "lookahead_miss_layers" not in result.summary()
        assert result.value("final_margin", "steered") != pytest.approx(margin, rel=0, abs=TOL)  # it steered
        grid = lm.grid_mask(result.baseline.detected)
        maps = attention_maps(result.baseline, grid)
        want = out.attentions[1][0, :, -1].mean(0)[grid.nonzero().flatten()].reshape(4, 4)
        np.testing.assert_allclose(maps["layer 1"], want.numpy(), rtol=0, atol=1e-6)


def test_the_overlay_of_other_query_tokens_equals_the_plain_rows(g3):
    """The overlay's rows of an image token (which sees the whole image, later tokens too) and of a text token."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.report.overlay import token_attention_maps

    inputs, out, _ = plain_forward(g3, PROMPT, _image(0))
    image = inputs["input_ids"][0] == g3.tokens.image_token_id
    first, last = (int(p) for p in torch.nonzero(image).flatten()[[0, -1]])
    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    maps = token_attention_maps(g3, inputs, config, [first, last + 3])
    for q in (first, last + 3):
        for layer in range(g3.n_layers):
            want = out.attentions[layer][0, :, q].mean(0)[image].reshape(4, 4).numpy()
            np.testing.assert_allclose(maps[q]["baseline"][f"layer {layer}"], want, rtol=0, atol=1e-6)
    assert float(out.attentions[0][0, :, first, last].min()) > 0  # the first image token sees the last


def test_the_steered_trace_equals_a_plain_forward_of_its_edit(windowed):
    """The steered run feeds the baseline's embeddings: with the image's token types, so it runs the same model."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.engine.runner import Keep, forward, with_embeds

    lm = windowed
    inputs = lm.inputs(PROMPT, _image(1))
    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    base = forward(lm, inputs, config, steer=False, keep=Keep(embeds=True)).captures[0]
    again = forward(lm, with_embeds(inputs, base), config, steer=False).captures[0]
    _, out, _ = plain_forward(lm, PROMPT, _image(1))
    for cap in (base, again):
        want = yes_no_margin(lm, out.logits[0, -1])
        assert yes_no_margin(lm, cap.steps[0].final_logits) == pytest.approx(want, abs=TOL)


def test_batches_with_the_cached_prefix_equal_plain_forwards(g3):
    """pope's path: 4 prompts of different lengths over 2 images, left-padded (token_type_ids padded alike), the
    vision tower once per image, the baseline against each prompt alone, the cached-prefix continuation against a
    full re-run."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.engine.batch import answer_batch, answer_pair, baseline_prefix, batch_inputs

    questions = [QUESTIONS[0], "Is there a red cat on the left of the image?"]
    prompts = [_prompt(q) for q in questions * 2]
    images = [_image(0), _image(0), _image(1), _image(1)]
    inputs = batch_inputs(g3, prompts, images)
    assert "pixel_values" not in inputs and len(inputs["mm_encoder_outputs"]["image"].pooler_output) == 4
    image = inputs["input_ids"] == g3.tokens.image_token_id
    assert torch.equal(inputs["token_type_ids"].bool(), image) and bool((inputs["attention_mask"] == 0).any())
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1, 2])
    base, steered = answer_pair(g3, prompts, images, iv, inputs=inputs)
    full = answer_batch(g3, prompts, images, iv, True, inputs=inputs)
    shared = answer_pair(g3, prompts, images, iv, inputs=inputs, baseline=baseline_prefix(g3, inputs))  # pope's
    assert [r["margin"] for r in shared[1]] == pytest.approx([r["margin"] for r in steered], rel=0, abs=TOL)
    for b, (prompt, img) in enumerate(zip(prompts, images)):
        _, out, _ = plain_forward(g3, prompt, img)
        margin = yes_no_margin(g3, out.logits[0, -1])
        assert base[b]["margin"] == pytest.approx(margin, rel=0, abs=TOL)
        assert steered[b]["margin"] == pytest.approx(full[b]["margin"], rel=0, abs=TOL)
        assert steered[b]["margin"] != pytest.approx(margin, rel=0, abs=TOL)  # the step moved it


def test_pope_runs_with_the_cached_prefix(g3, tmp_path):
    import json

    from mclcbf_diag.cli import main

    assert main(["pope", "--model", g3.source, "--split", "adversarial", "--limit", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "p")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["baseline_margin"] == r["baseline_margin"] for r in rows)


def test_generation_runs_with_a_look_ahead_at_each_layer(g3):
    """Decode steps call the rotary module twice each (a local and a global base): the look-ahead reads each layer's
    own (cos, sin), so generation under the barrier runs, and its prefill equals the plain forward."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1, 2])
    result = trace_sample(g3, QUESTIONS[0], _image(0), config, max_new_tokens=2)
    inputs, out, _ = plain_forward(g3, PROMPT, _image(0))
    r = result.records
    base = r[(r.condition == "baseline") & (r["head"] == -1) & (r.phase == "prefill") & (r.metric == "barrier_h")]
    image = inputs["input_ids"][0] == g3.tokens.image_token_id
    want = [float(out.attentions[i][0, :, -1, image].sum(-1).mean()) for i in range(g3.n_layers)]
    assert base.sort_values("layer").value.tolist() == pytest.approx(want, rel=0, abs=TOL)
    assert set(r[r.phase == "decode"].decode_step) == {1}


@pytest.mark.parametrize("name", ["vista", "adhh", "pai", "vcd"])
def test_methods_fed_embeddings_equal_their_batched_runs(g3, name):
    """A trace's steered run feeds the baseline's embeddings (and VISTA's steering vector is a forward of them):
    with the image's token types they equal pope's batched run from ids and shared image features."""
    from mclcbf_diag.engine.batch import answer_batch
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.interventions import resolve

    iv = resolve(name)
    traced = trace_sample(g3, QUESTIONS[1], _image(1), iv).value("final_margin", "steered")
    assert traced == pytest.approx(answer_batch(g3, [_prompt(QUESTIONS[1])], [_image(1)], iv, True)[0]["margin"],
                                   rel=0, abs=TOL)


def test_explain_localisation_and_flow_equal_the_trace(g3):
    """explain's units (batched continuations of one prefix forward) and localisation's patched runs give the
    trace's margins; flow runs."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.attribute import localisation
    from mclcbf_diag.experiments.explain import explain_sample
    from mclcbf_diag.experiments.flow import information_flow
    from mclcbf_diag.experiments.trace import trace_sample

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1, 2])
    ex = explain_sample(g3, QUESTIONS[0], _image(0), config, bisect_steps=2, sweep=False)
    traced = trace_sample(g3, QUESTIONS[0], _image(0), config)
    _, out, _ = plain_forward(g3, PROMPT, _image(0))
    margins = {"baseline": yes_no_margin(g3, out.logits[0, -1]), "steered": traced.value("final_margin", "steered")}
    for condition, want in margins.items():
        assert ex.trace.value("final_margin", condition) == pytest.approx(want, rel=0, abs=TOL)
    grid = localisation(g3, g3.inputs(PROMPT, _image(0)), config)
    assert (grid.clean, grid.corrupted) == pytest.approx((margins["steered"], margins["baseline"]), rel=0, abs=TOL)
    unpatched = grid.margins["resid:noise"][:, 0].tolist()  # the intervened run with nothing restored, per layer
    assert unpatched == pytest.approx([margins["steered"]] * g3.n_layers, rel=0, abs=TOL)
    flow = information_flow(g3, QUESTIONS[0], _image(0), window=1)
    assert len(flow) and np.isfinite(flow.select_dtypes("number").to_numpy()).all()


def test_a_unit_continued_from_inside_the_image_runs_the_whole_prompt(g3):
    """explain's units continue a cached prefix from their first edited position; one inside the image would run
    the image's later tokens causally, so for Gemma 3 the chunk runs the whole prompt: an intervention that edits
    nothing but says it may edit the image's third token gives the plain margin."""
    from mclcbf_diag.engine.units import Prefix, Unit, run_units
    from mclcbf_diag.interventions.base import Intervention

    class Inside(Intervention):
        name = "inside"

        def layers(self, n_layers):
            return (1,)

        def first_edited(self, row):
            return int(torch.nonzero(row.image).flatten()[2])

    prompts = [_prompt(QUESTIONS[0]), _prompt("Is there a red cat on the left of the image?")]
    prefix = Prefix(g3, prompts, [_image(0), _image(1)])
    got = run_units(prefix, [Unit(0, Inside()), Unit(1, Inside())], capture=False)
    for q, (prompt, image) in enumerate(zip(prompts, [_image(0), _image(1)])):
        _, out, _ = plain_forward(g3, prompt, image)
        assert yes_no_margin(g3, got[q][0]) == pytest.approx(yes_no_margin(g3, out.logits[0, -1]), rel=0, abs=TOL)


def test_direct_logit_attribution_is_refused_in_one_line(g3):
    """Gemma 3 normalises each attention and MLP output before the residual adds it: DLA's sum does not hold."""
    from mclcbf_diag.data.pope import PopeQuestion
    from mclcbf_diag.errors import UserError
    from mclcbf_diag.experiments.attribute import attribute_sample

    with pytest.raises(UserError, match=r"^direct logit attribution .* not measured for this model"):
        attribute_sample(g3, PopeQuestion(0, "", QUESTIONS[0], None, 0), _image(0), _image(1))


def test_trace_explain_and_flow_run_from_the_cli(g3, windowed, tmp_path):
    from mclcbf_diag.cli import main

    assert main(["trace", "--model", g3.source, "--sample", "0", "--overlay-token", "-2",
                 "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "trace.html").exists()
    # the CLI refuses a prompt past the sliding window in one line (explain and pope continue cached prefixes)
    assert main(["trace", "--model", windowed.source, "--sample", "0", "--out", str(tmp_path / "w")]) == 2
    assert main(["explain", "--model", g3.source, "--sample", "0", "--out", str(tmp_path / "e")]) == 0
    assert main(["flow", "--model", g3.source, "--sample", "0", "--window", "1", "--out", str(tmp_path / "f")]) == 0
