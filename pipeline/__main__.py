"""``python -m pipeline``: the ``pan`` command, where only the source is at hand (a shipped working
directory on a cluster)."""

import sys

from pipeline.cli import main

sys.exit(main())
