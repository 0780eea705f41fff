"""Moved to :mod:`mclcbf_diag.measurements.probes`; this import path stays for one release."""

import sys

from .measurements import probes as _moved

sys.modules[__name__] = _moved
