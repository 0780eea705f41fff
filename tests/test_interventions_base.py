"""The seam (mclcbf_diag.interventions.base): rows, site coordinates and the Intervention defaults.

Coordinates are checked on a hand-built left-padded batch; a fake run stands in for the
runner (a Site only reads ``phase, step, rows, steer, dose, start`` from it).
"""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from mclcbf_diag.errors import UserError
from mclcbf_diag.interventions.base import Intervention, Row, Site, rows_of

IMG = 9
# row 0: 2 pads, then BOS, 3 image tokens, 2 text tokens; row 1: no padding, image at 1..2
IDS = torch.tensor([[0, 0, 1, IMG, IMG, IMG, 5, 6],
                    [1, IMG, IMG, 4, 5, 6, 7, 8]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1, 1, 1, 1]])


def test_rows_of_a_left_padded_batch():
    r0, r1 = rows_of(IDS, MASK, IMG)
    assert (r0.index, r0.pad, r0.length, r0.decision, r0.last_image) == (0, 2, 6, 5, 3)
    assert r0.ids.tolist() == [1, IMG, IMG, IMG, 5, 6] and r0.image.tolist() == [False, True, True, True, False, False]
    assert r0.after_image().tolist() == [4, 5]
    assert (r1.pad, r1.length, r1.last_image) == (0, 8, 2) and r1.after_image().tolist() == [3, 4, 5, 6, 7]
    ends_with_image = Row(0, 0, torch.tensor([1, IMG]), torch.tensor([False, True]))
    assert ends_with_image.after_image().tolist() == [1]  # nothing after the image: the decision token


def test_rows_of_refuses_a_prompt_without_image_token():
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(UserError, match="no image token .* <image>") as info:
        rows_of(ids, torch.ones_like(ids), IMG)
    assert "\n" not in str(info.value)


def _site(tensor, start=0, steer=True, phase="prefill"):
    run = SimpleNamespace(phase=phase, decode_step=0, rows=rows_of(IDS, MASK, IMG), steer=steer, dose=1.0, start=start)
    return Site(run, "attention", 0, tensor), run.rows


def test_site_coordinates_full_prompt():
    site, (r0, r1) = _site(torch.zeros(2, 4, 8, 8))
    assert site.seq == 8
    assert site.positions(r0).tolist() == list(range(6)) and site.positions(r1).tolist() == list(range(8))
    assert site.current(r0) == 5 and site.current(r1) == 7
    assert site.query_index(r0, [0, 5]).tolist() == [2, 7]
    assert site.key_mask(r0, r0.image).tolist() == [False, False, False, True, True, True, False, False]


def test_site_coordinates_after_a_cached_prefix():
    # positions 0..5 of the padded batch are cached; the forward computes padded positions 6, 7
    site, (r0, r1) = _site(torch.zeros(2, 4, 2, 8), start=6)
    assert site.positions(r0).tolist() == [4, 5] and site.positions(r1).tolist() == [6, 7]
    assert site.current(r0) == 5 and site.query_index(r0, [4, 5]).tolist() == [0, 1]


def test_set_rows_writes_the_rows_queries_and_a_measuring_run_cannot_edit():
    probs = torch.zeros(2, 1, 8, 8)
    site, (r0, _) = _site(probs)
    site.set_rows(r0, [5], torch.full((1, 1, 8), 0.125))
    assert probs[0, 0, 7].tolist() == [0.125] * 8 and probs[0, 0, :7].abs().sum() == 0 and probs[1].abs().sum() == 0
    measuring, (m0, _) = _site(torch.zeros(2, 1, 8, 8), steer=False)
    with pytest.raises(RuntimeError, match="must not edit"):
        measuring.set_rows(m0, [5], torch.zeros(1, 1, 8))
    with pytest.raises(RuntimeError, match="must not edit"):
        measuring.add(m0, [5], torch.zeros(1, 8))


@dataclass(frozen=True)
class _Knobs:
    scale: float = 1.0
    layers: tuple[int, ...] = (0,)


class _Scaled(Intervention):
    name = "scaled"
    Knobs = _Knobs
    presets: ClassVar[dict] = {"one": _Knobs(), "two": _Knobs(2.0)}
    aliases: ClassVar[dict] = {"both": ("scale",)}


def test_presets_overrides_replace_and_describe():
    assert _Scaled().knobs == _Knobs()  # the first preset is the default
    iv = _Scaled.from_preset("two", ["layers=1,3"])
    assert iv.knobs == _Knobs(2.0, (1, 3))
    assert iv.replace(scale=0.5).knobs == _Knobs(0.5, (1, 3)) and iv.knobs.scale == 2.0
    assert iv.describe() == {"intervention": "scaled", "knobs": {"scale": 2.0, "layers": [1, 3]}}  # JSON-able
    with pytest.raises(UserError, match="unknown preset 'three' for scaled; valid presets: one, two"):
        _Scaled.from_preset("three")
    with pytest.raises(TypeError, match="takes _Knobs"):
        _Scaled(object())


def test_the_defaults_do_nothing():
    iv = Intervention()
    assert iv.layers(32) == () and iv.open_sites(True) == frozenset() and iv.first_edited(None) is None
    assert iv.fixes() == {} and iv.rules() == [] and iv.row_records(None) == {} and iv.row_summary({}) == {}
    assert iv.steers_decode()
