"""`python -m diffattn ...` runs the CLI (the same as the `diffattn` console script)."""

import sys

from .cli import main


sys.exit(main())
