"""`python -m bloomduo ...` is the `bloomduo` command (what the launcher starts its services with)."""

import sys

from bloomduo.apps.cli import main

sys.exit(main())
