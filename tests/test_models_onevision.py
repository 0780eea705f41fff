"""LLaVA-OneVision end to end: a tiny random checkpoint (a SigLIP tower of 112-px tiles and 14-px patches, pinpoints
up to 3 × 3 tiles, "anyres_max_4" so that large maps are resized; a 2-layer Qwen2 text model whose tokenizer adds no
BOS, as Qwen2's do), saved with its processor and loaded with ``load_model(folder)`` as users load one.

The image-token layout (models/anyres.py with the "anyres_max" resize) is checked against the processor's token
counts and the model's own embeddings; trace, the batched pope path with the cached prefix, explain and flow against
plain transformers forwards of each prompt alone (``output_attentions``, float32, 1e-5).
"""

import dataclasses

import numpy as np
import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

from mclcbf_diag.embedded.build import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer, padded_vocab_size
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.models.anyres import anyres_layout, downscaled, max_patches, token_bound

TILE, PATCH, SIDE = 112, 14, 8
PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224], [112, 336], [336, 112], [224, 336], [336, 224],
             [336, 336]]
ASPECT, MOST = "anyres_max_4", 4
PROMPT = "USER: <image>\nIs there a dog in the image?\nASSISTANT:"
TOL = 1e-5
# (height, width): resized (336², 300 × 310: 24 × 24 patches → 16 × 16), kept (100 × 200: 8 × 16; 112²), unpadded and
# resized (401 × 157), unpadded only (57 × 300)
SIZES = [(336, 336), (300, 310), (100, 200), (112, 112), (401, 157), (57, 300), (90, 333)]


def _processor():
    from mclcbf_diag.models.onevision import OnevisionImageProcessor

    tok = build_tokenizer()  # Qwen2's tokenizers add no BOS: the prompt starts with "USER"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tok.add_bos_token = False
    images = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
                                             do_pad=True)
    return OnevisionImageProcessor(image_processor=images, tokenizer=tok, num_image_tokens=SIDE * SIDE,
                                   vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                                   vision_aspect_ratio=ASPECT)


@pytest.fixture(scope="module")
def ov_lm(tmp_path_factory):
    from mclcbf_diag.models import load_model
    from mclcbf_diag.models.onevision import save_processor

    processor = _processor()
    tok = processor.tokenizer
    text = Qwen2Config(vocab_size=padded_vocab_size(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                                  image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio=ASPECT,
                                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(3)
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():  # norms away from 1, so a skipped or misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    folder = tmp_path_factory.mktemp("llava_onevision")
    model.save_pretrained(folder)
    save_processor(processor, folder)
    return load_model(str(folder))


def _image(size, scene=2, seed=0):
    return sample_scene(scene, seed).image().resize((size[1], size[0]))


def _count(lm, enc) -> int:
    return int((enc["input_ids"][0] == lm.tokens.image_token_id).sum())


# ----------------------------------------------------------------------------- the layout
def test_the_anyres_max_rules_by_hand():
    assert max_patches("anyres_max_9") == 9 and max_patches("anyres") is None and max_patches(None) is None
    assert downscaled((24, 24), 8, 4) == (16, 16)  # √(576 / 256) = 1.5: each side over 1.5
    assert downscaled((8, 16), 8, 4) == (8, 16)  # 2 tiles' worth: kept
    assert downscaled((17, 17), 8, 4) == (17, 17)  # √(289 / 256) = 1.06 ≤ 1.1: kept
    assert downscaled((162, 162), 27, 9) == (81, 81)  # llava-onevision-qwen2-*-ov-hf's 6 × 6 tiles of SigLIP-384
    # a map just under the threshold holds more tokens than the largest one resized: the bound counts it
    assert token_bound([[336, 336]], TILE, PATCH, most=MOST) > anyres_layout((336, 336), PINPOINTS, TILE, PATCH,
                                                                             most=MOST).n_tokens
    assert token_bound([[336, 336]], TILE, PATCH) == 64 + 24 * 25  # without the resize: LLaVA-NeXT's bound


def test_the_config_check_accepts_exactly_what_the_layout_parses():
    """One parse of "anyres_max_N" (anyres.max_patches): config.json's check refuses every value it reads as None and
    accepts every other; the check's default (no vision_aspect_ratio) is the published anyres_max_9."""
    from mclcbf_diag.models.families import onevision_problem

    cases = {"anyres_max_9": 9, "anyres_max_12": 12, "anyres_max_0": None, "anyres_max_09": None, "anyres_max_": None,
             "anyres_max_\u0669": None, "anyres_max_9 ": None, "anyres": None, "pad": None, 9: None, None: None}
    for aspect, most in cases.items():
        assert max_patches(aspect) == most, aspect
        assert (onevision_problem({"vision_aspect_ratio": aspect}) is None) == (most is not None), aspect
    assert onevision_problem({}) is None


@pytest.mark.parametrize("size", SIZES)
def test_the_token_count_is_the_processors(ov_lm, size):
    enc = ov_lm.processor(text=PROMPT, images=_image(size), return_tensors="pt")
    assert anyres_layout(size, PINPOINTS, TILE, PATCH, most=MOST).n_tokens == _count(ov_lm, enc)
    assert enc["image_sizes"][0].tolist() == list(size)
    assert ov_lm.image_layout(enc) == anyres_layout(size, PINPOINTS, TILE, PATCH, most=MOST)


def test_the_bound_covers_every_count_and_the_length_check_uses_it(ov_lm):
    from mclcbf_diag.models.loading import check_prompt_lengths

    bound = ov_lm.image_scheme.token_bound(ov_lm.model.config, ov_lm.processor)
    assert bound == token_bound(PINPOINTS, TILE, PATCH, most=MOST)
    counts = [_count(ov_lm, ov_lm.processor(text=PROMPT, images=_image(s), return_tensors="pt")) for s in SIZES]
    assert max(counts) <= bound
    assert check_prompt_lengths(ov_lm, [PROMPT]) >= bound


def _embeds(model, enc) -> torch.Tensor:
    seen = {}

    def keep(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0].detach()

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        hook.remove()
    return seen["embeds"]


@pytest.mark.parametrize("size", [(100, 200), (336, 336), (401, 157)])
def test_newline_base_and_tile_positions_hold_what_the_model_puts_there(ov_lm, size):
    """At the layout's newline tokens the model's embeddings are its image_newline vector and nowhere else; the base
    tokens are the projected base tile's 64 patches (SigLIP: no CLS), row-major; where nothing is resized the tile
    tokens are the tiles' patches in the map's order."""
    model = ov_lm.model
    enc = ov_lm.inputs(PROMPT, _image(size, 2, 1))
    embeds = _embeds(model, enc)
    first = int(torch.nonzero(enc["input_ids"][0] == ov_lm.tokens.image_token_id)[0])
    groups = ov_lm.image_layout(enc).groups()
    newline = model.model.image_newline.detach()
    for pos in groups["newline"]:
        torch.testing.assert_close(embeds[first + pos], newline, rtol=0, atol=0)
    assert not any(torch.equal(embeds[first + int(p)], newline) for p in groups["tiles"].flatten())
    with torch.no_grad():
        tower = model.model.vision_tower(enc["pixel_values"][0], output_hidden_states=True)
        patches = model.model.multi_modal_projector(tower.hidden_states[-1])  # [tiles + 1, 64, hidden]
    torch.testing.assert_close(embeds[first + torch.as_tensor(groups["base"]).flatten()], patches[0], rtol=0, atol=1e-6)
    tiles = torch.as_tensor(groups["tiles"])
    if size == (100, 200):  # 1 × 2 tiles, 8 × 16 patches, nothing unpadded or resized
        assert tuple(tiles.shape) == (8, 16)
        for r, c in [(0, 0), (3, 5), (7, 15), (2, 9)]:
            want = patches[1 + c // SIDE, (r % SIDE) * SIDE + c % SIDE]
            torch.testing.assert_close(embeds[first + tiles[r, c]], want, rtol=0, atol=1e-6)
    if size == (336, 336):  # 3 × 3 tiles, 24 × 24 patches, nothing unpadded, resized (bilinear) to 16 × 16
        assert tuple(tiles.shape) == (16, 16)
        grid = patches[1:10].reshape(3, 3, SIDE, SIDE, -1).permute(4, 0, 2, 1, 3).reshape(1, -1, 24, 24)
        want = torch.nn.functional.interpolate(grid, [16, 16], mode="bilinear")[0].permute(1, 2, 0)
        torch.testing.assert_close(embeds[first + tiles], want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the family
def test_onevision_is_a_supported_family_with_the_llava_adapter(ov_lm):
    from mclcbf_diag.models.adapter import LLAVA
    from mclcbf_diag.models.families import config_problem

    model = ov_lm.model
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration" and ov_lm.adapter is LLAVA
    assert model.get_submodule(LLAVA.language_model) is model.model.language_model
    assert model.get_submodule(LLAVA.vision_tower) is model.model.vision_tower
    assert model.get_submodule(LLAVA.projector) is model.model.multi_modal_projector
    assert model.get_submodule(LLAVA.unembed) is model.lm_head
    assert config_problem(model.config.to_dict()) is None
    assert ov_lm.tokens.bos_token_id is not None and not ov_lm.adds_bos  # the tokenizer has one but never adds it
    enc = ov_lm.inputs(PROMPT, _image((100, 200)))
    assert ov_lm.image_grid(enc) == (SIDE, SIDE)  # the base grid; the tiles and newlines follow it
    grid = ov_lm.grid_mask(enc["input_ids"][0] == ov_lm.tokens.image_token_id)
    first = int(torch.nonzero(enc["input_ids"][0] == ov_lm.tokens.image_token_id)[0])
    assert torch.nonzero(grid).flatten().tolist() == list(range(first, first + SIDE * SIDE))


def test_a_processor_that_counts_other_tokens_than_the_model_is_refused_before_it_runs(ov_lm, tmp_path):
    """A processor_config.json whose "anyres_max" differs from the model's: the image tokens do not form the
    model's layout, refused in one line before the model runs (the model itself would fail on the count)."""
    import json
    import shutil

    from mclcbf_diag.errors import UserError
    from mclcbf_diag.models import load_model

    folder = tmp_path / "mismatched"
    shutil.copytree(ov_lm.source, folder)
    saved = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
    (folder / "processor_config.json").write_text(json.dumps({**saved, "vision_aspect_ratio": "anyres_max_9"}))
    lm = load_model(str(folder))
    assert lm.inputs(PROMPT, _image((100, 200)))  # a map under both thresholds: the same tokens
    # 336²: 64 + 24 × 25 tokens from the processor (not resized under N = 9), 64 + 16 × 17 in the model
    with pytest.raises(UserError, match=r"the image of size \(336, 336\) becomes 664 image tokens, not the 336 of its "
                                        r"anyres layout .*\d+ × \d+ tiles, a newline per row\); check the "
                                        r"checkpoint's processor files$"):
        lm.inputs(PROMPT, _image((336, 336)))


def test_a_vision_aspect_ratio_other_than_anyres_max_is_refused_in_one_line(ov_lm):
    from mclcbf_diag.models.families import config_problem

    cfg = ov_lm.model.config.to_dict()
    for aspect in ("anyres", "pad", 9):
        problem = config_problem({**cfg, "vision_aspect_ratio": aspect})
        assert f"vision_aspect_ratio is {aspect!r}, not 'anyres_max_N'" in problem and "\n" not in problem


def _plain(lm, prompt: str, image):
    inputs = lm.inputs(prompt, image)
    with torch.no_grad():
        out = lm.model(**inputs, output_attentions=True, output_hidden_states=True)
    return inputs, out


QUESTIONS = ["Is there a dog in the image?", "Is there a cat in the image?"]
IMAGES = [(100, 200), (336, 336)]  # one kept, one resized


def _margin(lm, logits) -> float:
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def _baseline(records, metric: str) -> dict[int, float]:
    r = records[(records.metric == metric) & (records.condition == "baseline") & (records["head"] == -1)
                & (records.phase == "prefill")]
    return dict(zip(r.layer, r.value))


@pytest.mark.parametrize("k", [0, 1])
def test_onevision_trace_equals_a_plain_forward_and_its_look_ahead(ov_lm, k):
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.models.tokens import Sink, find_sink
    from mclcbf_diag.report.overlay import attention_maps

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1])
    image = _image(IMAGES[k], 2, k)
    inputs, out = _plain(ov_lm, PROMPT.replace(QUESTIONS[0], QUESTIONS[k]), image)
    result = trace_sample(ov_lm, QUESTIONS[k], image, config)
    mass, h = _baseline(result.records, "attn_image_mass"), _baseline(result.records, "barrier_h")
    pre, lens = _baseline(result.records, "resid_pre_norm"), _baseline(result.records, "logit_lens_margin")
    ids = inputs["input_ids"][0]
    image_mask = ids == ov_lm.tokens.image_token_id
    assert int(image_mask.sum()) == ov_lm.image_layout(inputs).n_tokens
    for i in range(ov_lm.n_layers):
        want = float(out.attentions[i][0, :, -1, image_mask].sum(-1).mean())
        assert mass[i] == pytest.approx(want, rel=0, abs=TOL) and h[i] == pytest.approx(want, rel=0, abs=TOL)
        assert pre[i] == pytest.approx(float(out.hidden_states[i][0, -1].norm()), rel=TOL)
        with torch.no_grad():
            final = ov_lm.model.lm_head(ov_lm.final_norm()(out.hidden_states[i + 1][0, -1]))
        if i == ov_lm.n_layers - 1:  # the last hidden state is already normed
            final = out.logits[0, -1]
        assert lens[i] == pytest.approx(_margin(ov_lm, final), rel=0, abs=TOL * float(final.abs().max()))
    margin = _margin(ov_lm, out.logits[0, -1])
    assert result.value("final_margin", "baseline") == pytest.approx(margin, rel=0, abs=TOL)
    assert "lookahead_miss_layers" not in result.summary()
    # no BOS: the sink is measured, the non-image key the decision rows attend most
    rows = torch.stack([a[0, :, -1] for a in out.attentions]).mean(dim=(0, 1))
    sink = max((p for p in range(len(ids) - 1) if not image_mask[p]), key=lambda p: (float(rows[p]), -p))
    assert int(ids[0]) != ov_lm.tokens.bos_token_id
    assert result.value("sink_is_bos", "baseline") == 0.0 and result.value("sink_position", "baseline") == sink
    decision_rows = torch.stack([a[0, :, -1] for a in out.attentions])
    assert find_sink(ids, None, decision_rows, image_mask) == Sink(sink, "measured sink")  # a tokenizer with no BOS
    # the overlay: the base grid's 8 × 8 patches, in the order the model's attention holds them
    grid = ov_lm.grid_mask(result.baseline.detected)
    maps = attention_maps(result.baseline, grid)
    want = out.attentions[1][0, :, -1].mean(0)[grid.nonzero().flatten()].reshape(SIDE, SIDE)
    np.testing.assert_allclose(maps["layer 1"], want.numpy(), rtol=0, atol=1e-6)


def test_onevision_batches_with_the_cached_prefix_equal_plain_forwards(ov_lm):
    """pope's path: 4 prompts over 2 images of different sizes (one resized), the vision tower once per (pixels,
    image_sizes), the baseline against each prompt alone, the cached-prefix continuation against a full re-run."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs

    prompts = [PROMPT.replace(QUESTIONS[0], q) for q in QUESTIONS * 2]
    images = [_image(IMAGES[0], 2, 0)] * 2 + [_image(IMAGES[1], 2, 1)] * 2
    inputs = batch_inputs(ov_lm, prompts, images)
    assert "pixel_values" not in inputs and len(inputs["mm_encoder_outputs"]["image"].pooler_output) == 4
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    base, steered = answer_pair(ov_lm, prompts, images, iv, inputs=inputs)
    full = answer_batch(ov_lm, prompts, images, iv, True, inputs=inputs)
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        _, out = _plain(ov_lm, prompt, image)
        margin = _margin(ov_lm, out.logits[0, -1])
        assert base[b]["margin"] == pytest.approx(margin, rel=0, abs=TOL)
        assert steered[b]["margin"] == pytest.approx(full[b]["margin"], rel=0, abs=TOL)
        assert steered[b]["margin"] != pytest.approx(margin, rel=0, abs=TOL)  # the step moved it


@pytest.mark.parametrize("knobs", [{}, {"beta": 0.0, "alpha": 0.5, "noise_step": 999, "seed": 3}])
def test_vcds_batched_pope_path_on_onevision_equals_the_released_construction(ov_lm, knobs):
    """VCD on OneVision: each image's tiles (3 and 10: two sizes, one resized by anyres_max) noised as one pixel
    tensor, run as auxiliary rows of the batch's own forward, against the released construction of each question
    alone on a plain copy of the model (plain_refs.assert_vcd_pope_path_equals_plain: floors there)."""
    from plain_refs import assert_vcd_pope_path_equals_plain

    prompts = [PROMPT.replace(QUESTIONS[0], q) for q in QUESTIONS * 2]
    images = [_image(IMAGES[0], 2, 0)] * 2 + [_image(IMAGES[1], 2, 1)] * 2
    assert_vcd_pope_path_equals_plain(ov_lm, prompts, images, **knobs)


def test_pope_runs_on_onevision(ov_lm, tmp_path):
    import json

    from mclcbf_diag.cli import main

    assert main(["pope", "--model", ov_lm.source, "--split", "adversarial", "--limit", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "p")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["baseline_margin"] == r["baseline_margin"] for r in rows)


def test_explain_and_flow_run_on_onevision(ov_lm):
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.explain import explain_sample
    from mclcbf_diag.experiments.flow import information_flow

    image = _image(IMAGES[1], 2, 1)
    _, out = _plain(ov_lm, PROMPT, image)
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1])
    ex = explain_sample(ov_lm, QUESTIONS[0], image, iv, k_max=2, bisect_steps=1, sweep=False)
    assert ex.trace.value("final_margin", "baseline") == pytest.approx(_margin(ov_lm, out.logits[0, -1]), abs=TOL)
    flow = information_flow(ov_lm, QUESTIONS[0], image, window=1)
    probs = torch.softmax(out.logits[0, -1].float(), -1)
    assert len(flow) and set(flow.first_layer) == {0, 1}
    assert float(flow.p_base.iloc[0]) == pytest.approx(float(probs[[ov_lm.tokens.yes_id, ov_lm.tokens.no_id]].max()),
                                                       abs=TOL)


def test_trace_and_its_page_run_on_onevision(ov_lm, tmp_path):
    from mclcbf_diag.cli import main

    assert main(["trace", "--model", ov_lm.source, "--sample", "0", "--overlay-token", "-2",
                 "--out", str(tmp_path / "t")]) == 0
    assert "over the high-resolution tiles (" in (tmp_path / "t" / "trace.html").read_text()
