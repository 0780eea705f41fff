"""Qwen3-VL end to end: a tiny random checkpoint built here (a 3-block vision tower of 16-px patches merged 2 × 2
whose blocks 0 and 1 feed two deepstack levels, 3 Qwen3 text layers with q/k norms, interleaved M-RoPE sections
[4, 2, 2] and norms away from 1, an image processor whose pixel budget makes an image 4–20 tokens), saved and loaded
the way users load one. References are plain transformers forwards of each prompt alone (output_attentions,
float32): the model computes its own 3-D positions and adds its own deepstack features after layers 0 and 1, so the
residual entering layers 1 and 2 is not the one leaving the layer before at the image tokens."""

import dataclasses
import json

import pytest
import torch
from plain_refs import assert_overlay_equals_plain, assert_trace_equals_plain, plain_forward, yes_no_margin
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from mclcbf_diag import barrier as B
from mclcbf_diag.embedded.build import CHAT_TEMPLATE, build_tokenizer, padded_vocab_size
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.errors import UserError

TOL = 1e-5
PROMPT = "USER: <image>\nIs there a dog in the image?\nASSISTANT:"
QUESTIONS = ["Is there a dog in the image?", "Is there a cat in the image?"]
IMAGES = [(100, 200), (300, 120)]  # (height, width): a wide one and a tall one, non-square merged grids
SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _build(folder):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *SPECIAL]})
    tok.chat_template = CHAT_TEMPLATE
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 20},
                                      patch_size=16, merge_size=2, temporal_patch_size=2)
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=padded_vocab_size(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    torch.manual_seed(1)
    model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    model.save_pretrained(folder)
    images.save_pretrained(folder)  # no video processor: the toolkit measures images (models/mrope.py)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def qwen3_lm(tmp_path_factory):
    from mclcbf_diag.models import load_model

    folder = tmp_path_factory.mktemp("qwen3_vl")
    _build(folder)
    return load_model(str(folder))


def _image(k: int):
    h, w = IMAGES[k]
    return sample_scene(2, k).image().resize((w, h))


def _prompt(question: str) -> str:
    return PROMPT.replace(QUESTIONS[0], question)


def _layer_inputs(lm, inputs: dict) -> dict:
    """The residual entering each decoder layer in a plain forward of ``inputs``."""
    got = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: got.__setitem__(i, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
        for i, layer in enumerate(lm.adapter.decoder_layers(lm.model))]
    try:
        with torch.no_grad():
            lm.model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return got


def test_qwen3_vl_is_a_supported_family_with_its_grid_positions_and_deepstack(qwen3_lm):
    from mclcbf_diag.models.adapter import QWEN_VL, text_math
    from mclcbf_diag.models.families import config_problem
    from mclcbf_diag.models.mrope import position_ids

    assert type(qwen3_lm.model).__name__ == "Qwen3VLForConditionalGeneration" and qwen3_lm.adapter is QWEN_VL
    assert text_math(qwen3_lm.model).q_norm == "self_attn.q_norm"
    assert config_problem(qwen3_lm.model.config.to_dict()) is None
    assert "Qwen3-VL-MoE" in config_problem({"model_type": "qwen3_vl_moe"})
    assert "'qwen3'" in config_problem({"model_type": "qwen3_vl", "text_config": {"model_type": "qwen3"}})
    enc = qwen3_lm.inputs(PROMPT, _image(0))
    assert qwen3_lm.image_grid(enc) == (3, 6)  # 100 × 200 px → 96 × 192 → 6 × 12 patches → 3 × 6 merged tokens
    image = enc["input_ids"][0] == qwen3_lm.tokens.image_token_id
    assert int(image.sum()) == 18 and torch.equal(qwen3_lm.grid_mask(image), image)
    pos = position_ids(qwen3_lm, enc)[:, 0]
    first = int(torch.nonzero(image)[0])
    assert pos[:, first].tolist() == [first] * 3 and pos[1:, image].max() == first + 5  # rows 0–2, columns 0–5
    assert pos[:, -1].tolist() == [len(image) - 1 - 18 + 6] * 3  # the text continues from first + max(3, 6)
    # the deepstack features are there and not small: the residual entering layers 1 and 2 differs from the
    # previous layer's output at the image tokens (and only there)
    _, _, layer_out = plain_forward(qwen3_lm, PROMPT, _image(0))
    entering = _layer_inputs(qwen3_lm, enc)
    for i in (1, 2):
        step = (entering[i][0] - layer_out[i - 1][0]).norm(dim=-1)
        assert float(step[image].min()) > 0.1 and float(step[~image].max()) == 0.0


@pytest.mark.parametrize("k", [0, 1])
def test_qwen3_trace_equals_a_plain_forward_and_its_look_ahead(qwen3_lm, k):
    """Masses, the look-ahead h (its keys from the residual entering each layer, deepstack included), residual
    norms, the logit lens and the margin against the plain forward; the steered run fed the baseline's embeddings
    gets the image's deepstack features back, as a batch of one from the pixels does."""
    from mclcbf_diag.engine.batch import answer_batch
    from mclcbf_diag.experiments.trace import trace_sample

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1, 2])
    inputs, out, layer_out = plain_forward(qwen3_lm, _prompt(QUESTIONS[k]), _image(k))
    result = trace_sample(qwen3_lm, QUESTIONS[k], _image(k), config)
    margin = assert_trace_equals_plain(qwen3_lm, result, inputs, out, layer_out, TOL)
    steered = result.value("final_margin", "steered")
    assert steered != pytest.approx(margin, rel=0, abs=TOL)  # the step moved it
    assert steered == pytest.approx(answer_batch(qwen3_lm, [_prompt(QUESTIONS[k])], [_image(k)], config, True)[0]
                                    ["margin"], rel=0, abs=TOL)
    assert_overlay_equals_plain(qwen3_lm, result, inputs, out, config, map_layer=2, token_layer=1)


def test_qwen3_batches_with_the_cached_prefix_equal_plain_forwards(qwen3_lm):
    """pope's path: 4 prompts over 2 images of different shapes, left-padded, the vision tower once per distinct
    image (its deepstack features handed to the model with the image features), the positions from get_rope_index;
    the baseline against each prompt alone, the intervened run continuing the cached prefix against a full re-run."""
    from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs

    prompts = [_prompt(q) for q in QUESTIONS * 2]
    images = [_image(0), _image(0), _image(1), _image(1)]
    inputs = batch_inputs(qwen3_lm, prompts, images)
    assert inputs["position_ids"].shape == (3, *inputs["input_ids"].shape)
    shared = inputs["mm_encoder_outputs"]["image"]
    feats, deep = shared.pooler_output, shared.deepstack_features
    assert "pixel_values" not in inputs and len(feats) == 4 and [len(level) for level in deep] == [4, 4]
    assert feats[0] is feats[1] and feats[2] is feats[3] and feats[1] is not feats[2]  # one tower run per image
    assert deep[1][0] is deep[1][1] and deep[1][0].shape == feats[0].shape
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1, 2])
    base, steered = answer_pair(qwen3_lm, prompts, images, iv, inputs=inputs)
    full = answer_batch(qwen3_lm, prompts, images, iv, True, inputs=inputs)
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        _, out, _ = plain_forward(qwen3_lm, prompt, image)
        margin = yes_no_margin(qwen3_lm, out.logits[0, -1])
        assert base[b]["margin"] == pytest.approx(margin, rel=0, abs=TOL)
        assert steered[b]["margin"] == pytest.approx(full[b]["margin"], rel=0, abs=TOL)
        assert steered[b]["margin"] != pytest.approx(margin, rel=0, abs=TOL)


def test_qwen3_units_continue_the_prefix_as_plain_forwards_and_full_runs(qwen3_lm):
    """explain's and population's path (engine/units.py): rows of 3-D positions, the shared prefix continued from the
    decision token (VISTA's units, which edit every position, from the kept embeddings of the whole prompt);
    unsteered units against plain forwards, steered ones against a full batched run from the pixels."""
    from mclcbf_diag.engine.batch import answer_batch
    from mclcbf_diag.engine.units import Prefix, Unit, run_units
    from mclcbf_diag.interventions import as_intervention, resolve

    prompts = [_prompt(q) for q in QUESTIONS]
    images = [_image(0), _image(1)]
    prefix = Prefix(qwen3_lm, prompts, images)
    iv = as_intervention(dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99,
                                             layers=[1]))
    vista = resolve("vista")  # edits every position: its units run the whole prompt from the kept embeddings
    assert vista.first_edited(prefix.rows[0]) == 0
    units = [Unit(q, iv, steer=s) for q in (0, 1) for s in (False, True)] + [Unit(q, vista, steer=True)
                                                                             for q in (0, 1)]
    got = run_units(prefix, units, capture=False, patterns=True)
    full = {name: answer_batch(qwen3_lm, prompts, images, v, True) for name, v in (("mclcbf", iv), ("vista", vista))}
    for unit, (logits, _) in zip(units, got):
        margin = yes_no_margin(qwen3_lm, logits)
        if unit.steer:
            want = full["vista" if unit.iv is vista else "mclcbf"][unit.q]["margin"]
            assert margin == pytest.approx(want, rel=0, abs=TOL)
        else:
            _, out, _ = plain_forward(qwen3_lm, prompts[unit.q], images[unit.q])
            assert margin == pytest.approx(yes_no_margin(qwen3_lm, out.logits[0, -1]), rel=0, abs=TOL)


def test_a_forward_fed_the_prompts_embeddings_gets_the_images_deepstack_features(qwen3_lm):
    """The embeddings a plain forward merged (image features in place of <|image_pad|>), fed back at the prompt's
    positions, run the same forward (the table of models/deepstack.py finds the image tokens by their features);
    an edited feature is not the image's and gets none, as in a plain forward fed those embeddings."""
    from mclcbf_diag.models.mrope import position_ids

    inputs = qwen3_lm.inputs(PROMPT, _image(1))
    lang = qwen3_lm.adapter.get(qwen3_lm.model, qwen3_lm.adapter.language_model)
    got = {}

    def keep(module, args, kwargs):
        got.setdefault("embeds", kwargs["inputs_embeds"])

    hook = lang.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        try:
            want = qwen3_lm.model(**inputs).logits[0, -1]
        finally:
            hook.remove()
        feed = {"inputs_embeds": got["embeds"], "attention_mask": inputs["attention_mask"],
                "position_ids": position_ids(qwen3_lm, inputs)}
        torch.testing.assert_close(qwen3_lm.model(**feed).logits[0, -1], want, rtol=0, atol=TOL)
        fresh = Qwen3VLForConditionalGeneration.from_pretrained(qwen3_lm.source, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
        bare = fresh(**feed).logits[0, -1]  # no table: the plain model fed embeddings adds no deepstack features
        assert float((bare - want).abs().max()) > 1e-3
        edited = got["embeds"].clone()
        image = inputs["input_ids"][0] == qwen3_lm.tokens.image_token_id
        edited[0, image] *= 1.5
        torch.testing.assert_close(qwen3_lm.model(**{**feed, "inputs_embeds": edited}).logits[0, -1],
                                   fresh(**{**feed, "inputs_embeds": edited}).logits[0, -1], rtol=0, atol=TOL)


def test_pope_trace_explain_and_flow_run_on_qwen3(qwen3_lm, tmp_path):
    from mclcbf_diag.cli import main

    assert main(["pope", "--model", qwen3_lm.source, "--split", "adversarial", "--limit", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "p")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["baseline_margin"] == r["baseline_margin"] for r in rows)
    assert main(["trace", "--model", qwen3_lm.source, "--sample", "0", "--overlay-token", "-2",
                 "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "trace.html").exists()
    assert main(["explain", "--model", qwen3_lm.source, "--sample", "0", "--k-max", "2",
                 "--out", str(tmp_path / "e")]) == 0
    assert main(["flow", "--model", qwen3_lm.source, "--sample", "0", "--out", str(tmp_path / "f")]) == 0


def test_the_pages_overlay_draws_qwen3s_non_square_grid(qwen3_lm):
    """The trace page's overlay section on a wide image: the seen picture and the 3 × 6 merged grid, another token
    too."""
    from mclcbf_diag.data import LLAVA_PROMPT, PopeQuestion
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.report.pages import overlay_section

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    question = PopeQuestion(question_id=1, image="wide.png", text=QUESTIONS[0], label="yes", index=0)
    result = trace_sample(qwen3_lm, question, _image(0), config)
    section = overlay_section(qwen3_lm, result, _image(0), LLAVA_PROMPT, tokens=(-2,))
    assert len(section.figures) == 2


def test_qwen3_patching_continues_at_the_prompts_3d_positions(qwen3_lm):
    """attribute's patching runs continue the prompt after the image (its deepstack features in the cached keys):
    patching the text entering a layer (the same tokens in both runs) leaves each run's plain margin, and the
    localisation's intervened run is the batched one."""
    from mclcbf_diag.engine.batch import answer_batch
    from mclcbf_diag.experiments.attribute import activation_patching, localisation

    clean = qwen3_lm.inputs(PROMPT, _image(0))
    corrupted = qwen3_lm.inputs(PROMPT, sample_scene(5, 3).image().resize(IMAGES[0][::-1]))
    grid = activation_patching(qwen3_lm, clean, corrupted, directions=("denoise",))
    for g in (1, 2):
        assert float(grid.margins["resid:denoise"][0, g]) == pytest.approx(grid.plain[1], rel=0, abs=TOL)
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    steered = answer_batch(qwen3_lm, [PROMPT], [_image(0)], iv, True)[0]["margin"]
    local = localisation(qwen3_lm, clean, iv, directions=("denoise", "noise"))
    assert local.clean == pytest.approx(steered, rel=0, abs=TOL)
    for g in (1, 2):
        assert float(local.margins["resid:noise"][0, g]) == pytest.approx(steered, rel=0, abs=TOL)


def _replacing_prefix(rows: torch.Tensor, start: int):
    """A forward pre-hook (with kwargs) that puts ``rows`` [1, T, d] into positions ``0 … start−1`` of its module's
    input, in place (at a layer's input norm, that is the layer's residual branch too)."""
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x[:, :start] = rows[:, :start].to(x.dtype)

    return hook


def test_localising_an_edit_of_the_image_runs_each_layer_with_its_deepstack_features(qwen3_lm):
    """VISTA edits every position, the image's too: localisation then runs the whole prompt from each layer's residual
    (the layers before it skipped), where the image tokens still get the deepstack features of the levels from that
    layer on (models/deepstack.starting_at). Each layer's two image-residual patches against the model's own forward
    from the pixels with that residual put in by a plain hook: the intervened run's into a plain forward, and the
    baseline's into the intervened forward."""
    from mclcbf_diag.engine.runner import Keep, activations_forward, forward
    from mclcbf_diag.experiments.attribute import localisation
    from mclcbf_diag.interventions import resolve
    from mclcbf_diag.interventions.base import rows_of

    inputs = qwen3_lm.inputs(PROMPT, _image(0))
    vista = resolve("vista")
    start = int(torch.nonzero(inputs["input_ids"][0] == qwen3_lm.tokens.image_token_id).max()) + 1
    local = localisation(qwen3_lm, inputs, vista, directions=("denoise", "noise"))
    vista = vista.activation_part()  # what is localised: its steering, not its logit mix
    base = activations_forward(qwen3_lm, inputs, attention="eager")
    edited = activations_forward(qwen3_lm, inputs, intervention=vista)
    layers = qwen3_lm.adapter.decoder_layers(qwen3_lm.model)
    vista.prepare(qwen3_lm, inputs, rows_of(inputs["input_ids"], inputs["attention_mask"],
                                            qwen3_lm.tokens.image_token_id))  # its own forwards, before any hook
    for L in range(qwen3_lm.n_layers):
        hook = layers[L].register_forward_pre_hook(_replacing_prefix(edited.resid[L], start), with_kwargs=True)
        try:
            with torch.no_grad():
                want = yes_no_margin(qwen3_lm, qwen3_lm.model(**inputs).logits[0, -1].float())
        finally:
            hook.remove()
        assert float(local.margins["resid:denoise"][L, 0]) == pytest.approx(want, rel=0, abs=TOL), L
        norm = qwen3_lm.adapter.layer_part(qwen3_lm.model, L, "layer_input_norm")
        hook = norm.register_forward_pre_hook(_replacing_prefix(base.resid[L], start), with_kwargs=True)
        try:
            logits = forward(qwen3_lm, inputs, vista, keep=Keep(layers=False), prepare=False).logits[0]
        finally:
            hook.remove()
        assert float(local.margins["resid:noise"][L, 0]) == pytest.approx(yes_no_margin(qwen3_lm, logits), rel=0,
                                                                         abs=TOL), L


def test_interventions_that_feed_embeddings_run_the_images_deepstack_features(qwen3_lm):
    """VISTA's steering vectors from the prompt's embeddings equal those from its ids and pixels, and OPERA's scores
    (its candidates appended to the kept embeddings) equal the released formula on plain forwards of the prompt plus
    each candidate: both run the forward the model runs from the pixels, deepstack features included."""
    from plain_refs import assert_scores

    from mclcbf_diag.engine.runner import forward
    from mclcbf_diag.interventions.base import rows_of
    from mclcbf_diag.interventions.opera import OPERA
    from mclcbf_diag.interventions.vista import steering_vectors

    inputs = qwen3_lm.inputs(PROMPT, _image(0))
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], qwen3_lm.tokens.image_token_id)
    lang = qwen3_lm.adapter.get(qwen3_lm.model, qwen3_lm.adapter.language_model)
    got = {}

    def keep(module, args, kwargs):
        got.setdefault("embeds", kwargs["inputs_embeds"])  # the prompt's (VISTA's image-free run comes second)

    hook = lang.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        by_ids = steering_vectors(qwen3_lm, inputs, rows)
    finally:
        hook.remove()
    with torch.no_grad():  # another image's forward in between
        qwen3_lm.model(**qwen3_lm.inputs(PROMPT, _image(1)))
    by_embeds = steering_vectors(qwen3_lm, {**inputs, "inputs_embeds": got["embeds"]}, rows)
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=TOL)
    image = inputs["input_ids"][0] == qwen3_lm.tokens.image_token_id
    with torch.no_grad():
        z = qwen3_lm.model(**inputs).logits[0, -1].float()
        top, cand = torch.topk(z, 5)
        shares = []
        for c in cand.tolist():
            grow = {k: torch.cat([inputs[k], torch.tensor([[v]])], -1)
                    for k, v in (("input_ids", c), ("attention_mask", 1), ("mm_token_type_ids", 0))}
            out = qwen3_lm.model(**{**inputs, **grow}, output_attentions=True)
            row = out.attentions[-1][0, :, -1].float().max(0).values
            shares.append((row / row.sum())[:-1][image].sum())
    want = torch.full_like(z, -torch.inf).scatter(-1, cand, top + torch.stack(shares))
    assert_scores(forward(qwen3_lm, inputs, OPERA()).captures[0].steps[0].final_logits.float(), want)


def test_the_table_forgets_the_least_recently_used_image_tokens_first():
    """models/deepstack.py's table, worked by hand: three image tokens kept in a table of two; the one found last
    stays, the one untouched longest goes, and a forward fed it is refused in one line (it would run without its
    deepstack features) until it is remembered again or forgotten entirely; rows that are no image's get nothing."""
    from mclcbf_diag.models.deepstack import DeepstackTable

    table = DeepstackTable(limit=2, forgotten_limit=1)
    embeds = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)  # three tokens of width 4
    mask = torch.tensor([[True, True, False]])
    levels = [torch.full((2, 4), 10.0), torch.full((2, 4), 20.0)]
    levels[0][1] += 1
    table.remember(embeds, mask, levels)
    found_mask, found = table.find(embeds)
    assert found_mask.tolist() == [[True, True, False]] and [f[:, 0].tolist() for f in found] == [[10, 11], [20, 20]]
    table.find(embeds[:, :1])  # token 0 used last
    table.remember(embeds[:, 2:] + 100, torch.tensor([[True]]), [torch.zeros(1, 4), torch.ones(1, 4)])
    with pytest.raises(UserError, match=r"holds 1 Qwen3-VL image token\(s\) whose deepstack features were forgotten "
                                        r"\(the last 2 image tokens' are kept\).*a smaller --batch-size"):
        table.find(embeds)  # token 1 was forgotten
    found_mask, found = table.find(embeds[:, ::2])  # tokens 0 and 2 (not an image's): kept, nothing
    assert found_mask.tolist() == [[True, False]] and found[0][:, 0].tolist() == [10]
    assert sum(table.prefixes.values()) == len(table.table) + len(table.forgotten) == 3
    table.remember(embeds[:, 1:2], torch.tensor([[True]]), [f[1:] for f in levels])  # token 1 back, the other out
    found_mask, found = table.find(embeds[:, 1:])
    assert found_mask.tolist() == [[True, False]] and found[0][:, 0].tolist() == [11]
    for shift in (200, 300):  # two more image tokens: token 0 forgotten, then dropped from the forgotten too
        table.remember(embeds[:, 2:] + shift, torch.tensor([[True]]), [torch.zeros(1, 4), torch.ones(1, 4)])
    assert table.find(embeds[:, :1]) is None  # token 0 no longer known (past forgotten_limit): nothing to refuse
    assert sum(table.prefixes.values()) == len(table.table) + len(table.forgotten) == 3  # its first values too
    assert table.find(embeds + 0.5) is None
    # rows of width 6: a row whose first values match a kept row's but not the rest is no image token
    wide = DeepstackTable()
    row = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6)
    wide.remember(row, torch.tensor([[True]]), [torch.ones(1, 6)])
    other = row.clone()
    other[..., -1] += 1
    assert wide.find(other) is None and wide.find(torch.cat([other, row], 1))[0].tolist() == [[False, True]]
    assert len(wide.prefixes) == 1


def test_an_intervention_that_noises_the_pixels_is_refused_before_qwen3_loads(tmp_path, capsys, monkeypatch):
    """VCD builds its view from each image's pixel tensor, which Qwen3-VL's processor does not give (flattened
    patches), and CausalMM's vision level reads one patch grid (LLaVA-1.5 only): refused in one line from config.json,
    before the weights (or the tokenizer) load, each with advice that holds; a method that builds no such view (DoLa,
    CausalMM at the language level) passes the check."""
    from cli_refusals import refused_here

    from mclcbf_diag.cli import common, pope
    from mclcbf_diag.interventions import resolve

    folder = tmp_path / "qwen3"
    _build(folder)
    capsys.readouterr()  # the save's progress bar

    def loads(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(common, "prepare_from_args", loads)
    monkeypatch.setattr(pope, "prepare_from_args", loads)
    for argv in (["pope", "--split", "adversarial", "--limit", "2"], ["trace", "--sample", "0"]):
        refused_here(capsys, [*argv, "--model", str(folder), "--intervention", "vcd", "--out", str(tmp_path / "o")],
                     "--intervention vcd", str(folder), "qwen3_vl", "flattened patches", "use a model of another "
                     "family (llava", "or an intervention that builds no image view")
    for preset in (None, "both"):  # CausalMM's vision level reads one patch grid: the advice names LLaVA-1.5 only
        err = refused_here(capsys, ["pope", "--split", "adversarial", "--limit", "2", "--model", str(folder),
                                    "--intervention", "causalmm", *(["--preset", preset] if preset else []),
                                    "--out", str(tmp_path / "o")],
                           "--intervention causalmm", "'qwen3_vl'", "merges 2 × 2 patches", "use a LLaVA-1.5 model",
                           "--preset language")
        assert "llava_next" not in err and "another family" not in err, err
    assert not (tmp_path / "o").exists()
    for name, preset in (("dola", None), ("causalmm", "language"), ("causalmm", None), ("vcd", None)):
        common.check_pixels(resolve(name, preset), None, None)  # the embedded model: pixel images
    for name, preset in (("dola", None), ("causalmm", "language")):
        common.check_pixels(resolve(name, preset), str(folder), "qwen3_vl")
