"""Throughput on an accelerator at the published size: predict and training steps, bf16, and the
fraction of the device's bf16 peak the encoder reaches.

One process, one device. For each attention path (``fast``: the FAVOR+ kernel of
:mod:`model.nn.favor` that predict.py/finetune.py/pretrain.py use; ``package``: the plain
``performer_pytorch`` modules) it measures, with random weights at the given size:

* ``predict``: batched forward passes under ``torch.inference_mode`` (tokens already on the device)
  -> cells/s and the encoder's FLOP rate (:mod:`model.nn.flops`) as a fraction of the peak;
* ``finetune`` / ``pretrain``: optimiser steps (published freezing policy; 15% masking) -> cells/s,
  peak device memory;
* ``gemm``: a large square bf16 product, the rate the device actually sustains.

The peak is ``--peak-tflops`` if given, else a table of known dense bf16 peaks by device name
(H100/H200 SXM 989, A100 312 TFLOP/s), else the measured GEMM rate. Writes JSON and markdown.

    python -m scripts.bench.gpu                                   # published size, bf16, cuda
    python -m scripts.bench.gpu --device cpu --genes 200 --dim 16 --depth 1 --heads 2 --dim-head 8 --batch-size 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

KNOWN_PEAKS_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: Any, repeats: int) -> float:
    """Best seconds of ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_memory_mb(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_memory(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_model(args: argparse.Namespace, head: str, fast: bool, device: Any) -> Any:
    import torch

    from model.nn.config import NAIVE, ExecutionOptions, ScBERTConfig
    from model.nn.network import ScBERT

    torch.manual_seed(0)
    cfg = ScBERTConfig(n_genes=args.genes, dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                       head=head, n_classes=8 if head == "classifier" else 0, gene_embedding="learned")
    options = ExecutionOptions(precision=args.precision, compile=args.compile) if fast else NAIVE.replace(precision=args.precision, compile=args.compile)
    model = ScBERT(cfg, options=options)
    model.performer.proj_updater.feature_redraw_interval = None
    return model.to(device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn

    from data.dataset import IGNORE_INDEX, mask_tokens
    from model.nn.config import ScBERTConfig
    from model.nn.flops import forward_cost

    device = torch.device(args.device)
    precision = args.precision
    cfg = ScBERTConfig(n_genes=args.genes, dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                       head="classifier", n_classes=8)
    flop = forward_cost(cfg).encoder
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "precision": precision,
                              "model": {"genes": args.genes, "dim": args.dim, "depth": args.depth, "heads": args.heads,
                                        "dim_head": args.dim_head}, "encoder_gflop_per_cell": flop / 1e9, "paths": {}}
    size = args.gemm_size
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    report["gemm_bf16_tflops"] = 2 * size**3 / _timed(lambda a=a, b=b: torch.mm(a, b), device, args.repeats) / 1e12
    del a, b
    peak = args.peak_tflops or next((v for k, v in KNOWN_PEAKS_TFLOPS.items() if k in name), None)
    report["peak_tflops"] = peak or report["gemm_bf16_tflops"]
    report["peak_source"] = "given" if args.peak_tflops else ("known device" if peak else "measured GEMM")

    gen = torch.Generator().manual_seed(0)
    for path in args.paths.split(","):
        fast = path == "fast"
        res: dict[str, Any] = {}
        model = build_model(args, "classifier", fast, device).eval()
        tokens = torch.randint(0, 6, (args.batch_size, args.genes + 1), generator=gen).to(device)
        _reset_memory(device)

        def forward(model: Any = model, tokens: Any = tokens) -> None:
            with torch.inference_mode(), model.autocast():
                model(tokens)

        s = _timed(forward, device, args.repeats)
        res["predict"] = {"batch_size": args.batch_size, "cells_per_s": args.batch_size / s,
                          "encoder_tflops": flop * args.batch_size / s / 1e12, "peak_memory_mb": _peak_memory_mb(device)}
        res["predict"]["fraction_of_peak"] = res["predict"]["encoder_tflops"] / report["peak_tflops"]
        print(f"{path} predict: {res['predict']['cells_per_s']:.2f} cells/s, {res['predict']['encoder_tflops']:.1f} TFLOP/s "
              f"({res['predict']['fraction_of_peak']:.1%} of {report['peak_tflops']:.0f})", flush=True)
        del model
        for kind in ("finetune", "pretrain"):
            model = build_model(args, "classifier" if kind == "finetune" else "mlm", fast, device).train()
            if kind == "finetune":
                model.freeze_for_finetuning()
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
            batch = torch.randint(0, 6, (args.train_batch_size, args.genes + 1), generator=gen)

            def step(model: Any = model, opt: Any = opt, batch: Any = batch, kind: str = kind, loss_fn: Any = loss_fn) -> None:
                with model.autocast():
                    if kind == "finetune":
                        loss = loss_fn(model(batch.to(device)).float(), torch.zeros(len(batch), dtype=torch.long, device=device))
                    else:
                        inputs, labels = mask_tokens(batch, model.config.mask_token, 0.15, 0.9, torch.Generator().manual_seed(1))
                        loss = loss_fn(model(inputs.to(device)).float().transpose(1, 2), labels.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            _reset_memory(device)
            s = _timed(step, device, args.repeats)
            res[kind] = {"batch_size": args.train_batch_size, "cells_per_s": args.train_batch_size / s,
                         "peak_memory_mb": _peak_memory_mb(device)}
            print(f"{path} {kind} step: {res[kind]['cells_per_s']:.2f} cells/s (batch {args.train_batch_size})", flush=True)
            del model, opt
        report["paths"][path] = res
    return report


def markdown(r: dict[str, Any]) -> str:
    m = r["model"]
    lines = [f"Device: {r['device']}, torch {r['torch']}, {r['precision']}. Model: {m['genes']} genes, dim {m['dim']}, depth {m['depth']}, "
             f"{m['heads']} heads x {m['dim_head']} ({r['encoder_gflop_per_cell']:.4g} GFLOP per cell forward). "
             f"bf16 GEMM sustained: {r['gemm_bf16_tflops']:.4g} TFLOP/s; peak used: {r['peak_tflops']:.4g} TFLOP/s ({r['peak_source']}).", "",
             "| attention path | predict cells/s | encoder TFLOP/s | of peak | fine-tune step cells/s | pretrain step cells/s | peak memory predict / fine-tune / pretrain (MB) |",
             "|---|---|---|---|---|---|---|"]
    for path, res in r["paths"].items():
        p, f, t = res["predict"], res["finetune"], res["pretrain"]
        mem = " / ".join("-" if x["peak_memory_mb"] is None else f"{x['peak_memory_mb']:.0f}" for x in (p, f, t))
        lines.append(f"| {path} | {p['cells_per_s']:.2f} | {p['encoder_tflops']:.4g} | {p['fraction_of_peak']:.1%} | "
                     f"{f['cells_per_s']:.2f} | {t['cells_per_s']:.2f} | {mem} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--genes", type=int, default=16906)
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="predict batch size (default: 32)")
    p.add_argument("--train-batch-size", type=int, default=8, help="training batch size (default: 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paths", default="fast,package", help="attention paths to measure (default: fast,package)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--gemm-size", type=int, default=8192)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: known table or measured)")
    p.add_argument("--json", default="bench_gpu.json")
    p.add_argument("--md", default="bench_gpu.md")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = measure(args)
    report["command"] = " ".join(["python", "-m", "scripts.bench.gpu", *(argv if argv is not None else sys.argv[1:])])
    Path(args.json).write_text(json.dumps(report, indent=2))
    Path(args.md).write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
