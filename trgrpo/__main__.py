"""`python -m trgrpo` (and `torchrun -m trgrpo`) is the `trgrpo` command."""

import sys

from trgrpo.cli import main

sys.exit(main())
