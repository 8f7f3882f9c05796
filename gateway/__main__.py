"""`python -m gateway` runs the `xdsi-gateway` command."""

import sys

from gateway.cli import main

sys.exit(main())
