"""models/anyres.py: LLaVA-NeXT's image-token layout, against the processor's token counts and the model's own
embeddings (a tiny random LlavaNext checkpoint built here: 112-px tiles of 14-px patches, 2 × 2 pinpoints)."""

import numpy as np
import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next import LlavaNextImageProcessorPil

from mclcbf_diag.embedded.build import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer, padded_vocab_size
from mclcbf_diag.embedded.world import sample_scene
from mclcbf_diag.models.anyres import ImageLayout, anyres_layout, best_resolution, unpadded

TILE, PATCH = 112, 14
PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224], [112, 336]]
PROMPT = "USER: <image>\nIs there a dog in the image?\nASSISTANT:"
SIZES = [(336, 336), (100, 200), (200, 100), (90, 333), (401, 157), (112, 112), (57, 300)]  # (height, width)


@pytest.fixture(scope="module")
def next_model():
    tok = build_tokenizer()
    images = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                        image_grid_pinpoints=PINPOINTS, do_pad=True)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, chat_template=CHAT_TEMPLATE,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    text = LlamaConfig(vocab_size=padded_vocab_size(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(0)
    return processor, LlavaNextForConditionalGeneration(config).eval()


def test_layouts_by_hand():
    assert best_resolution((100, 200), PINPOINTS) == (112, 224)  # the 1:2 view keeps every pixel
    assert best_resolution((336, 336), PINPOINTS) == (224, 224)
    assert unpadded((100, 200), (8, 16)) == (8, 16)  # same aspect: nothing removed
    assert unpadded((50, 200), (8, 16)) == (4, 16)  # wider: 2 padding rows above and below
    layout = ImageLayout(base=(2, 2), tiles=(2, 3))
    assert layout.n_tokens == 4 + 2 * 4
    groups = layout.groups()
    assert groups["base"].tolist() == [[0, 1], [2, 3]]
    assert groups["tiles"].tolist() == [[4, 5, 6], [8, 9, 10]] and groups["newline"].tolist() == [7, 11]
    assert ImageLayout(base=(2, 2), tiles=(1, 1), extra=1).groups()["base"].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("size", SIZES)
def test_the_token_count_is_the_processors(next_model, size):
    processor, model = next_model
    image = sample_scene(0, 0).image().resize((size[1], size[0]))
    enc = processor(text=PROMPT, images=image, return_tensors="pt")
    count = int((enc["input_ids"][0] == model.config.image_token_id).sum())
    assert anyres_layout(size, PINPOINTS, TILE, PATCH).n_tokens == count
    assert enc["image_sizes"][0].tolist() == list(size)


@pytest.mark.parametrize("size", [(100, 200), (401, 157)])
def test_newline_and_base_positions_hold_what_the_model_puts_there(next_model, size):
    """The model's embeddings at the layout's newline tokens are its image_newline vector; the base tokens are the
    projected base tile's patches, in row-major order."""
    processor, model = next_model
    enc = processor(text=PROMPT, images=sample_scene(2, 1).image().resize((size[1], size[0])), return_tensors="pt")
    seen = {}

    def keep(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0].detach()

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        hook.remove()
    first = int(torch.nonzero(enc["input_ids"][0] == model.config.image_token_id)[0])
    groups = anyres_layout(size, PINPOINTS, TILE, PATCH).groups()
    embeds = seen["embeds"]
    newline = model.model.image_newline.detach()
    for pos in groups["newline"]:
        torch.testing.assert_close(embeds[first + pos], newline, rtol=0, atol=0)
    assert not any(torch.equal(embeds[first + int(p)], newline) for p in groups["tiles"].flatten())
    with torch.no_grad():
        tower = model.model.vision_tower(enc["pixel_values"][0, :1], output_hidden_states=True)
        base = model.model.multi_modal_projector(tower.hidden_states[-2][0, 1:])  # CLS dropped ("default")
    torch.testing.assert_close(embeds[first + torch.as_tensor(groups["base"]).flatten()], base, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- LLaVA-NeXT end to end
# A saved tiny LLaVA-NeXT (2 Llama layers with norms away from 1, a 112-px tower, the pinpoints above), loaded the way
# users load one. References are plain transformers forwards of each prompt alone (output_attentions, the logits).
@pytest.fixture(scope="module")
def next_lm(tmp_path_factory):
    from mclcbf_diag.models import load_model

    tok = build_tokenizer()
    images = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                        image_grid_pinpoints=PINPOINTS, do_pad=True)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, chat_template=CHAT_TEMPLATE,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    text = LlamaConfig(vocab_size=padded_vocab_size(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id,
                             tie_word_embeddings=False)
    torch.manual_seed(1)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    folder = tmp_path_factory.mktemp("llava_next")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return load_model(str(folder))


QUESTIONS = ["Is there a dog in the image?", "Is there a cat in the image?"]
IMAGES = [(100, 200), (401, 157)]  # (height, width): a wide one and a tall one


def _image(k: int):
    h, w = IMAGES[k]
    return sample_scene(2, k).image().resize((w, h))


def _plain(lm, prompt: str, image):
    inputs = lm.inputs(prompt, image)
    with torch.no_grad():
        out = lm.model(**inputs, output_attentions=True)
    return inputs, out


def test_next_is_a_supported_family_with_the_llava_adapter(next_lm):
    from mclcbf_diag.models.adapter import LLAVA
    from mclcbf_diag.models.families import config_problem

    assert type(next_lm.model).__name__ == "LlavaNextForConditionalGeneration" and next_lm.adapter is LLAVA
    assert config_problem(next_lm.model.config.to_dict()) is None
    enc = next_lm.inputs(PROMPT, _image(0))
    assert next_lm.image_grid(enc) == (8, 8)  # the base grid; the tiles and newlines follow it
    grid = next_lm.grid_mask(enc["input_ids"][0] == next_lm.tokens.image_token_id)
    first = int(torch.nonzero(enc["input_ids"][0] == next_lm.tokens.image_token_id)[0])
    assert torch.nonzero(grid).flatten().tolist() == list(range(first, first + 64))


def test_the_prompt_length_check_bounds_the_image_tokens(next_lm):
    from mclcbf_diag.models.loading import check_prompt_lengths

    bound = next_lm.image_scheme.token_bound(next_lm.model.config, next_lm.processor)
    assert bound == 64 + 16 * (16 + 1)  # the 224 × 224 pinpoint: 16 rows of 16 patches and a newline
    counts = []
    for h, w in [*IMAGES, (336, 336)]:
        enc = next_lm.inputs(PROMPT, sample_scene(2, 0).image().resize((w, h)))
        counts.append(int((enc["input_ids"][0] == next_lm.tokens.image_token_id).sum()))
    assert max(counts) == bound == counts[-1]  # a square image reaches it
    assert check_prompt_lengths(next_lm, [PROMPT]) >= bound


def test_next_trace_equals_a_plain_forward_and_its_look_ahead(next_lm):
    import dataclasses

    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[0, 1])
    for k, question in enumerate(QUESTIONS):
        inputs, out = _plain(next_lm, PROMPT.replace("Is there a dog in the image?", question), _image(k))
        result = trace_sample(next_lm, question, _image(k), config)
        r = result.records
        base = r[(r.condition == "baseline") & (r["head"] == -1) & (r.phase == "prefill")]
        per = {m: dict(zip(g.layer, g.value)) for m, g in base.groupby("metric")}
        image = inputs["input_ids"][0] == next_lm.tokens.image_token_id
        for i in range(next_lm.n_layers):
            want = float(out.attentions[i][0, :, -1, image].sum(-1).mean())
            assert per["attn_image_mass"][i] == pytest.approx(want, rel=0, abs=1e-5)
            assert per["barrier_h"][i] == pytest.approx(want, rel=0, abs=1e-5)
        logits = out.logits[0, -1]
        margin = float(logits[next_lm.tokens.yes_id] - logits[next_lm.tokens.no_id])
        assert result.value("final_margin", "baseline") == pytest.approx(margin, rel=0, abs=1e-5)
        assert "lookahead_miss_layers" not in result.summary()
        # the overlay's grid is the base image's 8 × 8 patches, in the order the model's attention holds them
        from mclcbf_diag.report.overlay import attention_maps, token_attention_maps

        grid = next_lm.grid_mask(result.baseline.detected)
        maps = attention_maps(result.baseline, grid)
        want = out.attentions[1][0, :, -1].mean(0)[grid.nonzero().flatten()].reshape(8, 8)
        np.testing.assert_allclose(maps["layer 1"], want.numpy(), rtol=0, atol=1e-6)
        if k == 0:  # another query token's rows, from the runs the overlay adds
            q = int(torch.nonzero(image)[-1]) + 2
            rows = token_attention_maps(next_lm, inputs, config, [q])[q]["baseline"]["layer 0"]
            np.testing.assert_allclose(rows, out.attentions[0][0, :, q].mean(0)[grid.nonzero().flatten()]
                                       .reshape(8, 8).numpy(), rtol=0, atol=1e-6)


def test_the_overlay_draws_the_tiles_as_the_processor_laid_them_out(next_lm):
    """The tiles' grid against the model's own merge: its newline tokens are the image positions whose input embedding
    is ``image_newline`` (each just after a row of the grid), the tile tokens the other image tokens after the 8 × 8
    base; the overlay's cells are the decision token's attention there, and base + tiles + newlines is the measured
    image mass of the layer."""
    import dataclasses

    from mclcbf_diag import barrier as B
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.report.overlay import attention_maps, cell_maps

    config = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    for k in range(2):
        inputs = next_lm.inputs(PROMPT, _image(k))
        with torch.no_grad():
            out = next_lm.model(**inputs, output_attentions=True, output_hidden_states=True)
        image = torch.nonzero(inputs["input_ids"][0] == next_lm.tokens.image_token_id).flatten()
        embeds = out.hidden_states[0][0, image[64:]]  # the decoder's input: image features merged
        newline = (embeds == next_lm.model.model.image_newline).all(-1)
        hires, newlines = image[64:][~newline], image[64:][newline]
        result = trace_sample(next_lm, QUESTIONS[0], _image(k), config)
        grid = next_lm.image_scheme.tile_grid(next_lm.model.config, inputs, result.baseline.detected)
        rows = len(newlines)
        assert grid.cells.shape == (rows, len(hires) // rows) and rows * grid.cells.shape[1] == len(hires)
        assert grid.cells.flatten().tolist() == hires.tolist() and (grid.cells[:, -1] + 1).tolist() == newlines.tolist()
        assert tuple(grid.pixels.shape[1:]) == tuple(PATCH * n for n in grid.cells.shape)  # one patch a cell
        tiles, base = cell_maps(result.baseline, grid.cells), attention_maps(result.baseline,
                                                                             next_lm.grid_mask(result.baseline.detected))
        measured = result.records.query("condition == 'baseline' and phase == 'prefill' and head == -1 "
                                        "and metric == 'attn_image_mass'").set_index("layer").value
        for i in range(next_lm.n_layers):
            row = out.attentions[i][0, :, -1].mean(0)
            np.testing.assert_allclose(tiles[f"layer {i}"], row[grid.cells].numpy(), rtol=0, atol=1e-6)
            assert float(tiles[f"layer {i}"].sum()) == pytest.approx(float(row[hires].sum()), rel=0, abs=1e-5)
            whole = float(base[f"layer {i}"].sum()) + float(tiles[f"layer {i}"].sum()) + float(row[newlines].sum())
            assert whole == pytest.approx(measured[i], rel=0, abs=1e-5)


def test_next_batches_with_the_cached_prefix_equal_plain_forwards(next_lm):
    """pope's path: 4 prompts over 2 images of different sizes, the vision tower once per (pixels, image_sizes), the
    baseline against each prompt alone, the intervened run continuing the cached prefix against a full re-run."""
    import dataclasses

    from mclcbf_diag import barrier as B
    from mclcbf_diag.engine.batch import answer_batch, answer_pair, batch_inputs

    prompts = [PROMPT.replace("Is there a dog in the image?", q) for q in QUESTIONS * 2]
    images = [_image(0), _image(0), _image(1), _image(1)]
    inputs = batch_inputs(next_lm, prompts, images)
    assert "pixel_values" not in inputs and len(inputs["mm_encoder_outputs"]["image"].pooler_output) == 4
    iv = dataclasses.replace(B.get_preset("seed-exp6"), span="detected", tau_prefill=0.99, layers=[1])
    base, steered = answer_pair(next_lm, prompts, images, iv, inputs=inputs)
    full = answer_batch(next_lm, prompts, images, iv, True, inputs=inputs)
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        _, out = _plain(next_lm, prompt, image)
        logits = out.logits[0, -1]
        margin = float(logits[next_lm.tokens.yes_id] - logits[next_lm.tokens.no_id])
        assert base[b]["margin"] == pytest.approx(margin, rel=0, abs=1e-5)
        assert steered[b]["margin"] == pytest.approx(full[b]["margin"], rel=0, abs=1e-5)
        assert steered[b]["margin"] != pytest.approx(margin, rel=0, abs=1e-5)  # the step moved it


@pytest.mark.parametrize("knobs", [{}, {"beta": 0.0, "alpha": 0.5, "noise_step": 999, "seed": 3}])
def test_vcds_batched_pope_path_on_next_equals_the_released_construction(next_lm, knobs):
    """VCD on LLaVA-NeXT: each image's tiles (3 and 5 here: the batch pads the first image's) noised as one pixel
    tensor, run as auxiliary rows of the batch's own forward, against the released construction of each question
    alone on a plain copy of the model (plain_refs.assert_vcd_pope_path_equals_plain: floors there)."""
    from plain_refs import assert_vcd_pope_path_equals_plain

    prompts = [PROMPT.replace("Is there a dog in the image?", q) for q in QUESTIONS * 2]
    square = sample_scene(2, 1).image().resize((336, 336))
    images = [_image(0), _image(0), square, square]
    assert [next_lm.inputs(PROMPT, im)["pixel_values"].shape[1] for im in images[1:3]] == [3, 5]  # base + tiles
    assert_vcd_pope_path_equals_plain(next_lm, prompts, images, **knobs)


def test_pope_runs_on_next(next_lm, tmp_path):
    import json

    from mclcbf_diag.cli import main

    assert main(["pope", "--model", next_lm.source, "--split", "adversarial", "--limit", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "p")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["baseline_margin"] == r["baseline_margin"] for r in rows)


def test_trace_and_its_page_run_on_next(next_lm, tmp_path):
    from mclcbf_diag.cli import main

    assert main(["trace", "--model", next_lm.source, "--sample", "0", "--overlay-token", "-2",
                 "--out", str(tmp_path / "t")]) == 0
    page = (tmp_path / "t" / "trace.html").read_text()
    assert "over the high-resolution tiles (" in page
