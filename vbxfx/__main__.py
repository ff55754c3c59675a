"""``python -m vbxfx`` runs the command line."""

import sys

from vbxfx.cli import main

sys.exit(main())
