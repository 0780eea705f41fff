"""Moved to :mod:`mclcbf_diag.engine.units`; this import path stays for one release."""

import sys

from ..engine import units as _moved

sys.modules[__name__] = _moved
