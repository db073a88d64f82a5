"""Peak memory of ``predict.py --backed`` (a chunk of cells at a time) as the query grows.

For each size, a synthetic query (``python -m scripts.make_corpus``: 16,906 genes, ``--genes-per-cell``
expressed per cell, sparse by cell) is written to ``--workdir``; a tiny fine-tuned-format
checkpoint (random weights, ``--model-genes`` of those genes, 3 classes) annotates it in a fresh
process, which reports its peak resident memory (VmHWM) and time; output and query are deleted.
``--in-memory`` sizes are also run reading the whole file (``--backed false``), for contrast. The
model is tiny on purpose: what is measured is the memory of reading, preprocessing and writing,
which does not depend on the model. Prints a table; the figures depend on the machine.

    python -m scripts.bench.predict_rss --sizes 20000 200000 --in-memory 20000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository: the child process runs there, as a module


def child(argv: list[str]) -> None:
    """Run predict.py in this process and print its peak RSS as JSON."""
    import predict
    from scripts.bench.corpus_rss import peak_rss_mb

    t0 = time.time()
    predict.main(argv)
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(time.time() - t0, 1)}))


def tiny_classifier(path: Path, genes: list[str]) -> Path:
    import torch

    from model.checkpoint import save_checkpoint
    from model.nn.config import ScBERTConfig
    from model.nn.network import ScBERT

    torch.manual_seed(0)
    cfg = ScBERTConfig(n_genes=len(genes), dim=8, depth=1, heads=2, dim_head=4, head="classifier", n_classes=3)
    save_checkpoint(path, ScBERT(cfg), genes, ["type_a", "type_b", "type_c"])
    return path


def measure(data: Path, model: Path, out: Path, backed: bool, opts: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "scripts.bench.predict_rss", "--child", "--", "--data", str(data), "--model", str(model), "--out", str(out), "--overwrite",
           "--quiet", "--device", "cpu", "--batch-size", str(opts.batch_size), "--chunk-size", str(opts.chunk_size),
           "--backed", "true" if backed else "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--") + 1 :])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000], help="query sizes (cells) annotated with --backed")
    p.add_argument("--in-memory", type=int, nargs="*", default=[], help="sizes also annotated with the file read whole")
    p.add_argument("--genes-per-cell", type=int, default=1500)
    p.add_argument("--model-genes", type=int, default=2000, help="genes of the tiny model (the query has 16,906; default: 2000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=10000)
    p.add_argument("--workdir", default=None, help="where the queries are written (default: a temporary folder); each is deleted after use")
    opts = p.parse_args()
    import anndata as ad

    from scripts.make_corpus import make_corpus

    work = Path(opts.workdir or tempfile.mkdtemp(prefix="scbert_predict_rss_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in sorted(set(opts.sizes) | set(opts.in_memory)):
            data = work / f"query_{n}.h5ad"
            t0 = time.time()
            make_corpus(data, n, genes_per_cell=opts.genes_per_cell, progress=False)
            size_gib = data.stat().st_size / 2**30
            print(f"{n} cells: wrote {size_gib:.2f} GiB in {time.time() - t0:.0f} s", flush=True)
            model = work / "model.pt"
            if not model.exists():
                tiny_classifier(model, list(ad.read_h5ad(data, backed="r").var_names[: opts.model_genes]))
            for backed in (True, False):
                if (backed and n in opts.sizes) or (not backed and n in opts.in_memory):
                    out = work / f"out_{n}_{backed}.h5ad"
                    r = measure(data, model, out, backed, opts)
                    rows.append((n, "chunks (--backed)" if backed else "in memory", size_gib, r["peak_rss_mb"], r["seconds"]))
                    print(f"  {rows[-1][1]}: peak RSS {r['peak_rss_mb']:.0f} MiB, {r['seconds']} s ({n / r['seconds']:.0f} cells/s)", flush=True)
                    out.unlink(missing_ok=True)
                    shutil.rmtree(out.with_name(out.stem + "_run"), ignore_errors=True)
            data.unlink()
    finally:
        if not opts.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\npredict.py, tiny model on {opts.model_genes} genes, query of 16,906 genes with {opts.genes_per_cell} expressed per cell, "
          f"batch {opts.batch_size}, chunk {opts.chunk_size}")
    print(f"{'cells':>8}  {'reading':<18} {'file GiB':>8}  {'peak RSS MiB':>12}  {'seconds':>7}  {'cells/s':>7}")
    for n, how, gib, rss, sec in rows:
        print(f"{n:>8}  {how:<18} {gib:>8.2f}  {rss:>12.0f}  {sec:>7}  {n / sec:>7.0f}")


if __name__ == "__main__":
    main()
