"""Moved to :mod:`mclcbf_diag.report.plots`; this import path stays for one release."""

import sys

from .report import plots as _moved

sys.modules[__name__] = _moved
