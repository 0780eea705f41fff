"""Moved to :mod:`mclcbf_diag.diagnosis.diagnose`; this import path stays for one release."""

import sys

from .diagnosis import diagnose as _moved

sys.modules[__name__] = _moved
