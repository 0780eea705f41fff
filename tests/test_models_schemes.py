"""models/schemes.py: every family has an image scheme, and the schemes' pure parts by hand (the overlay's tokens,
the pooled grid's refusal, how a batch's images reach the processor). Each family's scheme runs end to end, against
plain forwards, in its own test file (test_models_anyres, _onevision, _internvl, _gemma3, _qwen_vl, _qwen3_vl)."""

from types import SimpleNamespace

import pytest
import torch

from mclcbf_diag.errors import UserError
from mclcbf_diag.models.families import FAMILIES
from mclcbf_diag.models.schemes import (
    SCHEMES,
    AnyresScheme,
    Gemma3Scheme,
    ImageScheme,
    InternVLScheme,
    OnevisionScheme,
    Qwen3VLScheme,
    QwenVLScheme,
    owned_rows,
    pixel_owner,
    scheme_of,
)


def test_every_family_has_a_scheme_and_every_scheme_a_family():
    assert set(SCHEMES) == {f.model_type for f in FAMILIES}
    kinds = {"llava": ImageScheme, "llava_next": AnyresScheme, "llava_onevision": OnevisionScheme,
             "internvl": InternVLScheme, "gemma3": Gemma3Scheme, "qwen2_5_vl": QwenVLScheme, "qwen2_vl": QwenVLScheme,
             "qwen3_vl": Qwen3VLScheme}
    assert {m: type(s) for m, s in SCHEMES.items()} == kinds
    assert type(scheme_of(SimpleNamespace(model_type="llava"))) is ImageScheme
    assert type(scheme_of(SimpleNamespace())) is ImageScheme  # a config that names no family: LLaVA-1.5's


def _mask(length: int, image: range) -> torch.Tensor:
    out = torch.zeros(length, dtype=torch.bool)
    out[list(image)] = True
    return out


def test_the_overlay_tokens_of_each_layout():
    image = _mask(40, range(5, 35))  # 30 image tokens at 5 … 34
    assert torch.equal(ImageScheme().grid_mask(None, image), image)
    # LLaVA-NeXT with a CLS kept ("full"): the 2 × 2 base grid after it; OneVision: the first p² with no CLS
    vision = SimpleNamespace(image_size=28, patch_size=14)
    nxt = SimpleNamespace(model_type="llava_next", vision_feature_select_strategy="full", vision_config=vision)
    assert torch.nonzero(AnyresScheme().grid_mask(nxt, image)).flatten().tolist() == [6, 7, 8, 9]
    ov = SimpleNamespace(model_type="llava_onevision", vision_aspect_ratio="anyres_max_4", vision_config=vision)
    assert OnevisionScheme().params(ov) == (0, 4)
    assert torch.nonzero(OnevisionScheme().grid_mask(ov, image)).flatten().tolist() == [5, 6, 7, 8]
    # InternVL: the last tile's grid (the thumbnail): a 56-px tile of 14-px patches is 4 × 4, 2 × 2 tokens after
    # the pixel shuffle at 0.5, so the last 4 image tokens
    cfg = SimpleNamespace(model_type="internvl", downsample_ratio=0.5,
                          vision_config=SimpleNamespace(image_size=[56, 56], patch_size=[14, 14]))
    assert torch.nonzero(InternVLScheme().grid_mask(cfg, image)).flatten().tolist() == [31, 32, 33, 34]


def test_gemma3_takes_one_image_list_per_prompt_and_one_pooled_grid():
    scheme = Gemma3Scheme()
    assert scheme.processor_images(None, ["a", "b"]) == [["a"], ["b"]]
    assert ImageScheme().processor_images(None, ("a", "b")) == ["a", "b"]
    cfg = SimpleNamespace(mm_tokens_per_image=16)
    assert scheme.image_grid(cfg, {"pixel_values": torch.zeros(1, 3, 8, 8)}, 16, "ckpt") == (4, 4)
    with pytest.raises(UserError, match="pan-and-scan"):  # a crop added an image and its tokens
        scheme.image_grid(cfg, {"pixel_values": torch.zeros(2, 3, 8, 8)}, 32, "ckpt")
    crops = SimpleNamespace(image_processor=SimpleNamespace(do_pan_and_scan=True))
    with pytest.raises(UserError, match="do_pan_and_scan"):
        scheme.check_processor(cfg, crops, "ckpt")
    scheme.check_processor(cfg, SimpleNamespace(image_processor=SimpleNamespace(do_pan_and_scan=False)), "ckpt")


def test_the_overlay_picture_is_the_image_under_the_grid():
    """LLaVA-NeXT's pixels are [1, tiles, 3, H, W] and its grid is the base tile's (the first); InternVL's grid is
    the thumbnail's, its last row of pixels."""
    tiles = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    assert float(ImageScheme().picture({"pixel_values": tiles[None]}, None).mean()) == 0.0
    assert float(InternVLScheme().picture({"pixel_values": tiles}, None).mean()) == 3.0


def test_the_tiles_grid_of_a_small_anyres_layout_by_hand():
    """A 20 × 40 px image, 28-px tiles of 14-px patches (2 × 2 patches a tile), one 56 × 56 pinpoint, a CLS kept:
    the resized view is 2 × 2 tiles, a 4 × 4 patch map whose padding (the image is twice as wide as high) is one
    patch row above and one below, so the tiles' grid is 2 × 4. The 15 image tokens at prompt positions 3 … 17 are
    the CLS (3), the 2 × 2 base grid (4 … 7), then per tile row 4 patches and a newline: 8 … 11, newline 12,
    13 … 16, newline 17."""
    from mclcbf_diag.report.overlay import cell_grid

    vision = SimpleNamespace(image_size=28, patch_size=14)
    cfg = SimpleNamespace(model_type="llava_next", vision_feature_select_strategy="full", vision_config=vision,
                          image_grid_pinpoints=[[56, 56]])
    whole = torch.arange(3 * 56 * 56, dtype=torch.float32).view(3, 56, 56)  # the padded view, every pixel distinct
    tiles = [whole[:, r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] for r in range(2) for c in range(2)]  # row-major
    base = torch.full((3, 28, 28), -1.0)
    pad = torch.zeros(3, 28, 28)  # a batch's padding row after the tiles
    enc = {"image_sizes": torch.tensor([[20, 40]]), "pixel_values": torch.stack([base, *tiles, pad])[None]}
    grid = AnyresScheme().tile_grid(cfg, enc, _mask(20, range(3, 18)))
    assert grid.cells.tolist() == [[8, 9, 10, 11], [13, 14, 15, 16]]
    assert torch.equal(grid.pixels, whole[:, 14:42, :])  # one patch row (14 px) off the top and the bottom
    # an attention row whose value is its key's position reads back the cells; heads stay in front
    row = torch.arange(20.0)
    assert cell_grid(row, grid.cells).tolist() == grid.cells.tolist()
    assert cell_grid(torch.stack([row, 2 * row]), grid.cells)[1].tolist() == (2 * grid.cells).tolist()
    # the default selection (no CLS) moves every cell one token earlier; one grid a prompt: none for LLaVA-1.5
    default = SimpleNamespace(**{**vars(cfg), "vision_feature_select_strategy": "default"})
    assert AnyresScheme().tile_grid(default, enc, _mask(20, range(3, 17))).cells.tolist() == [[7, 8, 9, 10],
                                                                                              [12, 13, 14, 15]]
    assert ImageScheme().tile_grid(None, enc, _mask(20, range(3, 17))) is None


def test_which_prompt_owns_each_row_of_pixels_by_hand():
    """pixel_owner: InternVL's tiles (image token 7, 2 tokens a tile) over 3 left-padded prompts of 1, 3 and 2 tiles;
    Qwen-VL's flattened patches by image_grid_thw (2·2·2 = 8 and 1·2·4 = 8, then 1·2·2 = 4). owned_rows picks prompts
    2 and 0's rows in that order and renumbers their owners."""
    ids = torch.tensor([[0, 0, 0, 0, 1, 7, 7, 5],
                        [7, 7, 7, 7, 7, 7, 5, 5],
                        [0, 0, 1, 7, 7, 7, 7, 5]])
    owner = pixel_owner({"input_ids": ids}, 6, image_token_id=7)
    assert owner.tolist() == [0, 1, 1, 1, 2, 2]
    pixels = torch.arange(6.0)[:, None, None].expand(6, 2, 2)  # row r holds r
    mine, renumbered = owned_rows(pixels, owner, [2, 0])
    assert mine[:, 0, 0].tolist() == [4.0, 5.0, 0.0] and renumbered.tolist() == [0, 0, 1]
    grid = torch.tensor([[2, 2, 2], [1, 2, 4], [1, 2, 2]])
    patches = pixel_owner({"input_ids": ids, "image_grid_thw": grid}, 20)  # no image token needed
    assert patches.tolist() == [0] * 8 + [1] * 8 + [2] * 4
    flat = torch.arange(20.0)[:, None]
    assert owned_rows(flat, patches, [1])[0].flatten().tolist() == list(range(8, 16))
