"""What the development experiments share: their command line (``--data`` files, each run on its
own, ``--label-key`` and ``--label-map``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def parse_args(doc: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="labelled .h5ad file(s), each run on its own")
    p.add_argument("--label-key", default="celltype", help="obs column of the cell types (default: celltype)")
    p.add_argument("--label-map", default=None, metavar="TSV", help="two columns: label in the data, label to use (- leaves the cells out)")
    return p.parse_args(argv)


def each_data_file(main: Callable[[str, str, dict[str, str]], None], doc: str | None, argv: list[str] | None = None) -> None:
    """``main(path, label_key, label_map)`` for every ``--data`` file of the command line."""
    from data.labels import read_label_map

    args = parse_args(doc, argv)
    label_map = read_label_map(args.label_map) if args.label_map else {}
    for path in args.data:
        main(path, args.label_key, label_map)
