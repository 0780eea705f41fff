"""Progress bars for loops over more than a couple of seconds, in terminals and notebooks alike.

``tqdm.auto`` draws a widget in a Jupyter kernel, but without ``ipywidgets`` it warns
("IProgress not found") and falls back to text in every cell; here the text bar is chosen
directly when the widgets are not installed (``pip install mclcbf-diag[notebook]`` adds them),
so no output carries a warning. ``TQDM_DISABLE=1`` turns every bar off, as in tqdm.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
