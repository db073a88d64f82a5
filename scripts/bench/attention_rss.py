"""Peak memory and time of ``attn_analysis.py`` at the published size (16,906 genes, dim 200, depth 6,
10 heads of 64), as the input file and the number of scored cells grow.

Writes a randomly initialised published-size classifier and labelled raw-count files (4 types,
~10% of genes expressed per cell), then runs ``attn_analysis.py`` at its default settings
(``--markers none --gmt none``: the synthetic gene names match no marker) in a fresh process per
case and reports that process's peak RSS (``ru_maxrss``) and wall time.

    python -m scripts.bench.attention_rss                       # ~3 minutes on 2 cores
    python -m scripts.bench.attention_rss --genes 4000 --cases 200:2,16:0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository, where attn_analysis.py runs

TYPES = ["A", "B", "C", "D"]


def write_inputs(workdir: Path, genes: int, files: list[int]) -> None:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import torch
    from scipy import sparse

    from model.checkpoint import save_checkpoint
    from model.nn.config import ScBERTConfig
    from model.nn.network import ScBERT

    torch.manual_seed(0)
    names = [f"G{i}" for i in range(genes)]
    cfg = ScBERTConfig(n_genes=genes, dim=200, depth=6, heads=10, dim_head=64, head="classifier", n_classes=len(TYPES),
                       gene_embedding="learned")
    save_checkpoint(workdir / "model.pt", ScBERT(cfg), names, TYPES)
    rng = np.random.default_rng(0)
    for n in files:
        X = sparse.random(n, genes, density=0.1, format="csr", random_state=rng, dtype=np.float32)
        X.data = rng.poisson(3.0, X.nnz).astype(np.float32) + 1.0
        obs = pd.DataFrame({"celltype": [TYPES[i % len(TYPES)] for i in range(n)]}, index=[f"c{i}" for i in range(n)])
        adata = ad.AnnData(X=X, obs=obs)
        adata.var_names = names
        adata.write_h5ad(workdir / f"cells_{n}.h5ad")


def run_case(workdir: Path, n_file: int, per_type: int, extra: list[str]) -> dict[str, float]:
    out = workdir / f"out_{n_file}_{per_type}"
    cmd = [sys.executable, str(ROOT / "attn_analysis.py"), "--data", str(workdir / f"cells_{n_file}.h5ad"), "--model",
           str(workdir / "model.pt"), "--label-key", "celltype", "--out", str(out), "--markers", "none", "--gmt", "none",
           "--max-cells-per-type", str(per_type), "--overwrite", "--quiet", *extra]
    t0 = time.perf_counter()
    # a child of its own, so that ru_maxrss is this case's alone
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"attn_analysis.py failed:\n{res.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    scored = per_type * len(TYPES) if per_type else n_file
    return {"file_cells": n_file, "scored_cells": scored, "seconds": round(seconds, 1), "peak_rss_mb": int(res.stdout.split()[-1]) / 1024,
            "file_mb": (workdir / f"cells_{n_file}.h5ad").stat().st_size / 2**20}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genes", type=int, default=16906)
    p.add_argument("--cases", default="2000:2,24:0", help="FILE_CELLS:CELLS_PER_TYPE (0 = all), comma list (default: 2000:2,24:0)")
    p.add_argument("--extra", default="", help="more attn_analysis.py flags, space separated (e.g. '--max-memory 4')")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_inputs(workdir, args.genes, sorted({n for n, _ in cases}))
        rows = []
        for n_file, per_type in cases:
            row = run_case(workdir, n_file, per_type, args.extra.split())
            rows.append(row)
            print(f"{args.genes} genes: file of {row['file_cells']} cells ({row['file_mb']:.0f} MB), {row['scored_cells']} scored: "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB, {row['seconds']} s ({row['scored_cells'] / row['seconds']:.2f} cells/s "
                  f"end to end)", flush=True)
    print(f"machine: {os.cpu_count()} cores; attn_analysis.py defaults (--max-memory 0.5, --backed auto){' + ' + args.extra if args.extra else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps({"genes": args.genes, "extra": args.extra, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
