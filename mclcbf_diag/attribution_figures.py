"""Moved to :mod:`mclcbf_diag.report.attribution_figures`; this import path stays for one release."""

import sys

from .report import attribution_figures as _moved

sys.modules[__name__] = _moved
