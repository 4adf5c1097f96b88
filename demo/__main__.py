"""``python -m lsoftmax_core.demo``: the same as the ``lsoftmax-demo`` command."""

import sys

from .app import main

sys.exit(main())
