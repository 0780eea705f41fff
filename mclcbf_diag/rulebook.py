"""Moved to :mod:`mclcbf_diag.diagnosis.rulebook`; this import path stays for one release."""

import sys

from .diagnosis import rulebook as _moved

sys.modules[__name__] = _moved
