"""`python -m hostagent` is the `hostagent` command."""

import sys

from hostagent.cli import main

sys.exit(main())
