"""Moved to :mod:`mclcbf_diag.measurements.outcomes`; this import path stays for one release."""

import sys

from .measurements import outcomes as _moved

sys.modules[__name__] = _moved
