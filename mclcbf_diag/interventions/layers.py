"""Where an intervention acts along the depth: a published layer range mapped to a model of another depth.

Published interventions name layers of a 32-layer LLaVA-1.5-7B; :func:`depth_fraction` keeps the
same fraction of the depth on any model (the embedded model's 4 layers, a 40-layer 13B). Torch-free,
so knob checks stay fast.
"""

from __future__ import annotations

from ..errors import UserError


def depth_fraction(first: int, stop: int, n_layers: int, of: int = 32) -> tuple[int, ...]:
    """Layers ``first … stop−1`` of an ``of``-layer model, mapped to ``n_layers`` by fraction (rounded half up).

    Args:
        first: the first layer in the ``of``-layer model.
        stop: one past the last.
        n_layers: the model's layers.
        of: the layers of the model the range was published for.

    Returns:
        The layers of the ``n_layers``-layer model.
    """
    return tuple(range((2 * first * n_layers + of) // (2 * of), (2 * stop * n_layers + of) // (2 * of)))


def published_layers(layers, n_layers: int, first: int, stop: int) -> tuple[int, ...]:
    """Explicit ``layers`` (validated against ``n_layers``) or the paper's range of 32 layers, by depth fraction.

    Args:
        layers: explicit layers (None: the paper's range).
        n_layers: the model's layers.
        first: the paper's first layer (of 32).
        stop: one past the paper's last layer.

    Returns:
        The layers, sorted and unique.

    Raises:
        UserError: an explicit layer out of range.
    """
    if layers is None:
        return depth_fraction(first, stop, n_layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    return tuple(sorted(set(layers)))


__all__ = ["depth_fraction", "published_layers"]
