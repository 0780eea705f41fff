"""Moved to :mod:`mclcbf_diag.data.corrupt`; this import path stays for one release."""

import sys

from .data import corrupt as _moved

sys.modules[__name__] = _moved
