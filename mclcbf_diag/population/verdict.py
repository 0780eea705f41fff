"""Moved to :mod:`mclcbf_diag.experiments.verdict`; this import path stays for one release."""

import sys

from ..experiments import verdict as _moved

sys.modules[__name__] = _moved
