"""Moved to :mod:`mclcbf_diag.report.overlay`; this import path stays for one release."""

import sys

from .report import overlay as _moved

sys.modules[__name__] = _moved
