"""Qwen2.5-VL (and Qwen2-VL) end to end: tiny random checkpoints built here (a 2-block vision tower of 14-px patches
merged 2 × 2, 2 Qwen2 text layers with M-RoPE sections [2, 3, 3] and norms away from 1, an image processor whose
pixel budget makes an image 4–20 tokens), saved and loaded the way users load one. References are plain
transformers forwards of each prompt alone (output_attentions, float32): the model computes its own 3-D positions."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from plain_refs import assert_overlay_equals_plain, assert_trace_equals_plain, plain_forward, yes_no_margin
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from mclcbf_diag import barrier as B
from mclcbf_diag.embedded.build import CHAT_TEMPLATE, build_tokenizer, padded_vocab_size
from mclcbf_diag.embedded.world import sample_scene

TOL = 1e-5
PROMPT = "USER: <image>\nIs there a dog in the image?\nASSISTANT:"
QUESTIONS = ["Is there a dog in the image?", "Is there a cat in the image?"]
IMAGES = [(100, 200), (300, 120)]  # (height, width): a wide one and a tall one, non-square merged grids
SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _build(folder, config_class, model_class, **vision):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *SPECIAL]})
    tok.chat_template = CHAT_TEMPLATE
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 20},
                                      patch_size=14, merge_size=2, temporal_patch_size=2)
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=padded_vocab_size(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = config_class(text_config=text, vision_config=dict(depth=2, patch_size=14, spatial_merge_size=2,
                                                               temporal_patch_size=2, **vision),
                          image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                          vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                          tie_word_embeddings=False)
    torch.manual_seed(1)
    model = model_class(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    model.save_pretrained(folder)
    images.save_pretrained(folder)  # no video processor: the toolkit measures images (models/mrope.py)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def qwen_lm(tmp_path_factory):
    from mclcbf_diag.models import load_model

    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    _build(folder, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, hidden_size=32, intermediate_size=64,
           num_heads=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
    return load_model(str(folder))


def _image(k: int):
    h, w = IMAGES[k]
    return sample_scene(2, k).image().resize((w, h))


def _prompt(question: str) -> str:
    return PROMPT.replace(QUESTIONS[0], question)


def test_qwen_is_a_supported_family_with_its_grid_and_positions(qwen_lm):
    from mclcbf_diag.models.adapter import QWEN_VL
    from mclcbf_diag.models.families import config_problem
    from mclcbf_diag.models.mrope import position_ids

    assert type(qwen_lm.model).__name__ == "Qwen2_5_VLForConditionalGeneration" and qwen_lm.adapter is QWEN_VL
    assert config_problem(qwen_lm.model.config.to_dict()) is None
    flat = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "vision_config": {"depth": 32}}  # the hub's flat files
    assert config_problem(flat) is None
    assert "Qwen3-VL-MoE" in config_problem({"model_type": "qwen3_vl_moe"})  # Qwen3-VL: tests/test_models_qwen3_vl.py
    enc = qwen_lm.inputs(PROMPT, _image(0))
    assert qwen_lm.image_grid(enc) == (3, 6)  # 100 × 200 px → 6 × 12 patches → 3 × 6 merged tokens
    image = enc["input_ids"][0] == qwen_lm.tokens.image_token_id
    assert int(image.sum()) == 18 and torch.equal(qwen_lm.grid_mask(image), image)
    pos = position_ids(qwen_lm, enc)[:, 0]
    first = int(torch.nonzero(image)[0])
    assert pos[:, first].tolist() == [first] * 3 and pos[1:, image].max() == first + 5  # rows 0–2, columns 0–5
    assert pos[:, -1].tolist() == [len(image) - 1 - 18 + 6] * 3  # the text continues from first + max(3, 6)


def test_the_prompt_length_check_bounds_the_image_tokens(qwen_lm):
    from mclcbf_diag.models.loading import check_prompt_lengths
    from mclcbf_diag.models.mrope import token_bound

    assert token_bound(qwen_lm.processor) == 20  # max_pixels over a merged 28 × 28 patch
    big = qwen_lm.inputs(PROMPT, sample_scene(2, 0).image().resize((900, 900)))
    n = int((big["input_ids"][0] == qwen_lm.tokens.image_token_id).sum())
    assert n <= 20 and check_prompt_lengths(qwen_lm, [PROMPT]) >= len(big["input_ids"][0])


@pytest.mark.parametrize("k", [0, 1])
def test_qwen_trace_equals_a_plain_forward_and_its_look_ahead(qwen_lm, k):
    from mclcbf_diag.engine.batch import answer_batch
    from mclcbf_diag.experiments.trace import trace_sample

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1])
    inputs, out, layer_out = plain_forward(qwen_lm, _prompt(QUESTIONS[k]), _image(k))
    result = trace_sample(qwen_lm, QUESTIONS[k], _image(k), config)
    margin = assert_trace_equals_plain(qwen_lm, result, inputs, out, layer_out, TOL)
    steered = result.value("final_margin", "steered")
    assert steered != pytest.approx(margin, rel=0, abs=TOL)  # the step moved it
    # the steered run reads the baseline's embeddings at the prompt's 3-D positions: as a batch of one would
    assert steered == pytest.approx(answer_batch(qwen_lm, [_prompt(QUESTIONS[k])], [_image(k)], config, True)[0]
                                    ["margin"], rel=0, abs=TOL)
    assert_overlay_equals_plain(qwen_lm, result, inputs, out, config, map_layer=1, token_layer=0)


def test_qwen_batches_with_the_cached_prefix_equal_plain_forwards(qwen_lm):
    """pope's path: 4 prompts over 2 images of different shapes, left-padded, the vision tower once per distinct
    image, the positions from get_rope_index; the baseline against each prompt alone, the intervened run continuing
    the cached prefix against a full re-run."""
    from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs

    prompts = [_prompt(q) for q in QUESTIONS * 2]
    images = [_image(0), _image(0), _image(1), _image(1)]
    inputs = batch_inputs(qwen_lm, prompts, images)
    assert inputs["position_ids"].shape == (3, *inputs["input_ids"].shape)
    feats = inputs["mm_encoder_outputs"]["image"].pooler_output
    assert "pixel_values" not in inputs and len(feats) == 4
    assert feats[0] is feats[1] and feats[2] is feats[3] and feats[1] is not feats[2]  # one tower run per image
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    base, steered = answer_pair(qwen_lm, prompts, images, iv, inputs=inputs)
    full = answer_batch(qwen_lm, prompts, images, iv, True, inputs=inputs)
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        _, out, _ = plain_forward(qwen_lm, prompt, image)
        margin = yes_no_margin(qwen_lm, out.logits[0, -1])
        assert base[b]["margin"] == pytest.approx(margin, rel=0, abs=TOL)
        assert steered[b]["margin"] == pytest.approx(full[b]["margin"], rel=0, abs=TOL)
        assert steered[b]["margin"] != pytest.approx(margin, rel=0, abs=TOL)


def test_pope_trace_explain_and_flow_run_on_qwen(qwen_lm, tmp_path):
    from mclcbf_diag.cli import main

    assert main(["pope", "--model", qwen_lm.source, "--split", "adversarial", "--limit", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "p")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["baseline_margin"] == r["baseline_margin"] for r in rows)
    assert main(["trace", "--model", qwen_lm.source, "--sample", "0", "--overlay-token", "-2",
                 "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "trace.html").exists()
    assert main(["explain", "--model", qwen_lm.source, "--sample", "0", "--k-max", "2",
                 "--out", str(tmp_path / "e")]) == 0
    assert main(["flow", "--model", qwen_lm.source, "--sample", "0", "--out", str(tmp_path / "f")]) == 0


def test_qwen2_vl_trace_and_batches_equal_plain_forwards(tmp_path):
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.models import load_model

    _build(tmp_path, Qwen2VLConfig, Qwen2VLForConditionalGeneration, embed_dim=32, hidden_size=64, num_heads=2,
           mlp_ratio=2)
    lm = load_model(str(tmp_path))
    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1])
    inputs, out, _ = plain_forward(lm, PROMPT, _image(1))
    result = trace_sample(lm, QUESTIONS[0], _image(1), config)
    r = result.records
    base = r[(r.condition == "baseline") & (r["head"] == -1) & (r.phase == "prefill")]
    per = {m: dict(zip(g.layer, g.value)) for m, g in base.groupby("metric")}
    image = inputs["input_ids"][0] == lm.tokens.image_token_id
    for i in range(lm.n_layers):
        want = float(out.attentions[i][0, :, -1, image].sum(-1).mean())
        assert per["attn_image_mass"][i] == pytest.approx(want, rel=0, abs=TOL)
        assert per["barrier_h"][i] == pytest.approx(want, rel=0, abs=TOL)
    want = yes_no_margin(lm, out.logits[0, -1])
    assert result.value("final_margin", "baseline") == pytest.approx(want, rel=0, abs=TOL)
    # pope's batched path, the cached prefix continued: each prompt's margin as its plain forward's
    from mclcbf_diag.engine.batch import answer_batch, answer_pair

    prompts, images = [PROMPT, _prompt(QUESTIONS[1])], [_image(1), _image(0)]
    base, steered = answer_pair(lm, prompts, images, config)
    full = answer_batch(lm, prompts, images, config, True)
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        want = yes_no_margin(lm, plain_forward(lm, prompt, image)[1].logits[0, -1])
        assert base[b]["margin"] == pytest.approx(want, abs=TOL)
        assert steered[b]["margin"] == pytest.approx(full[b]["margin"], rel=0, abs=TOL)


def test_qwen_units_continue_the_prefix_as_plain_forwards_and_full_runs(qwen_lm):
    """explain's and population's path (engine/units.py): rows of 3-D positions, the shared prefix continued from the
    decision token; unsteered units against plain forwards, steered ones against a full batched run."""
    from mclcbf_diag.engine.batch import answer_batch
    from mclcbf_diag.engine.units import Prefix, Unit, run_units
    from mclcbf_diag.interventions import as_intervention

    prompts = [_prompt(q) for q in QUESTIONS]
    images = [_image(0), _image(1)]
    prefix = Prefix(qwen_lm, prompts, images)
    iv = as_intervention(dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1]))
    units = [Unit(q, iv, steer=s) for q in (0, 1) for s in (False, True)]
    got = run_units(prefix, units, capture=False, patterns=True)
    full = answer_batch(qwen_lm, prompts, images, iv, True)
    for unit, (logits, _) in zip(units, got):
        margin = yes_no_margin(qwen_lm, logits)
        if unit.steer:
            assert margin == pytest.approx(full[unit.q]["margin"], rel=0, abs=TOL)
        else:
            _, out, _ = plain_forward(qwen_lm, prompts[unit.q], images[unit.q])
            assert margin == pytest.approx(yes_no_margin(qwen_lm, out.logits[0, -1]), rel=0, abs=TOL)


def test_opera_continues_after_the_images_3d_positions(qwen_lm):
    """OPERA appends each candidate token at the next position, which for Qwen-VL follows the image's M-RoPE ids (not
    the token count): its scores equal the released formula on plain forwards of the prompt plus each candidate,
    alone and in the batched path."""
    from plain_refs import assert_scores

    from mclcbf_diag.engine.batch import batch_inputs
    from mclcbf_diag.engine.runner import Keep, forward
    from mclcbf_diag.interventions.opera import OPERA

    inputs = qwen_lm.inputs(PROMPT, _image(0))
    image = inputs["input_ids"][0] == qwen_lm.tokens.image_token_id
    with torch.no_grad():
        z = qwen_lm.model(**inputs).logits[0, -1].float()
        top, cand = torch.topk(z, 5)
        assert qwen_lm.tokens.image_token_id not in cand.tolist()
        shares = []
        for c in cand.tolist():
            grow = {k: torch.cat([inputs[k], torch.tensor([[v]])], -1)
                    for k, v in (("input_ids", c), ("attention_mask", 1), ("mm_token_type_ids", 0))}
            out = qwen_lm.model(**{**inputs, **grow}, output_attentions=True)
            row = out.attentions[-1][0, :, -1].float().max(0).values
            shares.append((row / row.sum())[:-1][image].sum())
    want = torch.full_like(z, -torch.inf).scatter(-1, cand, top + torch.stack(shares))
    assert_scores(forward(qwen_lm, inputs, OPERA()).captures[0].steps[0].final_logits.float(), want)
    last = forward(qwen_lm, batch_inputs(qwen_lm, [PROMPT], [_image(0)]), OPERA(), keep=Keep(layers=False),
                   full_ids=inputs["input_ids"]).logits
    assert_scores(last[0], want)


def test_opera_computes_the_3d_positions_once_on_its_separate_route(qwen_lm, monkeypatch):
    """Without the runner's cache OPERA runs the prompt, then continues it by each candidate, both at the prompt's
    M-RoPE positions: computed once for both (mrope.position_ids called once), and the candidates and their image
    shares are those it reads continuing a cache it is handed."""
    from mclcbf_diag.interventions.base import Batched, rows_of
    from mclcbf_diag.interventions.opera import OPERA, prompt_cache
    from mclcbf_diag.models import mrope

    inputs = qwen_lm.inputs(PROMPT, _image(0))
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], qwen_lm.tokens.image_token_id)
    calls, real = [], mrope.position_ids
    monkeypatch.setattr(mrope, "position_ids", lambda lm, x: calls.append(1) or real(lm, x))
    alone = OPERA()
    alone.prepare(qwen_lm, inputs, rows)
    assert "position_ids" not in inputs and len(calls) == 1
    logits, cache = prompt_cache(qwen_lm, inputs)
    handed = OPERA()
    handed.prepare_batched(qwen_lm, inputs, rows, Batched(cache=cache, logits=logits))
    for got, want in zip(alone._candidates[0], handed._candidates[0]):
        assert torch.equal(got, want)


def test_qwen_patching_continues_at_the_prompts_3d_positions(qwen_lm):
    """attribute's patching runs continue the prompt at its own M-RoPE positions: patching the text entering layer 0
    (the same tokens in both runs) leaves each run's plain margin, from both sides of the localisation."""
    from mclcbf_diag.engine.batch import answer_batch
    from mclcbf_diag.experiments.attribute import activation_patching, localisation

    clean = qwen_lm.inputs(PROMPT, _image(0))
    corrupted = qwen_lm.inputs(PROMPT, sample_scene(5, 3).image().resize(IMAGES[0][::-1]))
    grid = activation_patching(qwen_lm, clean, corrupted, directions=("denoise",))
    for g in (1, 2):
        assert float(grid.margins["resid:denoise"][0, g]) == pytest.approx(grid.plain[1], rel=0, abs=TOL)
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    steered = answer_batch(qwen_lm, [PROMPT], [_image(0)], iv, True)[0]["margin"]
    local = localisation(qwen_lm, clean, iv, directions=("denoise", "noise"))
    assert local.clean == pytest.approx(steered, rel=0, abs=TOL)
    for g in (1, 2):
        assert float(local.margins["resid:noise"][0, g]) == pytest.approx(steered, rel=0, abs=TOL)


def test_the_page_shows_the_image_the_patches_came_from(qwen_lm):
    """mrope.seen_image undoes the processor's patch layout: an image already on the 28-px lattice and inside the
    pixel budget (not resized) comes back as its own pixels."""
    from mclcbf_diag.models.mrope import seen_image as unpatched
    from mclcbf_diag.report.overlay import seen_image

    image = sample_scene(3, 2).image().resize((112, 56))  # width 112, height 56: 4 × 8 patches
    enc = qwen_lm.inputs(PROMPT, image)
    ip = qwen_lm.processor.image_processor
    picture = seen_image(unpatched(enc["pixel_values"], enc["image_grid_thw"], ip), ip.image_mean, ip.image_std)
    assert picture.shape == (56, 112, 3)
    assert np.abs(picture.astype(int) - np.asarray(image.convert("RGB")).astype(int)).max() <= 1


def test_an_image_view_of_flattened_patches_is_refused_in_one_line(qwen_lm):
    """VCD noises each image's pixel tensor; Qwen-VL's flattened patches are not one: refused, never mismeasured."""
    from mclcbf_diag.engine.runner import forward
    from mclcbf_diag.errors import UserError
    from mclcbf_diag.interventions.vcd import VCD

    with pytest.raises(UserError, match=r"flattened patches .*\(not VCD\)$"):
        forward(qwen_lm, qwen_lm.inputs(PROMPT, _image(0)), VCD())


def test_the_attention_site_edits_qwens_softmax(qwen_lm):
    """The ``attention`` site reaches the softmax inside Qwen-VL's eager attention: knocking out the decision token's
    image attention at every layer equals a plain forward whose mask hides the image from that query."""
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.interventions.knockout import AttentionKnockout
    from mclcbf_diag.models.mrope import position_ids

    inputs = qwen_lm.inputs(PROMPT, _image(0))
    T = inputs["input_ids"].shape[1]
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1)
    hidden[-1] |= inputs["input_ids"][0] == qwen_lm.tokens.image_token_id
    mask = torch.zeros(1, 1, T, T).masked_fill(hidden, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = qwen_lm.model(**{**inputs, "attention_mask": mask, "position_ids": position_ids(qwen_lm, inputs)})
    result = trace_sample(qwen_lm, QUESTIONS[0], _image(0), AttentionKnockout())
    want = yes_no_margin(qwen_lm, out.logits[0, -1])
    assert result.value("final_margin", "steered") == pytest.approx(want, rel=0, abs=TOL)
    assert result.value("final_margin", "baseline") != pytest.approx(want, rel=0, abs=TOL)


def test_the_pages_overlay_draws_a_non_square_grid(qwen_lm):
    """The trace page's overlay section on a wide image: the seen picture and the 3 × 6 merged grid, another token
    too (the known crash on non-square grids does not happen)."""
    from mclcbf_diag.data import LLAVA_PROMPT, PopeQuestion
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.report.pages import overlay_section

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    question = PopeQuestion(question_id=1, image="wide.png", text=QUESTIONS[0], label="yes", index=0)
    result = trace_sample(qwen_lm, question, _image(0), config)
    section = overlay_section(qwen_lm, result, _image(0), LLAVA_PROMPT, tokens=(-2,))
    assert len(section.figures) == 2


def test_forwards_fed_embeddings_run_at_the_prompts_3d_positions(qwen_lm):
    """VISTA's steering vectors and AdHH's head influence run the language model from the prompt embeddings: at the
    prompt's M-RoPE positions, not from the model's last rope_deltas, so they equal forwards of the ids."""
    from mclcbf_diag.data import PopeQuestion
    from mclcbf_diag.interventions.adhh import head_influence
    from mclcbf_diag.interventions.base import rows_of
    from mclcbf_diag.interventions.vista import steering_vectors

    inputs = qwen_lm.inputs(PROMPT, _image(0))
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], qwen_lm.tokens.image_token_id)
    language_model = qwen_lm.adapter.get(qwen_lm.model, qwen_lm.adapter.language_model)
    got = {}
    def keep(module, args, kwargs):
        got.setdefault("embeds", kwargs["inputs_embeds"])  # the prompt's (VISTA's image-free run comes second)

    hook = language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        by_ids = steering_vectors(qwen_lm, inputs, rows)
    finally:
        hook.remove()
    with torch.no_grad():  # another prompt's forward leaves other rope_deltas in the model
        qwen_lm.model(**qwen_lm.inputs(PROMPT, _image(1)))
    by_embeds = steering_vectors(qwen_lm, {**inputs, "inputs_embeds": got["embeds"]}, rows)
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=TOL)
    question = PopeQuestion(question_id=1, image="wide.png", text=QUESTIONS[0], label="no", index=0)
    score = head_influence(qwen_lm, [question], [_image(0)])
    o_proj = qwen_lm.adapter.layer_part(qwen_lm.model, 1, "layer_o_proj")

    def zero_head_2(module, args):
        x = args[0].clone()
        x[..., 2 * 16:3 * 16] = 0
        return (x,)

    with torch.no_grad():
        p0 = qwen_lm.model(**inputs).logits[0, -1].float().softmax(-1)
        handle = o_proj.register_forward_pre_hook(zero_head_2)
        try:
            p1 = qwen_lm.model(**inputs).logits[0, -1].float().softmax(-1)
        finally:
            handle.remove()
    yes, no = qwen_lm.tokens.yes_id, qwen_lm.tokens.no_id  # label "no": Yes is the hallucinated answer
    want = float((p0[yes] - p1[yes]) - (p0[no] - p1[no]))
    assert float(score[1, 2]) == pytest.approx(want, rel=0, abs=1e-6)


def test_the_image_free_view_continues_the_cached_prefix_on_3d_positions(qwen_lm):
    """PAI's and VISTA's image-free prompt in pope continues the baseline's cache from the first image token on
    (:func:`~mclcbf_diag.interventions.views.image_free_logits`): on M-RoPE positions too it equals the image-free
    prompt's own forward, per row of a batch of two images of two shapes (two paddings), within the logit floor."""
    from floors import logit_floor

    from mclcbf_diag.engine.batch import batch_inputs
    from mclcbf_diag.interventions.base import rows_of
    from mclcbf_diag.interventions.opera import prompt_cache
    from mclcbf_diag.interventions.views import image_free_inputs, image_free_logits, last_logits

    inputs = batch_inputs(qwen_lm, [_prompt(QUESTIONS[0]), _prompt(QUESTIONS[1] + " Look closely.")],
                          [_image(0), _image(1)])
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], qwen_lm.tokens.image_token_id)
    assert len({r.pad for r in rows}) == 2
    _, cache = prompt_cache(qwen_lm, inputs)
    got = image_free_logits(qwen_lm, rows, cache, inputs["attention_mask"])
    want = last_logits(qwen_lm, image_free_inputs(qwen_lm, rows))
    torch.testing.assert_close(got, want, rtol=0, atol=logit_floor(qwen_lm))
