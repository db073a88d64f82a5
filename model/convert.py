"""``python -m model.convert PUBLISHED.pth --genes GENES.txt [--classes CLASSES.txt] --out OURS.pt``:
see :mod:`model.cli.convert`."""

import sys

from model.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
