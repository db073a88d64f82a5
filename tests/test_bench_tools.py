"""The FLOP model of the roofline, and the accelerator benchmark script (run on the CPU, tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.nn.config import NAIVE, ScBERTConfig
from model.nn.flops import forward_cost
from model.nn.network import ScBERT


def test_forward_cost_matches_counted_products() -> None:
    """The analytic count agrees with torch's FLOP counter on the plain performer model (which
    computes the key sum without a product: hence the 2% tolerance)."""
    cfg = ScBERTConfig(n_genes=300, dim=16, depth=2, heads=2, dim_head=8, head="classifier", n_classes=3)
    model = ScBERT(cfg, options=NAIVE).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 6, (1, 301)))
    cost = forward_cost(cfg)
    assert abs(cost.total - counter.get_total_flops()) / counter.get_total_flops() < 0.02
    assert cost.encoder == cost.qkv + cost.attn_out + cost.feed_forward + cost.features + cost.context
    published = forward_cost(ScBERTConfig(n_genes=16906, head="classifier", n_classes=8))
    assert 300e9 < published.encoder < 320e9  # ~51 GFLOP per layer and cell at the published size


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu(tmp_path: Path) -> None:
    from scripts.bench import gpu as bench_gpu

    out_json, out_md = tmp_path / "g.json", tmp_path / "g.md"
    bench_gpu.main(["--device", "cpu", "--genes", "60", "--dim", "16", "--depth", "1", "--heads", "2", "--dim-head", "8",
                    "--batch-size", "2", "--train-batch-size", "2", "--repeats", "1", "--gemm-size", "64",
                    "--json", str(out_json), "--md", str(out_md)])
    r = json.loads(out_json.read_text())
    assert set(r["paths"]) == {"fast", "package"}
    for res in r["paths"].values():
        assert res["predict"]["cells_per_s"] > 0 and res["finetune"]["cells_per_s"] > 0 and res["pretrain"]["cells_per_s"] > 0
        assert 0 < res["predict"]["fraction_of_peak"]
    assert "| fast |" in out_md.read_text()


@pytest.mark.slow
def test_bench_attention_rss_runs(tmp_path: Path) -> None:
    from scripts.bench.attention_rss import main

    out = tmp_path / "a.json"
    main(["--genes", "60", "--cases", "12:1", "--json", str(out)])
    (case,) = json.loads(out.read_text())["cases"]
    assert case["scored_cells"] == 4 and case["peak_rss_mb"] > 0 and case["seconds"] > 0


def test_forward_breakdown_times_the_network_it_reproduces() -> None:
    """The per-part timing of ``python -m scripts.bench.forward_settings`` walks the same computation as the network."""
    from model.nn.config import ExecutionOptions
    from scripts.bench.forward_settings import breakdown

    torch.manual_seed(0)
    cfg = ScBERTConfig(n_genes=60, dim=16, depth=3, heads=2, dim_head=8, head="classifier", n_classes=3)
    net = ScBERT(cfg, options=ExecutionOptions()).eval()
    tokens = torch.randint(0, 6, (3, 61))
    tokens[:, ::2] = 0  # unexpressed genes: the first-layer cache takes them
    parts, (out,) = breakdown(net, [tokens], repeats=2)
    assert set(parts) == {"embedding + first layer", "layer norms", "q, k, v products", "FAVOR+ attention", "output product",
                          "feed-forward (norm, MLP)", "final norm + head"}
    assert all(t > 0 for t in parts.values())
    with torch.inference_mode():
        torch.testing.assert_close(out, net(tokens), rtol=1e-4, atol=1e-5)
