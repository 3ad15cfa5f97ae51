"""`python -m quant ...`: the `quant` command."""

import sys

from quant.cli import main

sys.exit(main())
