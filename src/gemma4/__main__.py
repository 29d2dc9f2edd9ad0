"""`python -m gemma4` (and `torchrun -m gemma4`): the command line."""

import sys

from .interfaces.cli import main

sys.exit(main())
