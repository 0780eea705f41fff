"""Moved to :mod:`mclcbf_diag.report.pages`; this import path stays for one release."""

import sys

from .report import pages as _moved

sys.modules[__name__] = _moved
