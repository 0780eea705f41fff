"""Moved to :mod:`mclcbf_diag.experiments.explain`; this import path stays for one release."""

import sys

from .experiments import explain as _moved

sys.modules[__name__] = _moved
