"""Attention over the image: patch grids, the image as the model saw it, and the overlay figure."""


import floors
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.experiments.trace import sample_inputs, trace_sample
from mclcbf_diag.report.overlay import attention_maps, patch_grid, seen_image
from mclcbf_diag.report.plots import image_attention_figure

POPE = shipped.POPE


def assert_within_mass_floors(got, want, where=None):
    """Attention probabilities (patch grids) of two routes, each within its float32 mass floor
    (``floors.mass_floors``, at the larger of the two; a mean of grids is within the floor of its mean,
    √ being concave)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    tol = floors.mass_floors(torch.from_numpy(np.maximum(got, want))).numpy()
    bad = np.abs(got - want) > tol
    assert not bad.any(), (where, float((np.abs(got - want) / tol)[bad].max()), float(np.abs(got - want).max()))


def test_patch_grid_is_row_major_over_the_image_keys():
    row = torch.arange(10.0)  # keys 0..9; image tokens at 2..5 form a 2 × 2 grid
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    np.testing.assert_array_equal(patch_grid(row, mask), [[2.0, 3.0], [4.0, 5.0]])
    with pytest.raises(ValueError, match="square"):
        patch_grid(row, torch.tensor([0, 1, 1, 1], dtype=torch.bool))


def test_seen_image_undoes_the_processor(embedded_model):
    q = load_pope(shipped.pope_file("adversarial"))[0]
    image = load_image(resolve_image(q, shipped.IMAGES))
    _, inputs = sample_inputs(embedded_model, q.text, image)
    ip = embedded_model.processor.image_processor
    seen = seen_image(inputs["pixel_values"], ip.image_mean, ip.image_std)
    raw = np.asarray(image.convert("RGB").resize(seen.shape[1::-1]))
    assert seen.dtype == np.uint8 and seen.shape[-1] == 3
    assert np.abs(seen.astype(int) - raw.astype(int)).mean() < 3  # resize/crop and 8-bit rounding only


@pytest.fixture(scope="module")
def traced(embedded_model):
    q = load_pope(shipped.pope_file("adversarial"))[42]
    image = load_image(resolve_image(q, shipped.IMAGES))
    cfg = B.apply_overrides(B.get_preset("fixed"), ["tau=0.6"])
    return trace_sample(embedded_model, q, image, cfg), cfg, image


def test_maps_sum_to_the_recorded_image_mass(embedded_model, traced):
    result, cfg, _ = traced
    steered = B.steered_layers(cfg, embedded_model.n_layers)
    for cond, cap in (("baseline", result.baseline), ("steered", result.steered)):
        maps = attention_maps(cap, cap.detected, steered=steered)
        r = result.records.query("condition == @cond and metric == 'attn_image_mass' and head == -1 "
                                 "and phase == 'prefill'")
        for layer, mass in zip(r.layer, r.value):  # the same probabilities summed in another order: the mass's floor
            assert maps[f"layer {layer}"].sum() == pytest.approx(mass, rel=0, abs=floors.mass_floor(mass))
        # exact by construction: the same grids averaged by the same np.mean in the same order
        np.testing.assert_array_equal(maps["steered layers"], np.mean([maps[f"layer {i}"] for i in steered], axis=0))
    one_head = attention_maps(result.steered, result.steered.detected, head=0)
    assert one_head["layer 1"].shape == maps["layer 1"].shape


def test_overlay_figure_draws_image_and_heatmaps(embedded_model, traced):
    result, cfg, image = traced
    _, inputs = sample_inputs(embedded_model, result.question.text, image)
    ip = embedded_model.processor.image_processor
    seen = seen_image(inputs["pixel_values"], ip.image_mean, ip.image_std)
    steered = B.steered_layers(cfg, embedded_model.n_layers)
    b = attention_maps(result.baseline, result.baseline.detected, steered=steered)
    s = attention_maps(result.steered, result.steered.detected, steered=steered)
    fig = image_attention_figure(seen, b, s)
    images = [t for t in fig.data if isinstance(t, go.Image)]
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(images) == 3 and len(heat) == 3 * len(b)
    assert sum(bool(t.visible) for t in heat) == 3  # one label at a time, per panel
    slider = fig.layout.sliders[0]
    assert slider.steps[slider.active].label == "steered layers"
    diff = [t for t in heat if t.colorscale and t.colorscale[0][1] != heat[0].colorscale[0][1]]
    assert diff, "the difference panel uses a diverging scale"


def test_a_patch_grid_that_is_not_square_covers_the_image_by_rows_and_columns():
    """A 2 × 4 grid over a 60 × 200 picture: each patch is 50 px wide and 30 px high, centred on its cell."""
    import numpy as np

    picture = np.zeros((60, 200, 3), dtype=np.uint8)
    grid = np.arange(8, dtype=float).reshape(2, 4) / 8
    fig = image_attention_figure(picture, {"layer 0": grid})
    heat = next(t for t in fig.data if isinstance(t, go.Heatmap))
    assert (heat.x0, heat.dx, heat.y0, heat.dy) == (25.0, 50.0, 15.0, 30.0)


# ----------------------------------------------------------------------------- chosen query tokens
def _eager_grids(lm, inputs, pos):
    """Independent reference: a plain HF forward with output_attentions=True (eager attention)."""
    with torch.no_grad():
        out = lm.model(**{k: v for k, v in inputs.items()}, output_attentions=True)
    ids = inputs["input_ids"][0]
    image = (ids == lm.tokens.image_token_id).numpy()
    n = int(round(image.sum() ** 0.5))
    grids = {}
    for layer, a in enumerate(out.attentions):
        row = a[0, :, pos, :].float().mean(0).numpy()  # mean over heads, keys of the whole prompt
        grids[layer] = row[image].reshape(n, n)  # image tokens are the patches in row-major order
    return grids


@pytest.mark.parametrize("model", ["embedded_model", "tiny_gqa_model"])
def test_chosen_token_maps_equal_eager_attention(model, request):
    from mclcbf_diag.report.overlay import resolve_token, token_attention_maps

    lm = request.getfixturevalue(model)
    q = load_pope(shipped.pope_file("adversarial"))[42]
    image = load_image(resolve_image(q, shipped.IMAGES))
    _, inputs = sample_inputs(lm, q.text, image)
    ids = inputs["input_ids"][0]
    tokens = [lm.processor.tokenizer.decode([int(i)]) for i in ids]
    image_mask = ids == lm.tokens.image_token_id
    word = q.text.split()[3]  # "Is there a <object> in the image?": the object's word
    positions = [resolve_token(word, tokens, image_mask), resolve_token(-1, tokens, image_mask),
                 int(torch.nonzero(image_mask).max()) + 1]
    assert tokens[positions[0]].strip() == word and positions[1] == len(ids) - 1
    cfg = B.get_preset("seed-exp6")  # steps at the decision token only: earlier queries are unchanged
    maps = token_attention_maps(lm, inputs, cfg, positions, steered=(1, 2))
    for pos in positions:
        ref = _eager_grids(lm, inputs, pos)
        for layer, grid in ref.items():  # each patch's probability within its mass floor
            assert_within_mass_floors(maps[pos]["baseline"][f"layer {layer}"], grid, (pos, layer))
            if pos != positions[1]:
                assert_within_mass_floors(maps[pos]["intervened"][f"layer {layer}"], grid, (pos, layer))
        assert_within_mass_floors(maps[pos]["baseline"]["steered layers"], (ref[1] + ref[2]) / 2, pos)
        assert_within_mass_floors(maps[pos]["baseline"]["all layers"], np.mean(list(ref.values()), axis=0), pos)


def test_chosen_token_of_a_steered_run_follows_the_step(embedded_model):
    """The watch must not change the run: the decision token's maps equal the runner's own capture."""
    from mclcbf_diag.report.overlay import token_attention_maps

    q = load_pope(shipped.pope_file("adversarial"))[42]
    image = load_image(resolve_image(q, shipped.IMAGES))
    cfg = B.apply_overrides(B.get_preset("fixed"), ["tau=0.6", "tokens=after_image"])
    result = trace_sample(embedded_model, q, image, cfg)
    _, inputs = sample_inputs(embedded_model, q.text, image)
    last = int(inputs["input_ids"].shape[1]) - 1
    maps = token_attention_maps(embedded_model, inputs, cfg, [last])[last]
    want = attention_maps(result.steered, result.steered.detected)
    base = attention_maps(result.baseline, result.baseline.detected)
    moved = False
    for key in want:  # each patch's probability within its mass floor
        assert_within_mass_floors(maps["intervened"][key], want[key], key)
        assert_within_mass_floors(maps["baseline"][key], base[key], key)
        moved |= not np.allclose(want[key], base[key], atol=1e-6)
    assert moved, "this configuration should change the decision token's attention"


def test_token_choice_is_checked():
    from mclcbf_diag.errors import UserError
    from mclcbf_diag.report.overlay import parse_token, resolve_token

    assert parse_token(" 7 ") == 7 and parse_token("-1") == -1 and parse_token("dog") == "dog"
    with pytest.raises(UserError, match="overlay-token"):
        parse_token("  ")
    tokens = ["<s>", "USER", ":", "<image>", "<image>", "<image>", "<image>", "\n", "Is", " there", " a", " Dog", "?"]
    mask = torch.tensor([t == "<image>" for t in tokens])
    assert resolve_token("Dog", tokens, mask) == 11 and resolve_token("dog", tokens, mask) == 11
    assert resolve_token(-1, tokens, mask) == 12 and resolve_token(7, tokens, mask) == 7
    for bad, why in ((2, "not after the image"), (13, "outside the prompt"), ("cat", "no token after the image")):
        with pytest.raises(UserError, match=why) as info:
            resolve_token(bad, tokens, mask)
        assert "'Dog'" in str(info.value)  # the valid choices are listed
