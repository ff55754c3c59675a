"""``python -m vbxfx`` runs the command line."""

import sys

from vbxfx.cli.main import main

sys.exit(main())
