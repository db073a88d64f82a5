"""``python -m model.info CKPT [--json]``: see :mod:`model.cli.info`."""

import sys

from model.cli.info import main

if __name__ == "__main__":
    sys.exit(main())
