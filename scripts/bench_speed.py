"""Speed and memory of prediction, fine-tuning and pretraining: our fast path vs a naive loop.

Every case runs in its own subprocess so its peak RSS (``ru_maxrss``) is its own. Cases, all on
the same randomly initialised model size (the same seed, hence the same weights):

* ``predict``: ``predict.py`` end to end (read h5ad -> write annotated h5ad) with the fast path
  and ``--batch-size``; the naive reference reads the same file, preprocesses it the same way and
  runs the plain model one cell at a time in fp32 (the published way), then writes the result.
* ``finetune`` / ``pretrain``: optimiser steps (published freezing policy for fine-tuning, 15%
  masking for pretraining); naive = plain model, batch size 3, fp32.
* ``scaling``: seconds per cell of a fast forward pass at several gene counts.

    python scripts/bench_speed.py                 # published size (slow: minutes)
    python scripts/bench_speed.py --quick         # 2,000 genes, 2 layers: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBLISHED_GENES = 16906


def _model(args: argparse.Namespace, head: str, fast: bool) -> Any:
    import torch

    from model.config import ScBERTConfig
    from model.fast import enable_fast_attention
    from model.scbert import ScBERT

    torch.manual_seed(0)
    cfg = ScBERTConfig(n_genes=args.genes, dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                       head=head, n_classes=8 if head == "classifier" else 0, gene_embedding="learned")
    model = ScBERT(cfg)
    return enable_fast_attention(model) if fast else model


def _counts(n_cells: int, n_genes: int, seed: int = 0) -> Any:
    """Sparse raw-count-like cells x genes matrix, ~10% of genes expressed per cell."""
    import numpy as np
    from scipy import sparse

    rng = np.random.default_rng(seed)
    X = sparse.random(n_cells, n_genes, density=0.1, format="csr", random_state=rng, dtype=np.float32)
    X.data = rng.poisson(3.0, X.nnz).astype(np.float32) + 1.0
    return X


def _write_inputs(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """A checkpoint of the benchmark classifier and a query h5ad of ``--cells`` cells."""
    import anndata as ad

    from model.checkpoint import save_checkpoint

    genes = [f"G{i}" for i in range(args.genes)]
    ckpt = workdir / "model.pt"
    save_checkpoint(ckpt, _model(args, "classifier", fast=False), genes, [f"type{i}" for i in range(8)])
    adata = ad.AnnData(X=_counts(args.cells, args.genes))
    adata.var_names = genes
    adata.obs_names = [f"c{i}" for i in range(args.cells)]
    query = workdir / "query.h5ad"
    adata.write_h5ad(query)
    return ckpt, query


def case_predict(args: argparse.Namespace, fast: bool) -> dict[str, Any]:
    workdir = Path(args.workdir)
    ckpt, query = workdir / "model.pt", workdir / "query.h5ad"
    out = workdir / f"out_{'fast' if fast else 'naive'}.h5ad"
    t0 = time.perf_counter()
    if fast:
        import predict

        predict.main(["--data", str(query), "--model", str(ckpt), "--out", str(out), "--batch-size", str(args.batch_size),
                      "--precision", args.precision, "--overwrite", "--quiet"])
    else:
        import numpy as np
        import torch

        from data.dataset import tokenize_rows
        from data.io import read_cells
        from data.preprocess import prepare
        from model.checkpoint import load_checkpoint
        from model.fast import disable_fast_attention

        ck = load_checkpoint(ckpt)
        model = disable_fast_attention(ck.build_model()).eval()
        adata, _ = prepare(read_cells(query), genes=ck.genes, min_genes=None,
                           target_sum=ck.preprocessing.get("target_sum", 1e4), what=str(query))
        probs = []
        with torch.no_grad():
            for i in range(adata.n_obs):
                tokens = tokenize_rows(adata.X, [i], model.config.bin_num)
                probs.append(torch.softmax(model(tokens), dim=-1)[0].numpy())
        p = np.stack(probs)
        adata.obs["scbert_celltype"] = np.asarray(ck.classes)[p.argmax(1)]
        adata.obsm["scbert_probabilities"] = p
        adata.write_h5ad(out)
    dt = time.perf_counter() - t0
    return {"cells": args.cells, "seconds": dt, "cells_per_s": args.cells / dt, "out": str(out)}


def case_train(args: argparse.Namespace, kind: str, fast: bool) -> dict[str, Any]:
    import torch
    from torch import nn

    from data.dataset import IGNORE_INDEX, tokenize_rows
    from data.dataset import mask_tokens as mask

    model = _model(args, "classifier" if kind == "finetune" else "mlm", fast)
    if kind == "finetune":
        model.freeze_for_finetuning()
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    X = _counts(args.train_cells, args.genes)
    X.data = X.data.clip(max=7.0)  # already "binned-ish" values; tokenisation caps at bin_num
    batch = 3 if not fast else args.train_batch_size
    gen = torch.Generator().manual_seed(1)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    t0 = time.perf_counter()
    for s in range(0, args.train_cells, batch):
        tokens = tokenize_rows(X, range(s, min(s + batch, args.train_cells)), model.config.bin_num)
        if kind == "finetune":
            loss = loss_fn(model(tokens), torch.zeros(len(tokens), dtype=torch.long))
        else:
            inputs, labels = mask(tokens, model.config.mask_token, 0.15, 0.9, gen)
            loss = loss_fn(model(inputs).transpose(1, 2), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    return {"cells": args.train_cells, "batch_size": batch, "seconds": dt, "cells_per_s": args.train_cells / dt}


def case_scaling(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    model = _model(args, "classifier", fast=True).eval()
    tokens = torch.randint(0, 6, (1, args.genes + 1))
    with torch.inference_mode():
        model(tokens)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            model(tokens)
    dt = (time.perf_counter() - t0) / args.repeats
    return {"genes": args.genes, "depth": args.depth, "s_per_cell": dt, "us_per_gene": dt / args.genes * 1e6}


def run_case(argv: list[str]) -> dict[str, Any]:
    """Run ``--case`` in a fresh interpreter; returns its result with ``peak_rss_mb``."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"case {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_args(args: argparse.Namespace, genes: int | None = None, depth: int | None = None) -> list[str]:
    return ["--genes", str(genes or args.genes), "--dim", str(args.dim), "--depth", str(depth or args.depth),
            "--heads", str(args.heads), "--dim-head", str(args.dim_head)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genes", type=int, default=PUBLISHED_GENES)
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--cells", type=int, default=8, help="cells to predict")
    p.add_argument("--batch-size", type=int, default=8, help="fast predict batch size")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fast predict precision")
    p.add_argument("--train-cells", type=int, default=3, help="cells per training measurement")
    p.add_argument("--train-batch-size", type=int, default=3, help="fast training batch size (naive is always 3)")
    p.add_argument("--scaling-genes", default="2000,4000,8000,16906")
    p.add_argument("--scaling-depth", type=int, default=1, help="layers for the scaling table (time is linear in depth)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip", default="", help="comma list of predict,finetune,pretrain,scaling to skip")
    p.add_argument("--quick", action="store_true", help="2,000 genes, depth 2, few cells")
    p.add_argument("--json", default="bench_speed.json")
    p.add_argument("--md", default="bench_speed.md")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case:
        if args.case == "scaling":
            res = case_scaling(args)
        elif args.case.startswith("predict"):
            res = case_predict(args, args.case.endswith(":fast"))
        else:
            kind, mode = args.case.split(":")
            res = case_train(args, kind, mode == "fast")
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    if args.quick:
        args.genes, args.depth, args.cells = 2000, 2, 8
        args.scaling_genes = "1000,2000,4000,8000"
    import torch

    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": {"genes": args.genes, "dim": args.dim, "depth": args.depth, "heads": args.heads, "dim_head": args.dim_head},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "predict" not in skip:
            _write_inputs(args, Path(tmp))
            extra = ["--cells", str(args.cells), "--batch-size", str(args.batch_size), "--precision", args.precision, "--workdir", tmp]
            naive = run_case(["--case", "predict:naive", *model_args(args), *extra])
            fast = run_case(["--case", "predict:fast", *model_args(args), *extra])
            fast["agreement"] = _agreement(naive.pop("out"), fast.pop("out"))
            report["cases"]["predict"] = _pair(naive, fast)
            print(_line("predict", report["cases"]["predict"]), flush=True)
        for kind in ("finetune", "pretrain"):
            if kind in skip:
                continue
            extra = ["--train-cells", str(args.train_cells), "--train-batch-size", str(args.train_batch_size)]
            naive = run_case(["--case", f"{kind}:naive", *model_args(args), *extra])
            fast = run_case(["--case", f"{kind}:fast", *model_args(args), *extra])
            report["cases"][kind] = _pair(naive, fast)
            print(_line(kind, report["cases"][kind]), flush=True)
    if "scaling" not in skip:
        rows = []
        for g in (int(x) for x in args.scaling_genes.split(",")):
            rows.append(run_case(["--case", "scaling", "--repeats", str(args.repeats), *model_args(args, g, args.scaling_depth)]))
            print(f"scaling: {g} genes: {rows[-1]['s_per_cell']:.3f} s/cell, {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
        report["scaling"] = rows
    Path(args.json).write_text(json.dumps(report, indent=2))
    Path(args.md).write_text(_markdown(report))
    print(_markdown(report))


def _agreement(naive_path: str, fast_path: str) -> float:
    import anndata as ad
    import numpy as np

    a, b = ad.read_h5ad(naive_path), ad.read_h5ad(fast_path)
    pa, pb = a.obsm["scbert_probabilities"], b.obsm["scbert_probabilities"]
    return float((np.asarray(pa).argmax(1) == np.asarray(pb).argmax(1)).mean())


def _pair(naive: dict[str, Any], fast: dict[str, Any]) -> dict[str, Any]:
    return {"naive": naive, "fast": fast, "speedup": fast["cells_per_s"] / naive["cells_per_s"],
            "rss_ratio": fast["peak_rss_mb"] / naive["peak_rss_mb"]}


def _line(name: str, c: dict[str, Any]) -> str:
    return (f"{name}: naive {c['naive']['cells_per_s']:.4f} cells/s ({c['naive']['peak_rss_mb']:.0f} MB), "
            f"fast {c['fast']['cells_per_s']:.4f} cells/s ({c['fast']['peak_rss_mb']:.0f} MB), x{c['speedup']:.2f}")


def _markdown(r: dict[str, Any]) -> str:
    m = r["model"]
    lines = [f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']} "
             f"({r['machine']['threads']} threads). Model: {m['genes']} genes, dim {m['dim']}, depth {m['depth']}, "
             f"heads {m['heads']} x {m['dim_head']}.", "", f"Command: `{r['command']}`", "",
             "| case | naive cells/s | fast cells/s | speed-up | naive peak RSS (MB) | fast peak RSS (MB) | notes |",
             "|---|---|---|---|---|---|---|"]
    for name, c in r["cases"].items():
        n, f = c["naive"], c["fast"]
        note = f"{n['cells']} cells"
        if "batch_size" in f:
            note += f"; batch naive {n['batch_size']}, fast {f['batch_size']}"
        if "agreement" in f:
            note += f"; label agreement {f['agreement']:.4f}"
        lines.append(f"| {name} | {n['cells_per_s']:.4f} | {f['cells_per_s']:.4f} | {c['speedup']:.2f}x | "
                     f"{n['peak_rss_mb']:.0f} | {f['peak_rss_mb']:.0f} | {note} |")
    if r.get("scaling"):
        lines += ["", "| genes | depth | fast s/cell | us per gene | peak RSS (MB) |", "|---|---|---|---|---|"]
        for s in r["scaling"]:
            lines.append(f"| {s['genes']} | {s['depth']} | {s['s_per_cell']:.3f} | {s['us_per_gene']:.1f} | {s['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
