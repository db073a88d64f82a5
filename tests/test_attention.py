"""Linear-time attention scores against an explicit N x N computation, memory, and attn_analysis.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from torch.utils._python_dispatch import TorchDispatchMode

import attn_analysis
from model.attention import analysis
from model.attention.scores import (
    attention_modules,
    attention_received,
    attention_received_per_layer,
    mean_attention_by_group,
    resolve_layers,
    top_genes,
)
from model.checkpoint import save_checkpoint
from model.nn.config import ScBERTConfig
from model.nn.network import ScBERT


def tiny_model(n_genes: int = 40, depth: int = 3, heads: int = 4, head: str = "mlm", n_classes: int = 0, seed: int = 0) -> ScBERT:
    torch.manual_seed(seed)
    cfg = ScBERTConfig(n_genes=n_genes, dim=16, depth=depth, heads=heads, dim_head=8, gene_embedding="learned",
                       head=head, n_classes=n_classes)
    return ScBERT(cfg).eval()


def features(x: torch.Tensor, proj: torch.Tensor, is_query: bool, eps: float = 1e-4) -> torch.Tensor:
    """FAVOR+ positive random features written out from the Performer paper, with the package's
    stabilisers: per-row max for queries, max over all positions and features for keys."""
    d = x.shape[-1]
    xn = x * d**-0.25
    proj_x = xn @ proj.T  # (b, h, n, m)
    sq = (xn**2).sum(-1, keepdim=True) / 2
    stab = proj_x.amax(dim=-1, keepdim=True) if is_query else proj_x.amax(dim=(-1, -2), keepdim=True)
    return proj.shape[0] ** -0.5 * (torch.exp(proj_x - sq - stab) + eps)


def explicit_received(model: ScBERT, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(batch, depth, n) column sums of the materialised N x N attention of every layer (head
    mean), and per layer the error of A @ V against the package's own attention output."""
    inputs: dict[int, torch.Tensor] = {}
    mods = attention_modules(model)
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0])) for i, m in enumerate(mods)]
    with torch.no_grad():
        model.encode(tokens)
        for h in handles:
            h.remove()
        cols, errors = [], []
        for i, m in enumerate(mods):
            x = inputs[i]
            b, n, _ = x.shape

            q, k, v = (lin(x).reshape(b, n, m.heads, -1).transpose(1, 2) for lin in (m.to_q, m.to_k, m.to_v))
            proj = m.fast_attention.projection_matrix
            A = features(q, proj, True) @ features(k, proj, False).transpose(-1, -2)  # (b, h, n, n)
            A = A / A.sum(dim=-1, keepdim=True)
            errors.append((A @ v - m.fast_attention(q, k, v)).abs().max())
            cols.append(A.sum(dim=-2).mean(dim=1))
    return torch.stack(cols, dim=1), errors


@pytest.fixture(scope="module")
def model_and_tokens() -> tuple[ScBERT, torch.Tensor]:
    model = tiny_model()
    tokens = torch.randint(0, model.config.bin_num + 1, (5, model.config.seq_len), generator=torch.Generator().manual_seed(1))
    tokens[:, -1] = 0
    return model, tokens


def test_explicit_matrix_is_the_models_attention(model_and_tokens: tuple[ScBERT, torch.Tensor]) -> None:
    model, tokens = model_and_tokens
    _, errors = explicit_received(model, tokens)
    assert max(float(e) for e in errors) < 1e-5


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_linear_time_scores_equal_explicit(model_and_tokens: tuple[ScBERT, torch.Tensor], layer: int) -> None:
    model, tokens = model_and_tokens
    expected, _ = explicit_received(model, tokens)
    got = attention_received(model, tokens, layer=layer, normalize=False)
    assert got.shape == (5, model.config.seq_len)
    torch.testing.assert_close(got, expected[:, layer], rtol=1e-5, atol=1e-6)
    # every row of A sums to one, so the column sums add up to N
    torch.testing.assert_close(got.sum(-1), torch.full((5,), float(model.config.seq_len)), rtol=1e-5, atol=1e-3)


def test_all_layers_and_normalisation(model_and_tokens: tuple[ScBERT, torch.Tensor]) -> None:
    model, tokens = model_and_tokens
    expected, _ = explicit_received(model, tokens)
    per_layer = attention_received_per_layer(model, tokens, "all", normalize=False)
    torch.testing.assert_close(per_layer, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_received(model, tokens, "all", normalize=False), expected.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_received(model, tokens, [0, 2], normalize=False), expected[:, [0, 2]].mean(1), rtol=1e-5, atol=1e-6)
    norm = attention_received(model, tokens, -1)
    torch.testing.assert_close(norm, expected[:, -1] / model.config.seq_len, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(norm.sum(-1), torch.ones(5), rtol=1e-5, atol=1e-5)
    for m in attention_modules(model):
        assert not m.to_q._forward_hooks and not m.to_k._forward_hooks, "hooks must be removed"


def test_layer_choice_errors_and_state(model_and_tokens: tuple[ScBERT, torch.Tensor]) -> None:
    model, tokens = model_and_tokens
    assert resolve_layers(model, "all") == [0, 1, 2]
    assert resolve_layers(model, "-1") == [2]
    with pytest.raises(ValueError, match="has 3 layers"):
        resolve_layers(model, 3)
    with pytest.raises(ValueError, match="layer number or 'all'"):
        resolve_layers(model, "last")
    model.train()
    try:
        proj = attention_modules(model)[0].fast_attention.projection_matrix.clone()
        attention_received(model, tokens)
        assert model.training, "the model's mode is restored"
        assert torch.equal(proj, attention_modules(model)[0].fast_attention.projection_matrix), "no feature redraw"
    finally:
        model.eval()


def test_dataset_level_functions(model_and_tokens: tuple[ScBERT, torch.Tensor]) -> None:
    model, _ = model_and_tokens
    rng = np.random.default_rng(0)
    X = sparse.random(11, model.config.n_genes, density=0.3, random_state=0, format="csr", dtype=np.float32) * 6
    cells, per_cell, _ = mean_attention_by_group(model, X, [f"cell{i:02d}" for i in range(11)], batch_size=4, progress=False)
    assert cells == [f"cell{i:02d}" for i in range(11)]  # one group per cell: the attention of each cell
    assert per_cell.shape == (11, model.config.n_genes)
    from data.dataset import tokenize_rows

    direct = attention_received(model, tokenize_rows(X, np.arange(11), model.config.bin_num))[:, :-1].numpy()
    np.testing.assert_allclose(per_cell, direct, rtol=1e-5, atol=1e-8)
    groups = rng.choice(["b", "a", "c"], 11)
    names, means, counts = mean_attention_by_group(model, X, groups, batch_size=3, progress=False)
    assert names == ["a", "b", "c"] and counts.sum() == 11
    for name, row in zip(names, means):
        np.testing.assert_allclose(row, per_cell[groups == name].mean(0), rtol=1e-5, atol=1e-9)
    table = top_genes(means, names, [f"g{i}" for i in range(model.config.n_genes)], 5)
    assert len(table) == 15 and (table.groupby("cell_type")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    with pytest.raises(ValueError, match="align it to the model's genes"):
        mean_attention_by_group(model, X[:, :10], groups, progress=False)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_n_tensor_at_full_vocabulary() -> None:
    n_genes = 16906  # the published vocabulary: 16,907 positions
    torch.manual_seed(0)
    model = ScBERT(ScBERTConfig(n_genes=n_genes, dim=8, depth=1, heads=1, dim_head=8, gene_embedding="learned")).eval()
    tokens = torch.randint(0, 6, (2, n_genes + 1), generator=torch.Generator().manual_seed(0))
    N = n_genes + 1
    with LargestTensor() as probe:
        scores = attention_received(model, tokens)
    assert scores.shape == (2, N) and torch.isfinite(scores).all()
    assert probe.largest > N, "the probe saw the per-gene tensors"
    assert probe.largest < N * N // 100, f"a tensor of {probe.largest} elements was created (N x N = {N * N})"
    # control: the probe does see an explicit attention matrix
    small = tiny_model(n_genes=299, depth=1, heads=1)
    with LargestTensor() as probe:
        explicit_received(small, torch.zeros(1, 300, dtype=torch.long))
    assert probe.largest >= 300 * 300


# ---------------------------------------------------------------- attn_analysis.py on a tiny model

MARKERS = {"B": ["MS4A1", "CD79A", "CD79B", "CD19"], "NK": ["NKG7", "GNLY", "PRF1", "GZMB"], "CD14+ Mono": ["LYZ", "CD14", "S100A8", "S100A9"]}


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("attn")
    genes = [g for gs in MARKERS.values() for g in gs] + [f"GENE{i}" for i in range(48)]
    rng = np.random.default_rng(0)
    labels = np.repeat(list(MARKERS), 15)
    counts = rng.poisson(1.0, (len(labels), len(genes))).astype(np.float32)
    for ct in MARKERS:
        cols = [genes.index(g) for g in MARKERS[ct]]
        counts[np.ix_(labels == ct, cols)] += rng.poisson(20, ((labels == ct).sum(), len(cols)))
    adata = ad.AnnData(X=sparse.csr_matrix(counts), obs=pd.DataFrame({"celltype": labels}, index=[f"c{i}" for i in range(len(labels))]))
    adata.var_names = genes
    adata.write_h5ad(d / "cells.h5ad")
    classes = sorted(MARKERS)
    model = tiny_model(n_genes=len(genes), depth=2, heads=2, head="classifier", n_classes=3)
    save_checkpoint(d / "model.pt", model, genes, classes)
    save_checkpoint(d / "pre.pt", tiny_model(n_genes=len(genes), depth=2, heads=2), genes)
    with open(d / "markers.tsv", "w") as f:
        f.write("species\tofficial gene symbol\tcell type\n")
        for ct, name in [("B", "B cells"), ("NK", "NK cells"), ("CD14+ Mono", "Monocytes")]:
            f.writelines(f"Mm Hs\t{g}\t{name}\n" for g in MARKERS[ct])
    with open(d / "sets.gmt", "w") as f:
        f.write("BCELL_SET\tna\t" + "\t".join(MARKERS["B"] + ["GENE1", "GENE2"]) + "\n")
        f.write("NK_SET\tna\t" + "\t".join(MARKERS["NK"] + ["GENE3"]) + "\n")
        f.write("TOO_SMALL\tna\tGENE4\tGENE5\n")
    common = ["--data", str(d / "cells.h5ad"), "--label-key", "celltype", "--quiet", "--batch-size", "8"]
    attn_analysis.main([*common, "--model", str(d / "model.pt"), "--out", str(d / "out"), "--top-k", "6",
                        "--markers", str(d / "markers.tsv"), "--gmt", str(d / "sets.gmt"), "--min-set-size", "3",
                        "--max-cells-per-type", "10", "--umap"])
    attn_analysis.main([*common, "--model", str(d / "pre.pt"), "--out", str(d / "bundled"), "--layer", "all"])
    return {"dir": d, "out": d / "out", "bundled": d / "bundled", "common": common}  # type: ignore[dict-item]


@pytest.mark.slow
def test_analysis_outputs(attention_run: dict) -> None:
    out = attention_run["out"]
    for name in ("attention_top_genes.csv", "attention_by_celltype.csv", "attention_heatmap.png", "marker_overlap.csv",
                 "enrichment.csv", "summary.txt", "metrics.json", "config.json", "log.txt", "umap.png"):
        assert (out / name).is_file(), name
    top = pd.read_csv(out / "attention_top_genes.csv")
    assert list(top.columns) == ["cell_type", "rank", "gene", "score", "known_marker"]
    assert len(top) == 3 * 6 and sorted(top["cell_type"].unique()) == sorted(MARKERS)
    assert all(list(g["rank"]) == list(range(1, 7)) for _, g in top.groupby("cell_type"))
    full = pd.read_csv(out / "attention_by_celltype.csv", index_col=0)
    assert full.shape == (60, 3)
    np.testing.assert_allclose(full.sum(0).to_numpy(), 1.0, atol=0.05)  # shares of all attention, minus the extra position
    mo = pd.read_csv(out / "marker_overlap.csv")
    assert len(mo) == 3 and set(mo["n_markers"]) == {4} and (mo["top_k"] == 6).all()
    assert mo["pvalue"].between(0, 1).all() and (mo["fdr"] >= mo["pvalue"] - 1e-12).all()
    for _, r in mo.iterrows():
        hits = [] if pd.isna(r["overlap_genes"]) else r["overlap_genes"].split(";")
        assert len(hits) == r["overlap"] and set(hits) <= set(MARKERS[r["cell_type"]])
    en = pd.read_csv(out / "enrichment.csv")
    assert set(en["gene_set"]) == {"BCELL_SET", "NK_SET"} and len(en) == 6, "TOO_SMALL is not tested"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_cells_scored"] == {"B": 10, "CD14+ Mono": 10, "NK": 10} and m["n_cells_total"] == 45
    assert m["layers"] == [0, 1], "by default the mean over all layers, as the published analysis"
    assert (out / "umap.png").stat().st_size > 5000 and (out / "attention_heatmap.png").stat().st_size > 5000
    assert "known markers" in (out / "summary.txt").read_text()


def test_analysis_with_bundled_defaults(attention_run: dict) -> None:
    out = attention_run["bundled"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["layers"] == [0, 1] and m["n_cells_scored"] == {"B": 15, "CD14+ Mono": 15, "NK": 15}
    mo = pd.read_csv(out / "marker_overlap.csv").set_index("cell_type")
    assert mo.loc["B", "marker_types"].startswith("B cells") and mo.loc["NK", "marker_types"] == "NK cells"
    assert mo.loc["NK", "n_markers"] == 4, "PanglaoDB NK markers in this vocabulary: NKG7, GNLY, PRF1, GZMB"
    assert pd.read_csv(out / "enrichment.csv")["collection"].eq("msigdb_hallmark_v7.5.1.gmt.gz").all()


def test_analysis_errors(attention_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    d, common = attention_run["dir"], attention_run["common"]
    with pytest.raises(SystemExit) as exit_info:
        attn_analysis.main([*common, "--model", str(d / "model.pt"), "--out", str(d / "out")])
    assert exit_info.value.code == 2 and "attention_top_genes.csv; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        attn_analysis.main([*[c if c != "celltype" else "cell_type" for c in common], "--model", str(d / "model.pt"), "--out", str(d / "e1")])
    assert "available columns: ['celltype']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        attn_analysis.main([*common, "--model", str(d / "model.pt"), "--out", str(d / "e2"), "--layer", "5"])
    assert "has 2 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        attn_analysis.main([*common, "--model", str(d / "pre.pt"), "--out", str(d / "e3"), "--umap"])
    assert "pretrained (not fine-tuned)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        attn_analysis.main([*common, "--model", str(d / "model.pt"), "--out", str(d / "e4"), "--gmt", str(d / "missing.gmt")])
    assert "missing.gmt does not exist" in capsys.readouterr().err


def test_subsample_per_type() -> None:
    labels = np.array(["a"] * 7 + ["b"] * 2)
    idx = analysis.subsample_per_type(labels, 3, seed=0)
    assert len(idx) == 5 and list(labels[idx]).count("a") == 3 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, analysis.subsample_per_type(labels, 3, seed=0))
    assert len(analysis.subsample_per_type(labels, 0, seed=0)) == 9
    assert math.isclose(analysis.mean_by_group(sparse.csr_matrix(np.eye(3)), np.array(["x", "y", "x"]), ["x", "y"])[0, 0], 0.5)


def test_slice_by_slice_scores_equal_the_batched_formula() -> None:
    """The (cell, head) slices give the same column sums as the whole (batch, heads, n, m) tensors."""
    from performer_pytorch.performer_pytorch import softmax_kernel

    from model.attention.scores import received_from_qk

    g = torch.Generator().manual_seed(0)
    b, n, heads, d, m = 3, 257, 4, 16, 40
    q, k = torch.randn(b, n, heads * d, generator=g), torch.randn(b, n, heads * d, generator=g)
    proj = torch.randn(m, d, generator=g)
    qh, kh = (x.reshape(b, n, heads, d).transpose(1, 2) for x in (q, k))
    qp = softmax_kernel(qh, projection_matrix=proj, is_query=True)
    kp = softmax_kernel(kh, projection_matrix=proj, is_query=False)
    w = (qp / (qp @ kp.sum(dim=-2).unsqueeze(-1))).sum(dim=-2)
    expected = (kp @ w.unsqueeze(-1)).squeeze(-1).mean(dim=1)
    torch.testing.assert_close(received_from_qk(q, k, proj, heads), expected, rtol=1e-6, atol=1e-6)


def test_batch_size_fits_the_memory_budget(attention_run: dict) -> None:
    from model.attention.scores import cell_working_bytes, fit_batch_size
    from model.nn.config import ScBERTConfig

    published = ScBERTConfig(n_genes=16906, dim=200, depth=6, heads=10, dim_head=64)
    assert 0.3 * 2**30 < cell_working_bytes(published) < 0.5 * 2**30
    assert fit_batch_size(published, 0.5, 16) == 1 and fit_batch_size(published, None, 16) == 16
    assert fit_batch_size(ScBERTConfig(n_genes=4000, dim=200, depth=6, heads=10, dim_head=64), 0.5, 16) == 5
    d = attention_run["dir"]
    attn_analysis.main([*attention_run["common"], "--model", str(d / "pre.pt"), "--out", str(d / "budget"), "--max-memory", "1e-5"])
    assert "attention batches of 1 cells" in (d / "budget" / "log.txt").read_text()
    a = pd.read_csv(d / "budget" / "attention_top_genes.csv")
    b = pd.read_csv(attention_run["bundled"] / "attention_top_genes.csv")
    # the CSV holds 6 significant digits: a 1e-7 difference of the float32 sums (batch 1 vs a bigger
    # batch, seen on an AVX2-only CPU) can cross a rounding boundary, so compare to that precision
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-9)
    assert list(a["gene"]) == list(b["gene"])
