"""Moved to :mod:`mclcbf_diag.engine.batch`; this import path stays for one release."""

import sys

from .engine import batch as _moved

sys.modules[__name__] = _moved
