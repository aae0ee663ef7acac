"""``python -m kvmkit``: the same command line as the ``kvmkit`` script."""

import sys

from kvmkit.cli import main

sys.exit(main())
