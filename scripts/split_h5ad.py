"""Split an .h5ad into two files, stratified by a label column (for held-out evaluation)."""

from __future__ import annotations

import argparse

import anndata as ad
from sklearn.model_selection import train_test_split


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, epilog="example: python scripts/split_h5ad.py --data data/pbmc3k_labeled.h5ad --label-key celltype --test-frac 0.2 --out-train train.h5ad --out-test test.h5ad")
    p.add_argument("--data", required=True)
    p.add_argument("--label-key", required=True)
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-train", required=True)
    p.add_argument("--out-test", required=True)
    args = p.parse_args(argv)
    adata = ad.read_h5ad(args.data)
    if args.label_key not in adata.obs:
        p.error(f"--label-key {args.label_key!r} is not a column of {args.data}; available: {list(adata.obs.columns)}")
    tr, te = train_test_split(range(adata.n_obs), test_size=args.test_frac, stratify=adata.obs[args.label_key], random_state=args.seed)
    adata[sorted(tr)].copy().write_h5ad(args.out_train, compression="gzip")
    adata[sorted(te)].copy().write_h5ad(args.out_test, compression="gzip")
    print(f"{len(tr)} training cells -> {args.out_train}; {len(te)} test cells -> {args.out_test}")


if __name__ == "__main__":
    main()
