"""InternVL (transformers' native ``internvl``) end to end: a tiny random checkpoint built here (a 2-layer Qwen2 text
model with norms away from 1, a 112-px InternViT tower of 14-px patches, pixel-shuffled to 4 × 4 tokens per tile),
saved with its processor twice, one tile per image (``max_patches=1``) and up to 4 tiles plus a thumbnail, and
loaded the way users load one. References are plain transformers forwards of each prompt alone (output_attentions,
hidden states, logits), float32, within 1e-5."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from plain_refs import assert_trace_equals_plain, plain_forward, yes_no_margin
from transformers import (
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
)
from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

from mclcbf_diag.embedded.build import CHAT_TEMPLATE, build_tokenizer, padded_vocab_size
from mclcbf_diag.embedded.world import sample_scene

TILE, PATCH, SEQ = 112, 14, 16  # a tile's 8 × 8 patches become 4 × 4 tokens
PROMPT = "USER: <image>\nIs there a dog in the image?\nASSISTANT:"
QUESTIONS = ["Is there a dog in the image?", "Is there a cat in the image?"]
SIZES = [(100, 200), (200, 210)]  # (height, width): 1 × 2 and 2 × 2 tiles when tiled, each with its thumbnail
TOL = 1e-5
SPECIAL = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
           "video_token": "<video>"}


def _tokenizer(tmp):
    """The embedded tokenizer with InternVL's named image tokens (as its tokenizer_config.json names them)."""
    build_tokenizer().save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(tmp, extra_special_tokens=SPECIAL)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from mclcbf_diag.models.internvl import ImageInternVLProcessor

    tok = _tokenizer(tmp_path_factory.mktemp("tok"))
    text = Qwen2Config(vocab_size=padded_vocab_size(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=TILE, patch_size=PATCH)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=SEQ, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(2)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    out = {}
    for name, most in (("one", 1), ("tiles", 4)):
        images = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, min_patches=1, max_patches=most)
        folder = tmp_path_factory.mktemp(f"internvl_{name}")
        model.save_pretrained(folder)
        ImageInternVLProcessor(image_processor=images, tokenizer=tok, image_seq_length=SEQ,
                               chat_template=CHAT_TEMPLATE).save_pretrained(folder)
        for file in ("processor_config.json", "tokenizer_config.json"):  # named as real checkpoints name it
            saved = json.loads((folder / file).read_text())
            (folder / file).write_text(json.dumps({**saved, "processor_class": "InternVLProcessor"}))
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def lms(folders):
    from mclcbf_diag.models import load_model

    return {name: load_model(str(folder)) for name, folder in folders.items()}


def _image(k: int):
    h, w = SIZES[k]
    return sample_scene(2, k).image().resize((w, h))


# ----------------------------------------------------------------------------- the family and its layout
def test_internvl_is_a_family_with_the_llava_adapter(lms):
    from mclcbf_diag.models.adapter import LLAVA
    from mclcbf_diag.models.families import FAMILIES, config_problem
    from mclcbf_diag.models.internvl import tile_grid

    lm = lms["one"]
    assert type(lm.model).__name__ == "InternVLForConditionalGeneration" and lm.adapter is LLAVA
    assert "internvl" in [f.model_type for f in FAMILIES]
    cfg = lm.model.config.to_dict()
    assert config_problem(cfg) is None
    assert "internvl_chat" in config_problem({**cfg, "model_type": "internvl_chat"})
    internlm = {**cfg, "text_config": {**cfg["text_config"], "model_type": "internlm3"}}
    assert "text model is 'internlm3'" in config_problem(internlm)
    published = InternVLConfig()  # transformers' defaults: OpenGVLab/InternVL3-1B-hf (448-px tiles, Qwen2)
    assert config_problem(published.to_dict()) is None
    assert tile_grid(published) == (16, 16) and 16 * 16 == published.image_seq_length


@pytest.mark.parametrize("name,size,tiles", [("one", (100, 200), 1), ("tiles", (100, 200), 3),
                                             ("tiles", (300, 100), 4), ("tiles", (200, 210), 5),
                                             ("tiles", (112, 112), 1)])
def test_the_tokens_are_one_grid_per_tile_and_the_overlay_draws_the_last(lms, name, size, tiles):
    lm = lms[name]
    enc = lm.inputs(PROMPT, sample_scene(0, 0).image().resize((size[1], size[0])))
    image = enc["input_ids"][0] == lm.tokens.image_token_id
    assert enc["pixel_values"].shape[0] == tiles and int(image.sum()) == tiles * SEQ
    assert lm.image_grid(enc) == (4, 4)
    positions = torch.nonzero(image).flatten()
    assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[0]) + tiles * SEQ))  # contiguous
    ids = enc["input_ids"][0].tolist()
    tok = lm.processor.tokenizer
    first, last = int(positions[0]), int(positions[-1])
    assert ids[first - 1] == tok.start_image_token_id and ids[last + 1] == tok.end_image_token_id
    grid = lm.grid_mask(image)
    assert torch.nonzero(grid).flatten().tolist() == positions[-SEQ:].tolist()


def test_the_overlay_grid_holds_the_whole_picture_in_row_major_blocks(lms):
    """The model's embeddings at the grid are the thumbnail tile's features alone; its token (i, j) gathers the
    patches of rows 2i, 2i+1 and columns 2j, 2j+1 (the model's own pixel shuffle on patch indices)."""
    lm = lms["tiles"]
    enc = lm.inputs(PROMPT, _image(1))
    seen = {}

    def keep(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0].detach()

    hook = lm.model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            lm.model(**enc)
            thumb = lm.model.model.get_image_features(pixel_values=enc["pixel_values"][-1:], return_dict=True)
    finally:
        hook.remove()
    grid = lm.grid_mask(enc["input_ids"][0] == lm.tokens.image_token_id)
    torch.testing.assert_close(seen["embeds"][grid], thumb.pooler_output[0], rtol=0, atol=1e-6)
    index = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8, 1)
    shuffled = lm.model.model.pixel_shuffle(index, scale_factor=0.5)  # [1, 4, 4, 4]: each token's patches
    for i in range(4):
        for j in range(4):
            want = sorted(8 * r + c for r in (2 * i, 2 * i + 1) for c in (2 * j, 2 * j + 1))
            assert sorted(shuffled[0, i, j].long().tolist()) == want


def test_the_prompt_length_check_bounds_the_image_tokens(lms):
    from mclcbf_diag.models.internvl import token_bound
    from mclcbf_diag.models.loading import check_prompt_lengths

    assert token_bound(lms["one"].processor, lms["one"].model.config) == SEQ + 2
    assert token_bound(lms["tiles"].processor, lms["tiles"].model.config) == 5 * SEQ + 2  # 4 tiles, a thumbnail
    for lm in lms.values():
        enc = lm.inputs(PROMPT, _image(1))
        assert check_prompt_lengths(lm, [PROMPT]) >= enc["input_ids"].shape[1]


def test_another_image_processor_is_refused_in_one_line(folders, tmp_path):
    """The overlay reads GotOcr2's tile order (the thumbnail last): a checkpoint whose InternVL processor cuts images
    another way is refused before the weights load."""
    from transformers.models.clip import CLIPImageProcessorPil

    from mclcbf_diag.errors import UserError
    from mclcbf_diag.models.internvl import ImageInternVLProcessor
    from mclcbf_diag.models.loading import prepare_model

    tok = _tokenizer(tmp_path / "tok")
    for file in ("config.json", "model.safetensors"):
        (tmp_path / file).write_bytes((folders["one"] / file).read_bytes())
    ImageInternVLProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tok, image_seq_length=SEQ
                           ).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"cuts images with CLIPImageProcessorPil, not GotOcr2's") as info:
        prepare_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_tokens_that_do_not_form_the_tiles_are_refused_in_one_line(lms):
    from mclcbf_diag.errors import UserError
    from mclcbf_diag.models.internvl import whole_picture

    with pytest.raises(UserError, match=r"becomes 40 image tokens, not the 48 of its 3 tiles of 4 × 4 tokens"):
        whole_picture(lms["tiles"].model.config, 40, 3, "ckpt")


# ----------------------------------------------------------------------------- trace against plain forwards
@pytest.mark.parametrize("name", ["one", "tiles"])
def test_trace_equals_a_plain_forward_and_its_look_ahead(lms, name):
    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.report.overlay import attention_maps, token_attention_maps

    lm = lms[name]
    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1])
    for k, question in enumerate(QUESTIONS):
        inputs, out, outputs = plain_forward(lm, PROMPT.replace(QUESTIONS[0], question), _image(k))
        result = trace_sample(lm, question, _image(k), config)
        assert_trace_equals_plain(lm, result, inputs, out, outputs, TOL)
        lens_margin = dict(result.records.query("condition == 'baseline' and head == -1 and phase == 'prefill' "
                                                "and metric == 'logit_lens_margin'")[["layer", "value"]].values)
        image = inputs["input_ids"][0] == lm.tokens.image_token_id
        for i in range(lm.n_layers):  # the logit lens at every layer (the shared check reads the last one)
            with torch.no_grad():
                lens = lm.model.lm_head(lm.final_norm()(outputs[i][0, -1]))
            assert lens_margin[i] == pytest.approx(yes_no_margin(lm, lens), rel=0, abs=TOL)
        grid = lm.grid_mask(result.baseline.detected)  # the whole picture's 4 × 4 grid
        maps = attention_maps(result.baseline, grid)
        want = out.attentions[1][0, :, -1].mean(0)[grid.nonzero().flatten()].reshape(4, 4)
        np.testing.assert_allclose(maps["layer 1"], want.numpy(), rtol=0, atol=1e-6)
        if k == 0:  # another query token's rows (the one after </img>), from the runs the overlay adds
            q = int(torch.nonzero(image)[-1]) + 2
            rows = token_attention_maps(lm, inputs, config, [q])[q]["baseline"]["layer 0"]
            np.testing.assert_allclose(rows, out.attentions[0][0, :, q].mean(0)[grid.nonzero().flatten()]
                                       .reshape(4, 4).numpy(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- batches, pope, explain, flow
@pytest.mark.parametrize("name", ["one", "tiles"])
def test_batches_with_the_cached_prefix_equal_plain_forwards(lms, name):
    """pope's path: 4 prompts over 2 images (2 and 4 tiles with their thumbnails when tiled), the tower once per
    distinct tile, the baseline against each prompt alone, the intervened run continuing the cached prefix against
    a full re-run."""
    from mclcbf_diag import barrier as B
    from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs

    lm = lms[name]
    prompts = [PROMPT.replace(QUESTIONS[0], q) for q in QUESTIONS * 2]
    images = [_image(0), _image(0), _image(1), _image(1)]
    inputs = batch_inputs(lm, prompts, images)
    feats = inputs["mm_encoder_outputs"]["image"].pooler_output
    tiles = [1, 1, 1, 1] if name == "one" else [3, 3, 5, 5]
    assert "pixel_values" not in inputs and [f.shape[0] for f in feats] == [t * SEQ for t in tiles]
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    base, steered = answer_pair(lm, prompts, images, iv, inputs=inputs)
    full = answer_batch(lm, prompts, images, iv, True, inputs=inputs)
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        _, out, _ = plain_forward(lm, prompt, image)
        margin = yes_no_margin(lm, out.logits[0, -1])
        assert base[b]["margin"] == pytest.approx(margin, rel=0, abs=TOL)
        assert steered[b]["margin"] == pytest.approx(full[b]["margin"], rel=0, abs=TOL)
        assert steered[b]["margin"] != pytest.approx(margin, rel=0, abs=TOL)  # the step moved it


def test_pope_runs_on_internvl(lms, tmp_path):
    from mclcbf_diag.cli import main

    assert main(["pope", "--model", lms["tiles"].source, "--split", "adversarial", "--limit", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "p")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["baseline_margin"] == r["baseline_margin"] for r in rows)
    assert main(["pope", "--model", lms["tiles"].source, "--split", "adversarial", "--limit", "4", "--batch-size", "4",
                 "--generate", "2", "--out", str(tmp_path / "g")]) == 0  # generate: the pixels, not shared features
    again = [json.loads(x) for x in (tmp_path / "g" / "answers.jsonl").read_text().splitlines()]
    assert [r["baseline_margin"] for r in again] == pytest.approx([r["baseline_margin"] for r in rows], abs=TOL)
    assert all(isinstance(r.get("baseline_text"), str) for r in again)


def test_trace_page_explain_and_flow_run_on_internvl(lms, tmp_path):
    from mclcbf_diag.cli import main

    source = lms["tiles"].source
    assert main(["trace", "--model", source, "--sample", "0", "--overlay-token", "-2",
                 "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "trace.html").exists()
    assert main(["explain", "--model", source, "--sample", "0", "--k-max", "2", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "explain-1.html").exists()
    assert main(["flow", "--model", source, "--sample", "0", "--window", "1", "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "flow-1.html").exists()


def test_a_pixel_view_of_some_rows_holds_their_own_tiles(lms):
    """VCD's view (the question with its image noised) on rows 1 and 2 of a tiled batch (3 and 5 tiles): each row
    keeps its own tiles (from the shared features' pixels, and from generate's plain pixel_values), and its logits
    are those of the prompt alone with its noised tiles."""
    from mclcbf_diag.engine.batch import batch_inputs
    from mclcbf_diag.interventions.base import rows_of
    from mclcbf_diag.interventions.views import (
        PIXEL_ROWS,
        diffusion_noise,
        last_logits,
        pixels_of,
        row_inputs,
        with_pixels,
    )

    lm = lms["tiles"]
    prompts = [PROMPT.replace(QUESTIONS[0], q) for q in QUESTIONS * 2]
    images = [_image(0), _image(0), _image(1), _image(1)]
    inputs = batch_inputs(lm, prompts, images)
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)[1:3]
    mine = row_inputs(inputs, rows)
    owner = mine["mm_encoder_outputs"][PIXEL_ROWS]
    got = last_logits(lm, with_pixels(mine, diffusion_noise(pixels_of(mine), 500, 0)))
    raw = row_inputs(batch_inputs(lm, prompts, images, share_images=False), rows)  # generate's inputs: pixels
    assert torch.equal(raw["pixel_values"], pixels_of(mine))
    for n, b in enumerate([1, 2]):
        alone = lm.inputs(prompts[b], images[b])
        torch.testing.assert_close(pixels_of(mine)[owner == n], alone["pixel_values"], rtol=0, atol=0)
        want = last_logits(lm, with_pixels(alone, diffusion_noise(alone["pixel_values"], 500, 0)))[0]
        torch.testing.assert_close(got[n], want, rtol=0, atol=TOL * float(want.abs().max()))


def test_vcds_noised_rows_in_the_batchs_own_forward_hold_their_own_tiles(lms):
    """VCD's noised view as rows of the batch's own forward (the tiles' features stacked under the batch's rows,
    :func:`~mclcbf_diag.interventions.views.with_aux_rows`) equals the view's own forward per row within the logit
    floor, on a batch whose prompts have 3 and 5 tiles."""
    from floors import logit_floor

    from mclcbf_diag.engine.batch import batch_inputs
    from mclcbf_diag.interventions.base import rows_of
    from mclcbf_diag.interventions.vcd import VCD
    from mclcbf_diag.interventions.views import last_logits, with_aux_rows

    lm = lms["tiles"]
    prompts = [PROMPT.replace(QUESTIONS[0], q) for q in QUESTIONS]
    inputs = batch_inputs(lm, prompts, [_image(0), _image(1)])
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)
    iv = VCD()
    both = last_logits(lm, with_aux_rows(inputs, iv.aux_features(lm, inputs, rows)))
    torch.testing.assert_close(both[2:], iv.auxiliary(lm, inputs, rows), rtol=0, atol=logit_floor(lm))
    torch.testing.assert_close(both[:2], last_logits(lm, inputs), rtol=0, atol=logit_floor(lm))
