"""``python -m monoquant``: the same as the ``monoquant`` command."""

import sys

from .cli import main

sys.exit(main())
