"""``python -m mclcbf_diag.cli``."""

import sys

from . import main

sys.exit(main())
