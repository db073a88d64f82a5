"""Write a synthetic preprocessed corpus (.h5ad, sparse CSR) of any size, in chunks, for scaling tests.

Each cell expresses ``--genes-per-cell`` genes drawn uniformly at random (without replacement)
with log2-normalised-looking values in [0.5, 6); the file carries the marker of preprocess.py, so
``pretrain.py --backed`` reads it directly. Memory stays at one chunk whatever the size.

    python -m scripts.make_corpus --cells 200000 --out /tmp/corpus_200k.h5ad
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data.preprocess import PREP_KEY


def make_corpus(out: Path, n_cells: int, n_genes: int = 16906, genes_per_cell: int = 1500, chunk: int = 5000, seed: int = 0,
                progress: bool = True) -> Path:
    """Write the corpus to ``out`` and return it."""
    rng = np.random.default_rng(seed)
    skeleton = ad.AnnData(obs=pd.DataFrame(index=[f"cell{i:07d}" for i in range(n_cells)]),
                          var=pd.DataFrame(index=[f"GENE{j:05d}" for j in range(n_genes)]))
    skeleton.uns[PREP_KEY] = json.dumps({"synthetic": True, "genes_per_cell": genes_per_cell, "seed": seed})
    skeleton.write_h5ad(out)
    k = min(genes_per_cell, n_genes)
    with h5py.File(out, "r+") as f:
        if "X" in f:
            del f["X"]
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([n_cells, n_genes])})
        data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 16,))
        indices = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
        indptr = X.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[:] = np.arange(n_cells + 1, dtype=np.int64) * k
        for start in tqdm(range(0, n_cells, chunk), desc="writing cells", unit="chunk", disable=not progress):
            n = min(chunk, n_cells - start)
            cols = np.sort(np.argpartition(rng.random((n, n_genes), dtype=np.float32), k, axis=1)[:, :k], axis=1)
            vals = rng.uniform(0.5, 6.0, n * k).astype(np.float32)
            end = (start + n) * k
            data.resize((end,))
            indices.resize((end,))
            data[start * k : end] = vals
            indices[start * k : end] = cols.ravel().astype(np.int32)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, required=True)
    p.add_argument("--genes", type=int, default=16906, help="vocabulary size (default: 16906, as published)")
    p.add_argument("--genes-per-cell", type=int, default=1500, help="expressed genes per cell (default: 1500)")
    p.add_argument("--chunk", type=int, default=5000, help="cells generated and written at a time (default: 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.time()
    out = make_corpus(Path(args.out), args.cells, args.genes, args.genes_per_cell, args.chunk, args.seed)
    print(f"wrote {out}: {args.cells} cells x {args.genes} genes, {args.genes_per_cell} expressed per cell, "
          f"{out.stat().st_size / 2**30:.2f} GiB in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
