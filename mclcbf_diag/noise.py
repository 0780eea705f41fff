"""Moved to :mod:`mclcbf_diag.measurements.noise`; this import path stays for one release."""

import sys

from .measurements import noise as _moved

sys.modules[__name__] = _moved
