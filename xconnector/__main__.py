"""`python -m xconnector ...`: the same as the `xconnector` command."""

import sys

from xconnector.cli import main

sys.exit(main())
