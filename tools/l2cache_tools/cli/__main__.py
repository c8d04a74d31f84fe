"""``python -m l2cache_tools.cli``: the same as the ``l2cache`` command."""

import sys

from . import main

sys.exit(main())
