"""Moved to :mod:`mclcbf_diag.engine.runner`; this import path stays for one release."""

import sys

from .engine import runner as _moved

sys.modules[__name__] = _moved
