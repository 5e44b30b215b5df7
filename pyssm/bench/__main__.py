import sys

from pyssm.bench.cli import main

sys.exit(main())
