"""`python -m worker ...`: see worker/ops/cli.py."""

import sys

from worker.ops.cli import main

sys.exit(main())
