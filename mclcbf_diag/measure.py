"""Moved to :mod:`mclcbf_diag.measurements.measure`; this import path stays for one release."""

import sys

from .measurements import measure as _moved

sys.modules[__name__] = _moved
