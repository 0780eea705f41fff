"""Moved to :mod:`mclcbf_diag.measurements.attribution`; this import path stays for one release."""

import sys

from .measurements import attribution as _moved

sys.modules[__name__] = _moved
