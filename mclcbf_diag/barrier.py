"""MC-LCBF's names in one flat namespace for notebooks and scripts: :mod:`mclcbf_diag.interventions.mclcbf.names`.

``from mclcbf_diag import barrier as B`` gives that module itself (an alias, so nothing else outside the
intervention's package names its vocabulary).
"""

import sys

from .interventions.mclcbf import names as _moved

sys.modules[__name__] = _moved
