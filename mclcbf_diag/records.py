"""Moved to :mod:`mclcbf_diag.measurements.records`; this import path stays for one release."""

import sys

from .measurements import records as _moved

sys.modules[__name__] = _moved
