"""`python -m toolmesh` runs the command line."""

import sys

from toolmesh.cli import main

sys.exit(main())
