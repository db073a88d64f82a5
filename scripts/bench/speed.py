"""Speed and memory of prediction, fine-tuning and pretraining: our fast path vs the naive loop.

Every measurement runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own. All
cases use the same randomly initialised model (same seed, same weights) at the size given
(default: the published one, 16,906 genes, dim 200, depth 6, 10 heads of 64).

* ``predict``: ``predict.py`` end to end (read h5ad -> preprocess -> annotate -> write h5ad) with
  ``--batch-size``; the naive reference reads the same file, preprocesses it the same way, runs the
  plain ``performer_pytorch`` model one cell at a time in fp32 (the published way) and writes the
  same result.
* ``finetune`` / ``pretrain``: optimiser steps (published freezing policy for fine-tuning, 15%
  masking for pretraining). Naive = plain model, batch size 3, fp32 (the published setting). The
  first step of each run is a warm-up and is not timed.
* ``scaling``: seconds per cell and peak RSS of a fast forward pass and of the attention-received
  scores (attn_analysis) at several gene counts, to show linear cost.
* ``batch``: peak RSS of a fast forward pass at several batch sizes.
* ``roofline``: this machine's matrix-product rate (fp32, bf16) against the model's FLOPs
  (:mod:`model.nn.flops`): the fastest any implementation of the same model could run here, and what
  fraction of it the naive and fast encoders reach (with ``kernel``).
* ``agreement`` (with ``--checkpoint`` and ``--query``, e.g. the demo's fine-tuned model): labels of
  ``annotate`` in bf16 vs fp32, and fast vs naive, on real cells.

With ``--rounds R`` the naive and fast runs alternate R times and the fastest of each is kept,
which makes the ratio robust to other load on the machine.

    python -m scripts.bench.speed                   # published size (slow on a CPU: ~30 minutes)
    python -m scripts.bench.speed --quick           # 2,000 genes, 2 layers: a few minutes

Run from the repository root (each case runs as ``python -m scripts.bench.speed --case ...`` there).
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

ROOT = Path(__file__).resolve().parents[2]  # the repository: the cases run there, as modules

PUBLISHED_GENES = 16906
N_CLASSES = 8


def _model(args: argparse.Namespace, head: str, fast: bool) -> Any:
    import torch

    from model.nn.config import NAIVE, ExecutionOptions, ScBERTConfig
    from model.nn.network import ScBERT

    torch.manual_seed(0)
    cfg = ScBERTConfig(n_genes=args.genes, dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                       head=head, n_classes=N_CLASSES if head == "classifier" else 0, gene_embedding="learned")
    model = ScBERT(cfg, options=ExecutionOptions(compile=args.compile) if fast else NAIVE)
    model.performer.proj_updater.feature_redraw_interval = None  # identical features for every run
    return model


def _counts(n_cells: int, n_genes: int, seed: int = 0) -> Any:
    """Sparse raw-count-like cells x genes matrix, ~10% of genes expressed per cell."""
    import numpy as np
    from scipy import sparse

    rng = np.random.default_rng(seed)
    X = sparse.random(n_cells, n_genes, density=0.1, format="csr", random_state=rng, dtype=np.float32)
    X.data = rng.poisson(3.0, X.nnz).astype(np.float32) + 1.0
    return X


def _write_inputs(args: argparse.Namespace, workdir: Path) -> None:
    """A checkpoint of the benchmark classifier and a query h5ad of ``--cells`` cells."""
    import anndata as ad

    from model.checkpoint import save_checkpoint

    genes = [f"G{i}" for i in range(args.genes)]
    save_checkpoint(workdir / "model.pt", _model(args, "classifier", fast=False), genes, [f"type{i}" for i in range(N_CLASSES)])
    adata = ad.AnnData(X=_counts(args.cells, args.genes))
    adata.var_names = genes
    adata.obs_names = [f"c{i}" for i in range(args.cells)]
    adata.write_h5ad(workdir / "query.h5ad")


def _naive_annotate(ckpt_path: Path, query: Path) -> tuple[Any, Any]:
    """The published way: the plain model, one cell at a time, fp32. Returns (probabilities, prepared AnnData)."""
    import numpy as np
    import torch

    from data.dataset import tokenize_rows
    from data.io import read_cells
    from model.checkpoint import load_checkpoint
    from model.nn.config import NAIVE

    ck = load_checkpoint(ckpt_path)
    model = ck.build_model(NAIVE).eval()
    model.performer.proj_updater.feature_redraw_interval = None
    adata, _ = ck.prepare(read_cells(query), what=str(query))
    probs = []
    with torch.no_grad():
        for i in range(adata.n_obs):
            tokens = tokenize_rows(adata.X, [i], model.config.bin_num)
            probs.append(torch.softmax(model(tokens), dim=-1)[0].numpy())
    return np.stack(probs), ck


def case_predict(args: argparse.Namespace, fast: bool) -> dict[str, Any]:
    workdir = Path(args.workdir)
    query = Path(args.query) if args.query else workdir / "query.h5ad"
    ckpt = Path(args.checkpoint) if args.checkpoint else workdir / "model.pt"
    tag = f"{'fast' if fast else 'naive'}_{args.precision}"
    out = workdir / f"out_{tag}.h5ad"
    t0 = time.perf_counter()
    if fast:
        import predict

        predict.main(["--data", str(query), "--model", str(ckpt), "--out", str(out), "--batch-size", str(args.batch_size),
                      "--precision", args.precision, "--overwrite", "--quiet", "--compile", str(args.compile).lower(),
                      "--fp32-recheck", str(args.fp32_recheck)])
        n = _n_obs(out)
        rechecked, margin = _rechecked(out)
    else:
        import numpy as np

        from data.io import read_cells

        rechecked = margin = None  # the naive loop has no re-check
        probs, ck = _naive_annotate(ckpt, query)
        adata = read_cells(query)
        adata.obs["scbert_celltype"] = np.asarray(ck.classes)[probs.argmax(1)]
        adata.obsm["scbert_probabilities"] = probs
        adata.write_h5ad(out)
        n = adata.n_obs
    dt = time.perf_counter() - t0
    return {"cells": n, "seconds": dt, "cells_per_s": n / dt, "out": str(out), "precision": args.precision,
            "batch_size": args.batch_size if fast else 1, "rechecked_fp32": rechecked, "recheck_margin": margin}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _rechecked(path: Path) -> tuple[int | None, float | None]:
    """Cells the float32 re-check re-scored in a ``predict.py`` output and its margin (None: no re-check ran)."""
    import anndata as ad

    from model.annotation import AnnotationKeys

    adata = ad.read_h5ad(path, backed="r")
    try:
        record = adata.uns[AnnotationKeys().report]
        record = json.loads(record) if isinstance(record, str) else record  # outputs written before the records were dicts
        return record.get("rechecked_fp32"), record.get("recheck_margin")
    finally:
        adata.file.close()


def _n_obs(path: Path) -> int:
    import anndata as ad

    return ad.read_h5ad(path, backed="r").n_obs


def case_train(args: argparse.Namespace, kind: str, fast: bool) -> dict[str, Any]:
    import torch
    from torch import nn

    from data.dataset import IGNORE_INDEX, mask_tokens, tokenize_rows

    model = _model(args, "classifier" if kind == "finetune" else "mlm", fast)
    if kind == "finetune":
        model.freeze_for_finetuning()
    batch = args.train_batch_size if fast else 3
    precision = args.train_precision if fast else "fp32"
    model.configure(model.options.replace(precision=precision, grad_checkpointing=fast and args.grad_checkpointing))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = args.train_steps + 1  # the first is a warm-up
    X = _counts(steps * batch, args.genes)
    X.data = X.data.clip(max=7.0)
    gen = torch.Generator().manual_seed(1)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    t0 = 0.0
    for s in range(steps):
        if s == 1:
            t0 = time.perf_counter()
        tokens = tokenize_rows(X, range(s * batch, (s + 1) * batch), model.config.bin_num)
        with model.autocast():
            if kind == "finetune":
                loss = loss_fn(model(tokens).float(), torch.zeros(len(tokens), dtype=torch.long))
            else:
                inputs, labels = mask_tokens(tokens, model.config.mask_token, 0.15, 0.9, gen)
                loss = loss_fn(model(inputs).float().transpose(1, 2), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    cells = args.train_steps * batch
    return {"cells": cells, "batch_size": batch, "precision": precision, "steps": args.train_steps, "seconds": dt,
            "cells_per_s": cells / dt, "grad_checkpointing": model.gradient_checkpointing}


def _best_seconds(run: Any, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``run``, after one untimed warm-up call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def case_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """Fast forward pass (or attention-received scores with ``--what attention``) at one gene count,
    in ``--precision`` (one of fp32/bf16), with its matrix-product rate (``model.nn.flops``)."""
    import torch

    from model.attention.scores import attention_received
    from model.nn.config import ExecutionOptions
    from model.nn.flops import forward_cost

    model = _model(args, "classifier", fast=True).eval()
    model.configure(ExecutionOptions(precision=args.precision))
    tokens = torch.randint(0, 6, (args.batch_size, args.genes + 1))

    def run() -> None:
        with model.autocast():
            if args.what == "attention":
                attention_received(model, tokens, layer=-1)
            else:
                with torch.inference_mode():
                    model(tokens)

    per_cell = _best_seconds(run, args.repeats) / args.batch_size
    gflop = forward_cost(model.config).encoder / 1e9
    return {"what": args.what, "genes": args.genes, "depth": args.depth, "batch_size": args.batch_size, "precision": args.precision,
            "s_per_cell": per_cell, "us_per_gene": per_cell / args.genes * 1e6,
            "encoder_gflops": gflop / per_cell if args.what == "forward" else None}


def case_kernel(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per cell and layer of the encoder, naive vs fast, with the same allocator setting on both."""
    import torch

    from model.nn.config import NAIVE, ExecutionOptions
    from model.runtime import tune_allocator

    tune_allocator()
    model = _model(args, "classifier", fast=False).eval()
    rows = []
    for fast, batch, precision in ((False, 1, "fp32"), (True, 1, "fp32"), (True, args.batch_size, "fp32"), (True, args.batch_size, "bf16")):
        model.configure(ExecutionOptions(precision=precision, first_layer_cache=False) if fast else NAIVE)  # the kernel alone
        tokens = torch.randint(0, 6, (batch, args.genes + 1))
        with torch.inference_mode(), model.autocast():
            best = _best_seconds(lambda tokens=tokens: model(tokens), args.repeats)
        rows.append({"path": "fast" if fast else "naive", "batch_size": batch, "precision": precision,
                     "s_per_cell_layer": best / batch / args.depth})
    return {"rows": rows, "genes": args.genes, "depth": args.depth}


def case_roofline(args: argparse.Namespace) -> dict[str, Any]:
    """This machine's matrix-product throughput (square products, fp32 and bf16) and the model's
    forward FLOPs: the ceiling any implementation of the same model can reach here."""
    import torch

    from model.nn.config import ScBERTConfig
    from model.nn.flops import forward_cost

    size = 2048
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        peaks[name] = 2.0 * size**3 / _best_seconds(lambda a=a, b=b: torch.mm(a, b), max(3, args.repeats)) / 1e9
    cfg = ScBERTConfig(n_genes=args.genes, dim=args.dim, depth=1, heads=args.heads, dim_head=args.dim_head, head="classifier", n_classes=N_CLASSES)
    cost = forward_cost(cfg)
    return {"gemm_gflops": peaks, "gemm_size": size, "layer_gflop": cost.encoder / 1e9,
            "layer_breakdown_gflop": {k: v / 1e9 for k, v in cost.as_dict().items() if k not in ("head", "total", "encoder")}}


def case_agreement(args: argparse.Namespace) -> dict[str, Any]:
    """Top types and final labels (after the novelty rule) of a real fine-tuned model on real cells:
    naive fp32 (unless skipped), fast fp32, fast bf16 with and without the float32 re-check."""
    import numpy as np

    from data.io import read_cells
    from model.annotation import annotate
    from model.checkpoint import load_checkpoint
    from model.inference import InferenceOptions
    from model.nn.config import ExecutionOptions
    from model.novelty import NoveltySettings

    ck = load_checkpoint(args.checkpoint)
    adata = read_cells(args.query)
    res: dict[str, Any] = {"checkpoint": args.checkpoint, "query": args.query, "cells": adata.n_obs}
    top, labels = {}, {}
    if "agreement_naive" not in _list(args.skip):
        t0 = time.perf_counter()
        naive, _ = _naive_annotate(Path(args.checkpoint), Path(args.query))
        res["naive_fp32_s"] = time.perf_counter() - t0
        top["naive_fp32"] = naive.argmax(1)
    recheck = args.fp32_recheck if args.fp32_recheck == "auto" else float(args.fp32_recheck)
    for name, precision, margin in (("fp32", "fp32", 0.0), ("bf16", "bf16", recheck), ("bf16_norecheck", "bf16", 0.0)):
        t0 = time.perf_counter()
        options = InferenceOptions(batch_size=args.batch_size, device="cpu", progress=False, execution=ExecutionOptions(precision=precision),
                                   fp32_recheck=margin)
        out = annotate(adata, ck, NoveltySettings(), options)
        res[f"fast_{name}_s"] = time.perf_counter() - t0
        top[name], labels[name] = out.probabilities.argmax(1), np.asarray(out.labels)
        if name == "bf16":
            res["rechecked_bf16"], res["recheck_margin_bf16"] = out.rechecked, out.recheck_margin
    if "naive_fp32" in top:
        res["agree_fast_fp32_vs_naive"] = float((top["fp32"] == top["naive_fp32"]).mean())
    for name in ("bf16", "bf16_norecheck"):
        res[f"agree_{name}_vs_fp32"] = float((top[name] == top["fp32"]).mean())
        res[f"labels_{name}_vs_fp32"] = float((labels[name] == labels["fp32"]).mean())
    return res


def _write_query_subset(query: Path, n_cells: int, out: Path) -> None:
    """The first ``n_cells`` cells of ``query`` as an .h5ad (the predict case's real cells)."""
    from data.io import read_cells

    adata = read_cells(query)
    adata[: min(n_cells, adata.n_obs)].copy().write_h5ad(out)


def run_case(argv: list[str]) -> dict[str, Any]:
    """Run one ``--case`` in a fresh interpreter; returns its result with ``peak_rss_mb``."""
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.speed", *argv], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"case {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(rounds: int, naive_argv: list[str], fast_argvs: dict[str, list[str]], name: str) -> dict[str, Any]:
    """Alternate the naive run and each fast variant ``rounds`` times; keep the fastest of each
    and the largest RSS. Returns ``{"naive": ..., "fast": {variant: ...}}`` with speed-ups."""
    sides = {"naive": naive_argv, **{f"fast {v}": argv for v, argv in fast_argvs.items()}}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(rounds):
        for side, argv in sides.items():
            runs[side].append(run_case(argv))
            print(f"  {name} round {r + 1} {side}: {runs[side][-1]['cells_per_s']:.4f} cells/s, "
                  f"{runs[side][-1]['peak_rss_mb']:.0f} MB", flush=True)
    best = {}
    for side, rs in runs.items():
        b = dict(max(rs, key=lambda x: x["cells_per_s"]))
        b["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rs)
        b["all_cells_per_s"] = [x["cells_per_s"] for x in rs]
        best[side] = b
    naive = best.pop("naive")
    fast = {side.removeprefix("fast "): b for side, b in best.items()}
    for b in fast.values():
        b["speedup"] = b["cells_per_s"] / naive["cells_per_s"]
        b["rss_ratio"] = b["peak_rss_mb"] / naive["peak_rss_mb"]
    return {"naive": naive, "fast": fast}


def model_args(args: argparse.Namespace, genes: int | None = None, depth: int | None = None) -> list[str]:
    return ["--genes", str(genes or args.genes), "--dim", str(args.dim), "--depth", str(depth or args.depth),
            "--heads", str(args.heads), "--dim-head", str(args.dim_head), "--compile", str(args.compile).lower()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (default: the published size)")
    g.add_argument("--genes", type=int, default=PUBLISHED_GENES)
    g.add_argument("--dim", type=int, default=200)
    g.add_argument("--depth", type=int, default=6)
    g.add_argument("--heads", type=int, default=10)
    g.add_argument("--dim-head", type=int, default=64)
    g = p.add_argument_group("cases")
    g.add_argument("--cells", type=int, default=16, help="cells to predict (default: 16)")
    g.add_argument("--batch-size", type=int, default=8, help="fast predict batch size (default: 8)")
    g.add_argument("--precision", default="fp32,bf16", help="fast predict precision(s), comma list of fp32/bf16 (default: fp32,bf16)")
    g.add_argument("--fp32-recheck", default="auto",
                   help="predict.py --fp32-recheck of the fast bf16 runs, also the agreement case's re-check (default: auto, "
                   "predict.py's own; 0 = no re-check)")
    g.add_argument("--train-steps", type=int, default=2, help="timed optimiser steps per training run, after one warm-up step (default: 2)")
    g.add_argument("--train-batch-size", type=int, default=3, help="fast training batch size (naive is always 3)")
    g.add_argument("--train-precision", default="fp32,bf16", help="fast training precision(s), comma list (default: fp32,bf16)")
    g.add_argument("--grad-checkpointing", action="store_true", help="fast training with gradient checkpointing")
    g.add_argument("--compile", default="false", choices=["true", "false"], help="torch.compile the fast model (default: false)")
    g.add_argument("--rounds", type=int, default=1, help="alternate naive/fast runs this many times, keep the best (default: 1)")
    g.add_argument("--scaling-genes", default="2000,4000,8000,16906")
    g.add_argument("--scaling-depth", type=int, default=1, help="layers for the scaling table (cost is linear in depth)")
    g.add_argument("--scaling-batch-size", type=int, default=1, help="cells per pass of the scaling table (default: 1)")
    g.add_argument("--scaling-precision", default="fp32", help="precision(s) of the scaling table, comma list (default: fp32)")
    g.add_argument("--batch-sizes", default="1,4,16", help="batch sizes of the memory table")
    g.add_argument("--batch-genes", type=int, default=4000, help="genes of the memory table")
    g.add_argument("--repeats", type=int, default=2)
    g.add_argument("--checkpoint", default=None,
                   help="a fine-tuned model.pt for the agreement case (e.g. demo_out/finetune/model.pt); with --query, "
                        "the predict case runs it on the first --cells cells of the query instead of random weights and cells")
    g.add_argument("--query", default=None, help="real cells for the agreement (all of them) and predict (--cells of them) cases")
    g.add_argument("--skip", default="", help="comma list of predict,finetune,pretrain,scaling,kernel,roofline,batch,agreement to skip; "
                                              "agreement_naive: the agreement case without its (slow) one-cell naive loop")
    g.add_argument("--quick", action="store_true", help="2,000 genes, depth 2, 8 cells: a smoke run")
    g = p.add_argument_group("output")
    g.add_argument("--json", default="bench_speed.json")
    g.add_argument("--md", default="bench_speed.md")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--what", default="forward", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = build_parser().parse_args()
    args.compile = args.compile == "true"
    if args.case:
        if args.case == "scaling":
            res = case_scaling(args)
        elif args.case == "kernel":
            res = case_kernel(args)
        elif args.case == "roofline":
            res = case_roofline(args)
        elif args.case == "agreement":
            res = case_agreement(args)
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
    if not (args.checkpoint and args.query):
        skip.add("agreement")
    report: dict[str, Any] = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "model": {"genes": args.genes, "dim": args.dim, "depth": args.depth, "heads": args.heads, "dim_head": args.dim_head},
        "command": " ".join(["python", "-m", "scripts.bench.speed", *sys.argv[1:]]),
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "predict" not in skip:
            extra = ["--cells", str(args.cells), "--batch-size", str(args.batch_size), "--workdir", tmp,
                     "--fp32-recheck", str(args.fp32_recheck)]
            if args.checkpoint and args.query:  # a real model on the first --cells real cells
                _write_query_subset(Path(args.query), args.cells, Path(tmp) / "query.h5ad")
                extra += ["--checkpoint", args.checkpoint]
            else:
                _write_inputs(args, Path(tmp))
            fast = {p: ["--case", "predict:fast", *model_args(args), *extra, "--precision", p] for p in _list(args.precision)}
            pair = best_of(args.rounds, ["--case", "predict:naive", *model_args(args), *extra, "--precision", "fp32"], fast, "predict")
            naive_out = pair["naive"].pop("out")
            for f in pair["fast"].values():
                f["agreement_with_naive"] = _agreement(naive_out, f.pop("out"))
            report["cases"]["predict"] = pair
            print(_line("predict", pair), flush=True)
        for kind in ("finetune", "pretrain"):
            if kind in skip:
                continue
            extra = ["--train-steps", str(args.train_steps), "--train-batch-size", str(args.train_batch_size),
                     *(["--grad-checkpointing"] if args.grad_checkpointing else [])]
            fast = {p: ["--case", f"{kind}:fast", *model_args(args), *extra, "--train-precision", p] for p in _list(args.train_precision)}
            pair = best_of(args.rounds, ["--case", f"{kind}:naive", *model_args(args), *extra, "--train-precision", "fp32"], fast, kind)
            report["cases"][kind] = pair
            print(_line(kind, pair), flush=True)
    if "agreement" not in skip:
        report["agreement"] = run_case(["--case", "agreement", "--checkpoint", args.checkpoint, "--query", args.query,
                                        "--batch-size", str(args.batch_size), "--skip", ",".join(sorted(skip)),
                                        "--fp32-recheck", str(args.fp32_recheck)])
        a = report["agreement"]
        naive = f"fast fp32 vs naive {a['agree_fast_fp32_vs_naive']:.4f}, " if "agree_fast_fp32_vs_naive" in a else ""
        print(f"agreement on {a['cells']} real cells: {naive}bf16 vs fp32: top type {a['agree_bf16_vs_fp32']:.4f}, labels "
              f"{a['labels_bf16_vs_fp32']:.4f} ({a['rechecked_bf16']} cells re-checked in fp32, margin {_fmt(a.get('recheck_margin_bf16'))}); "
              f"without the re-check: top type "
              f"{a['agree_bf16_norecheck_vs_fp32']:.4f}, labels {a['labels_bf16_norecheck_vs_fp32']:.4f}", flush=True)
    if "scaling" not in skip:
        rows = []
        for precision in _list(args.scaling_precision):
            for what in ("forward", "attention"):
                for g in (int(x) for x in args.scaling_genes.split(",")):
                    rows.append(run_case(["--case", "scaling", "--what", what, "--repeats", str(args.repeats), "--batch-size",
                                          str(args.scaling_batch_size), "--precision", precision, *model_args(args, g, args.scaling_depth)]))
                    print(f"scaling {what} {precision}: {g} genes: {rows[-1]['s_per_cell']:.3f} s/cell, {rows[-1]['peak_rss_mb']:.0f} MB",
                          flush=True)
        report["scaling"] = rows
    if "kernel" not in skip:
        report["kernel"] = run_case(["--case", "kernel", "--repeats", str(args.repeats), "--batch-size", str(args.batch_size),
                                     *model_args(args, depth=args.scaling_depth + 1)])
        for row in report["kernel"]["rows"]:
            print(f"kernel {row['path']} batch {row['batch_size']} {row['precision']}: {row['s_per_cell_layer']:.3f} s per cell and layer", flush=True)
    if "roofline" not in skip:
        report["roofline"] = roof = run_case(["--case", "roofline", "--repeats", str(args.repeats), *model_args(args)])
        print(f"roofline: {roof['layer_gflop']:.1f} GFLOP per cell and layer; matrix products on this machine: "
              f"{roof['gemm_gflops']['fp32']:.0f} GFLOP/s fp32, {roof['gemm_gflops']['bf16']:.0f} GFLOP/s bf16", flush=True)
    if "batch" not in skip:
        rows = []
        for b in (int(x) for x in args.batch_sizes.split(",")):
            rows.append(run_case(["--case", "scaling", "--repeats", "1", "--batch-size", str(b),
                                  *model_args(args, args.batch_genes, args.scaling_depth)]))
            print(f"batch {b}: {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
        report["batch"] = rows
    Path(args.json).write_text(json.dumps(report, indent=2))
    Path(args.md).write_text(_markdown(report))
    print(_markdown(report))


def _agreement(naive_path: str, fast_path: str) -> float:
    import anndata as ad
    import numpy as np

    a, b = ad.read_h5ad(naive_path), ad.read_h5ad(fast_path)
    return float((np.asarray(a.obsm["scbert_probabilities"]).argmax(1) == np.asarray(b.obsm["scbert_probabilities"]).argmax(1)).mean())


def _list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _line(name: str, c: dict[str, Any]) -> str:
    fast = "; ".join(f"fast {v} {f['cells_per_s']:.4f} cells/s ({f['peak_rss_mb']:.0f} MB), x{f['speedup']:.2f}" for v, f in c["fast"].items())
    return f"{name}: naive {c['naive']['cells_per_s']:.4f} cells/s ({c['naive']['peak_rss_mb']:.0f} MB); {fast}"


def _markdown(r: dict[str, Any]) -> str:
    m, mc = r["model"], r["machine"]
    lines = [f"Machine: {mc['cpu']}, {mc['cores']} cores ({mc['cpu_capability']}), torch {mc['torch']} ({mc['threads']} threads). "
             f"Model: {m['genes']} genes, dim {m['dim']}, depth {m['depth']}, heads {m['heads']} x {m['dim_head']}.", "",
             f"Command: `{r['command']}`", ""]
    if r["cases"]:
        lines += ["| case | naive cells/s | fast cells/s | speed-up | naive peak RSS (MB) | fast peak RSS (MB) | notes |",
                  "|---|---|---|---|---|---|---|"]
    for name, c in r["cases"].items():
        n = c["naive"]
        for f in c["fast"].values():
            note = f"{n['cells']} cells; naive batch {n['batch_size']} fp32, fast batch {f['batch_size']} {f['precision']}"
            if f.get("grad_checkpointing"):
                note += ", gradient checkpointing"
            if "agreement_with_naive" in f:
                note += f"; label agreement with naive {f['agreement_with_naive']:.4f}"
            if f.get("rechecked_fp32") is not None:
                note += f"; {f['rechecked_fp32']} cells re-checked in fp32"
                if f.get("recheck_margin") is not None:
                    note += f" (margin {f['recheck_margin']:.4g})"
            lines.append(f"| {name} | {n['cells_per_s']:.4f} | {f['cells_per_s']:.4f} | {f['speedup']:.2f}x | "
                         f"{n['peak_rss_mb']:.0f} | {f['peak_rss_mb']:.0f} | {note} |")
    if r.get("agreement"):
        a = r["agreement"]
        naive = (f"fast fp32 vs naive {a['agree_fast_fp32_vs_naive']:.4f} (naive {a['naive_fp32_s']:.1f} s); "
                 if "agree_fast_fp32_vs_naive" in a else "")
        lines += ["", f"Agreement on {a['cells']} real cells ({a['query']}, {a['checkpoint']}): {naive}bf16 vs fp32: top type "
                  f"{a['agree_bf16_vs_fp32']:.4f}, labels after the novelty rule {a['labels_bf16_vs_fp32']:.4f}, "
                  f"{a['rechecked_bf16']} cells re-checked in fp32 (margin {_fmt(a.get('recheck_margin_bf16'))}); bf16 without the re-check: top type "
                  f"{a['agree_bf16_norecheck_vs_fp32']:.4f}, labels {a['labels_bf16_norecheck_vs_fp32']:.4f} "
                  f"(fast fp32 {a['fast_fp32_s']:.1f} s, bf16 {a['fast_bf16_s']:.1f} s, bf16 without re-check "
                  f"{a['fast_bf16_norecheck_s']:.1f} s)."]
    if r.get("scaling"):
        roof = r.get("roofline")
        lines += ["", "| what | precision | genes | depth | batch | s/cell | cells/s | us per gene | peak RSS (MB) | GFLOP/s | of this CPU's GEMM rate |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in r["scaling"]:
            rate, prec = s.get("encoder_gflops"), s.get("precision", "fp32")
            share = f"{rate / roof['gemm_gflops'][prec]:.0%}" if rate and roof else "-"
            lines.append(f"| {s['what']} | {prec} | {s['genes']} | {s['depth']} | {s['batch_size']} | {s['s_per_cell']:.3f} | "
                         f"{1 / s['s_per_cell']:.2f} | {s['us_per_gene']:.1f} | {s['peak_rss_mb']:.0f} | "
                         f"{f'{rate:.0f}' if rate else '-'} | {share} |")
    if r.get("kernel"):
        k = r["kernel"]
        lines += ["", f"Encoder alone, {k['genes']} genes, both paths with the same allocator setting:", "",
                  "| path | batch size | precision | s per cell and layer |", "|---|---|---|---|"]
        roof = r.get("roofline")
        if roof:
            lines[-2:] = ["| path | batch size | precision | s per cell and layer | GFLOP/s | of this machine's GEMM rate |", "|---|---|---|---|---|---|"]
            for x in k["rows"]:
                rate = roof["layer_gflop"] / x["s_per_cell_layer"]
                lines.append(f"| {x['path']} | {x['batch_size']} | {x['precision']} | {x['s_per_cell_layer']:.3f} | {rate:.0f} | "
                             f"{rate / roof['gemm_gflops'][x['precision']]:.0%} |")
        else:
            lines += [f"| {x['path']} | {x['batch_size']} | {x['precision']} | {x['s_per_cell_layer']:.3f} |" for x in k["rows"]]
    if r.get("roofline"):
        roof = r["roofline"]
        lines += ["", f"Roofline: one layer is {roof['layer_gflop']:.1f} GFLOP of matrix products per cell "
                  + "(" + ", ".join(f"{k} {v:.1f}" for k, v in roof["layer_breakdown_gflop"].items() if k != "exp_elements") + "); "
                  f"square {roof['gemm_size']}-products run at {roof['gemm_gflops']['fp32']:.0f} GFLOP/s (fp32) and "
                  f"{roof['gemm_gflops']['bf16']:.0f} GFLOP/s (bf16) here, so no implementation of this model can take less than "
                  f"{roof['layer_gflop'] / roof['gemm_gflops']['fp32']:.3f} s (fp32) or {roof['layer_gflop'] / roof['gemm_gflops']['bf16']:.3f} s "
                  "(bf16) per cell and layer on this machine."]
    if r.get("batch"):
        lines += ["", "| batch size | genes | depth | s/cell | peak RSS (MB) |", "|---|---|---|---|---|"]
        for s in r["batch"]:
            lines.append(f"| {s['batch_size']} | {s['genes']} | {s['depth']} | {s['s_per_cell']:.3f} | {s['peak_rss_mb']:.0f} |")
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
