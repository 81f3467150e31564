"""``python -m refimpl`` is the ``ponder`` command line."""

import sys

from .cli import main

sys.exit(main())
