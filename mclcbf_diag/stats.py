"""Moved to :mod:`mclcbf_diag.measurements.stats`; this import path stays for one release."""

import sys

from .measurements import stats as _moved

sys.modules[__name__] = _moved
