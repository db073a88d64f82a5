"""Peak memory of pretraining from disk (``pretrain.py --backed``) as the corpus grows.

For each size, a synthetic corpus (``python -m scripts.make_corpus``: 16,906 genes, ``--genes-per-cell``
expressed per cell) is written to ``--workdir``, a fresh process runs a few optimiser steps of
``pretrain.py --backed`` on it and reports its peak resident memory (``ru_maxrss``), and the file
is deleted. ``--in-memory`` sizes are also run without ``--backed`` (the whole matrix loaded), for
contrast. Prints a table; the figures depend on the machine.

    python -m scripts.bench.corpus_rss --sizes 20000 200000 --in-memory 20000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository: the child process runs there, as a module


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the running program only; ru_maxrss
    (the fallback off Linux) also keeps the peak of the process that started it, from before exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """Run pretraining in this process and print its peak RSS as JSON."""
    import pretrain

    t0 = time.time()
    pretrain.main(args.pretrain_args)
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(time.time() - t0, 1)}))


def measure(data: Path, out: Path, backed: bool, opts: argparse.Namespace) -> dict[str, float]:
    import anndata as ad

    genes = out.with_suffix(".genes.txt")
    genes.write_text("\n".join(ad.read_h5ad(data, backed="r").var_names) + "\n")  # synthetic names: keep them all
    cmd = [sys.executable, "-m", "scripts.bench.corpus_rss", "--child", "--", "--data", str(data), "--vocab", str(genes), "--out", str(out), "--overwrite", "--quiet",
           "--device", "cpu", "--dim", "16", "--depth", "1", "--heads", "2", "--dim-head", "8", "--batch-size", str(opts.batch_size),
           "--max-steps", str(opts.steps), "--val-frac", "0.001", "--gene2vec", opts.gene2vec, "--gene2vec-cells",
           str(opts.gene2vec_cells), "--min-genes", "0", "--num-workers", str(opts.num_workers)]
    if backed:
        cmd.append("--backed")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--child" in sys.argv:
        ns = argparse.Namespace(pretrain_args=sys.argv[sys.argv.index("--") + 1 :])
        child(ns)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000], help="corpus sizes (cells) read from disk")
    p.add_argument("--in-memory", type=int, nargs="*", default=[], help="sizes also run with the matrix loaded into memory")
    p.add_argument("--genes-per-cell", type=int, default=1500)
    p.add_argument("--steps", type=int, default=5, help="optimiser steps per measurement (default: 5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--gene2vec", default="none", help="'none' (default) or 'train' (co-expression on --gene2vec-cells sampled cells)")
    p.add_argument("--gene2vec-cells", type=int, default=5000)
    p.add_argument("--workdir", default=None, help="where the corpora are written (default: a temporary folder); each is deleted after use")
    opts = p.parse_args()
    from scripts.make_corpus import make_corpus

    work = Path(opts.workdir or tempfile.mkdtemp(prefix="scbert_rss_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in sorted(set(opts.sizes) | set(opts.in_memory)):
            data = work / f"corpus_{n}.h5ad"
            t0 = time.time()
            make_corpus(data, n, genes_per_cell=opts.genes_per_cell, progress=False)
            size_gib = data.stat().st_size / 2**30
            print(f"{n} cells: wrote {size_gib:.2f} GiB in {time.time() - t0:.0f} s", flush=True)
            for backed in (True, False):
                if (backed and n in opts.sizes) or (not backed and n in opts.in_memory):
                    r = measure(data, work / f"run_{n}_{backed}", backed, opts)
                    rows.append((n, "disk (--backed)" if backed else "in memory", size_gib, r["peak_rss_mb"], r["seconds"]))
                    print(f"  {rows[-1][1]}: peak RSS {r['peak_rss_mb']:.0f} MiB ({r['seconds']} s)", flush=True)
            data.unlink()
    finally:
        if not opts.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\npretraining, {opts.steps} optimiser steps of {opts.batch_size} cells, 16,906 genes, {opts.genes_per_cell} expressed per cell, "
          f"gene2vec {opts.gene2vec}")
    print(f"{'cells':>8}  {'reading':<16} {'file GiB':>8}  {'peak RSS MiB':>12}  {'seconds':>7}")
    for n, how, gib, rss, sec in rows:
        print(f"{n:>8}  {how:<16} {gib:>8.2f}  {rss:>12.0f}  {sec:>7}")


if __name__ == "__main__":
    main()
