"""``python -m dualres_ext <command>``: the command line of :mod:`dualres_ext.tools.cli`."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
