"""Moved to :mod:`mclcbf_diag.experiments.attribute`; this import path stays for one release."""

import sys

from .experiments import attribute as _moved

sys.modules[__name__] = _moved
