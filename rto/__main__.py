"""`python -m rto ...`: the `rto` command (also what `torchrun -m rto` and `accelerate launch -m rto` start)."""

import sys

from rto.cli import main

sys.exit(main())
