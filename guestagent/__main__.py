"""`python -m guestagent`: the same as the `guestagent` console script."""

from guestagent.cli import main

raise SystemExit(main())
