"""`python -m plait.cli` (how torchrun starts every rank of `plait train`)."""

import sys

from plait.cli import main

sys.exit(main())
