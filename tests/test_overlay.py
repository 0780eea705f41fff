"""Attention over the image: patch grids, the image as the model saw it, and the overlay figure."""


import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mclcbf_diag import barrier as B
from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.overlay import attention_maps, patch_grid, seen_image
from mclcbf_diag.plots import image_attention_figure
from mclcbf_diag.trace import sample_inputs, trace_sample

POPE = shipped.POPE


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
        r = result.records.query("condition == @cond and metric == 'attn_image_mass' and head == -1 and phase == 'prefill'")
        for layer, mass in zip(r.layer, r.value):
            assert maps[f"layer {layer}"].sum() == pytest.approx(mass, abs=1e-5)
        assert maps["steered layers"] == pytest.approx(np.mean([maps[f"layer {i}"] for i in steered], axis=0))
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
