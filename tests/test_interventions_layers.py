"""interventions/layers.py: a published layer range mapped to another depth, by hand."""

from mclcbf_diag.interventions.layers import depth_fraction


def test_the_published_depth_is_kept_and_other_depths_keep_the_fraction():
    assert depth_fraction(10, 28, 32) == tuple(range(10, 28))  # LLaVA-1.5-7B: as published
    # 4 layers (the embedded model): 10/32 → 1.25 → 1, 28/32 → 3.5 → 4 (half up): layers 1, 2, 3
    assert depth_fraction(10, 28, 4) == (1, 2, 3)
    # 40 layers (a 13B): 10·40/32 = 12.5 → 13, 28·40/32 = 35
    assert depth_fraction(10, 28, 40) == tuple(range(13, 35))
    assert depth_fraction(2, 32, 4) == (0, 1, 2, 3)
