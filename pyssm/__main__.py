"""``python -m pyssm``: the pyssm command line (pyssm/cli.py)."""

import sys

from pyssm.cli import main

sys.exit(main())
