"""Moved to :mod:`mclcbf_diag.experiments.trace`; this import path stays for one release."""

import sys

from .experiments import trace as _moved

sys.modules[__name__] = _moved
