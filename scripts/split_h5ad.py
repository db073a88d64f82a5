"""Split an .h5ad into two files, stratified by a label column (for held-out evaluation)."""

from __future__ import annotations

import argparse

from data.io import InputError, read_cells, write_h5ad_atomic
from data.labels import label_column, stratified_holdout


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, epilog="example: python -m scripts.split_h5ad --data data/pbmc3k_labeled.h5ad --label-key celltype --test-frac 0.2 --out-train train.h5ad --out-test test.h5ad")
    p.add_argument("--data", required=True)
    p.add_argument("--label-key", required=True)
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-train", required=True)
    p.add_argument("--out-test", required=True)
    args = p.parse_args(argv)
    try:
        adata = read_cells(args.data)
        labels = label_column(adata, args.label_key, args.data)
    except InputError as e:
        p.exit(2, f"error: {e}\n")
    try:
        tr, te = stratified_holdout(labels.to_numpy(), args.test_frac, args.seed)
    except ValueError as e:
        p.exit(2, f"error: cannot split {args.data} by {args.label_key!r}: {e}\n")
    write_h5ad_atomic(adata[tr].copy(), args.out_train)
    write_h5ad_atomic(adata[te].copy(), args.out_test)
    print(f"{len(tr)} training cells -> {args.out_train}; {len(te)} test cells -> {args.out_test}")


if __name__ == "__main__":
    main()
