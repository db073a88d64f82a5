"""Seconds per cell of a fine-tuned model's forward pass on real cells, per batch size and FAVOR+
tile size, and the bf16 error of its probabilities (BENCHMARKS.md, 4-5 December):

    python -m scripts.bench.forward_settings --checkpoint runs17/ft4000/model.pt --query runs17/query320.h5ad \\
        --precision bf16 --batch-sizes 1,2,4,8,16 --tiles 4194304,1048576
    python -m scripts.bench.forward_settings --checkpoint runs17/ft16906/model.pt --query runs17/query320.h5ad --error-cells 16

``--breakdown B``: milliseconds per cell of each part of the forward pass at batch size B (the first
layer with its cache of unexpressed genes, and per later layer the norm, the q/k/v products, FAVOR+,
the output product, the feed-forward block; the head), summed over the layers:

    python -m scripts.bench.forward_settings --checkpoint runs18/ft4000/model.pt --query runs17/query320.h5ad --breakdown 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    import anndata as ad
    import torch

    import model.nn.favor as favor
    from data.dataset import tokenize_rows
    from model.annotation import annotate
    from model.checkpoint import load_checkpoint
    from model.inference import InferenceOptions
    from model.nn.config import ExecutionOptions
    from model.novelty import NoveltySettings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--cells", type=int, default=8, help="cells timed per setting (default: 8)")
    p.add_argument("--batch-sizes", default="", help="comma list (default: none)")
    p.add_argument("--tiles", default=str(favor.TILE_ELEMENTS), help="comma list of TILE_ELEMENTS values")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--error-cells", type=int, default=0, help="cells for the bf16-vs-fp32 probability error (0: skip)")
    p.add_argument("--breakdown", type=int, default=0, metavar="B", help="time each part of the forward pass at batch size B (0: skip)")
    args = p.parse_args(argv)
    ck = load_checkpoint(args.checkpoint)
    query = ad.read_h5ad(args.query)
    if args.batch_sizes:
        prep, _ = ck.prepare(query[: args.cells].copy())
        net = ck.build_model(ExecutionOptions(precision=args.precision)).eval()
        for b in (int(x) for x in args.batch_sizes.split(",")):
            batches = [tokenize_rows(prep.X, list(range(i, min(i + b, args.cells))), net.config.bin_num) for i in range(0, args.cells, b)]
            for tile in (int(x) for x in args.tiles.split(",")):
                favor.TILE_ELEMENTS = tile
                best = np.inf
                with torch.inference_mode(), net.autocast():
                    net(batches[0])  # warm-up (and the first-layer cache)
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        for tokens in batches:
                            net(tokens)
                        best = min(best, (time.perf_counter() - t0) / args.cells)
                print(f"{args.precision} batch {b} tile {tile}: {best:.4f} s per cell (best of {args.repeats})", flush=True)
    if args.breakdown:
        from model.runtime import tune_allocator

        tune_allocator()  # as predict.py
        prep, _ = ck.prepare(query[: args.cells].copy())
        net = ck.build_model(ExecutionOptions(precision=args.precision)).eval()
        b = args.breakdown
        batches = [tokenize_rows(prep.X, list(range(i, min(i + b, args.cells))), net.config.bin_num) for i in range(0, args.cells, b)]
        parts, _ = breakdown(net, batches, args.repeats)
        total = sum(parts.values())
        for name, t in parts.items():
            print(f"{name:>26}: {t / (args.repeats * args.cells) * 1e3:7.2f} ms per cell  {t / total:6.1%}")
        print(f"{'total':>26}: {total / (args.repeats * args.cells) * 1e3:7.2f} ms per cell ({args.precision}, batch {b}, "
              f"{args.cells} cells, {args.repeats} repeats)")
    if args.error_cells:
        cells = query[: args.error_cells].copy()
        options = InferenceOptions(batch_size=1, device="cpu", progress=False, fp32_recheck=0.0)
        probs = {prec: annotate(cells, ck, NoveltySettings(), options.replace(execution=ExecutionOptions(precision=prec)))
                 .probabilities.astype(np.float64) for prec in ("fp32", "bf16")}
        err = np.abs(probs["bf16"] - probs["fp32"])
        top = np.sort(probs["fp32"], axis=1)
        gap = top[:, -1] - top[:, -2]
        print(f"{len(gap)} cells: largest |p_bf16 - p_fp32| {err.max():.5f}; top types equal "
              f"{np.mean(probs['bf16'].argmax(1) == probs['fp32'].argmax(1)):.4f}")
        for margin in (0.05, 0.02, 0.01, 0.005):
            print(f"  top-two gap below {margin}: {int((gap < margin).sum())} of {len(gap)} cells")


def breakdown(net, batches, repeats: int) -> tuple[dict[str, float], list]:  # noqa: ANN001 - a ScBERT and token batches
    """Seconds spent in each part of ``net``'s forward pass over ``batches``, ``repeats`` times (after
    one warm-up pass), computed as :meth:`ScBERT.encode` does on the cached first-layer path; and
    the outputs of the last repeat (the network's, to float rounding)."""
    import torch

    parts: dict[str, float] = {}

    def timed(name: str, fn, *xs):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = fn(*xs)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
        return out

    def attention(a, h):  # noqa: ANN001, ANN202 - performer's SelfAttention, its normed input
        b, n, _ = h.shape
        q, k, v = timed("q, k, v products", lambda: [f(h) for f in (a.to_q, a.to_k, a.to_v)])
        q, k, v = (t.view(b, n, a.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = timed("FAVOR+ attention", a.fast_attention, q, k, v)
        return timed("output product", lambda: a.to_out(out.transpose(1, 2).reshape(b, n, -1)))

    with torch.inference_mode(), net.autocast():
        net(batches[0])
        parts.clear()
        for _ in range(repeats):
            outputs = []
            for tokens in batches:
                x = timed("embedding + first layer", lambda tokens=tokens: net.first_layer_cache.first_layer(
                    net, tokens, net.token_emb(tokens) + net.pos_emb(tokens.shape[1]).to(torch.float32)))
                for attn, ff in net.performer.net.layers[1:]:
                    x = x + attention(attn.fn, timed("layer norms", attn.norm, x))
                    x = x + timed("feed-forward (norm, MLP)", ff, x)
                outputs.append(timed("final norm + head", lambda x=x: net.to_out(net.norm(x))))
    return parts, outputs


if __name__ == "__main__":
    main()
