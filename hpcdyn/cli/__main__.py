"""``python -m hpcdyn.cli``: the same entry point as the ``hpcdyn`` script."""

import sys

from hpcdyn.cli.main import main

sys.exit(main())
