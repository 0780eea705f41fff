"""Moved to :mod:`mclcbf_diag.experiments.flow`; this import path stays for one release."""

import sys

from .experiments import flow as _moved

sys.modules[__name__] = _moved
