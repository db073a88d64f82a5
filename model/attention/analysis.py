"""Which genes a trained model attends to, per cell type: attention scores averaged per type, the
top genes, their overlap with known markers (against an expression baseline) and gene-set
enrichment. :func:`analyse_attention` returns an :class:`AttentionAnalysis` that writes the tables,
the heatmap and the summary lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from data import genesets as gs
from data.io import InputError
from model.attention.scores import Layer, cell_working_bytes, fit_batch_size, mean_attention_by_group, resolve_layers, top_genes
from model.checkpoint import Checkpoint
from model.nn.config import ExecutionOptions

log = logging.getLogger("scbert")

BUNDLED_MARKERS = {"panglaodb": gs.DEFAULT_MARKERS, "immune": gs.IMMUNE_MARKERS}
BUNDLED_GMT = {"hallmark": gs.DEFAULT_GMT, "c2": gs.C2_GMT}


def resolve_gene_set_file(spec: str, bundled: dict[str, Path]) -> Path | None:
    """A bundled name (``panglaodb``, ``immune``, ``hallmark``, ``c2``), ``none`` (None), or a path
    that must exist."""
    key = spec.strip().lower()
    if key == "none":
        return None
    path = bundled.get(key, Path(spec))
    if not path.is_file():
        raise InputError(f"{path} does not exist: give an existing file (or a bundled name: markers panglaodb/immune, gmt hallmark/c2)")
    return path


def subsample_per_type(labels: np.ndarray, max_per_type: int, seed: int) -> np.ndarray:
    """Sorted row indices keeping at most ``max_per_type`` random cells of each label (0 = all)."""
    rng = np.random.default_rng(seed)
    keep = []
    for t in sorted(set(labels)):
        idx = np.flatnonzero(labels == t)
        if max_per_type and len(idx) > max_per_type:
            idx = rng.choice(idx, max_per_type, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep))


def mean_by_group(X: Any, groups: np.ndarray, names: list[str]) -> np.ndarray:
    """(len(names), genes) mean of the rows of sparse ``X`` per group."""
    from scipy import sparse

    codes = np.searchsorted(np.asarray(names), groups)
    ind = sparse.csr_matrix((np.ones(len(groups)), (codes, np.arange(len(groups)))), shape=(len(names), len(groups)))
    sums = np.asarray((ind @ sparse.csr_matrix(X)).todense())
    return sums / np.maximum(np.asarray(ind.sum(axis=1)), 1)


@dataclass
class AttentionSettings:
    layer: Layer = "all"  # "all" (the mean over layers, as published), a layer number (negative from the last), or several
    max_cells_per_type: int = 100  # 0 = all
    top_k: int = 50
    markers: Path | None = None  # marker table (resolve_gene_set_file)
    species: str = "Hs"  # PanglaoDB rows
    celltype_map: Path | None = None  # JSON linking labels to marker-table types (over the bundled aliases)
    gmt: list[Path] = field(default_factory=list)
    min_set_size: int = 5
    max_set_size: int = 500
    batch_size: int = 16  # at most; lowered to fit max_memory_gb
    max_memory_gb: float | None = 0.5  # working memory of a batch (cell_working_bytes); None: no bound
    seed: int = 0


@dataclass
class AttentionAnalysis:
    """Attention received per gene and cell type, and what it was compared with."""

    types: list[str]
    genes: list[str]
    scores: np.ndarray  # types x genes
    n_cells: dict[str, int]
    layers: list[int]
    layer_desc: str
    top: dict[str, list[str]]  # top_k genes per type by attention
    table: pd.DataFrame  # attention_top_genes.csv
    shared: dict[str, int]  # genes shared with the top_k by mean expression
    metrics: dict[str, Any]
    overlap: pd.DataFrame | None = None  # marker_overlap.csv
    enrichment: pd.DataFrame | None = None  # enrichment.csv
    seconds: float = 0.0

    def write(self, out: Path, heatmap_genes: int = 10) -> None:
        """attention_by_celltype.csv, attention_top_genes.csv, attention_heatmap.png, and
        marker_overlap.csv / enrichment.csv when computed."""
        from model.plots import plot_attention_heatmap

        pd.DataFrame(self.scores.T, index=pd.Index(self.genes, name="gene"), columns=self.types).to_csv(
            out / "attention_by_celltype.csv", float_format="%.6g")
        self.metrics["heatmap_genes"] = plot_attention_heatmap(
            self.scores, self.types, self.genes, out / "attention_heatmap.png", heatmap_genes,
            f"attention received ({self.layer_desc}), top {heatmap_genes} genes per type")
        if self.overlap is not None:
            self.overlap.to_csv(out / "marker_overlap.csv", index=False, float_format="%.6g")
        self.table.to_csv(out / "attention_top_genes.csv", index=False, float_format="%.6g")
        if self.enrichment is not None:
            self.enrichment.to_csv(out / "enrichment.csv", index=False, float_format="%.6g")

    def summary_lines(self, max_cells_per_type: int) -> list[str]:
        lines = [f"attention received per gene ({self.layer_desc}; mean over heads and over up to {max_cells_per_type or 'all'} cells "
                 f"per type) for {len(self.types)} cell types, {len(self.genes)} genes"]
        for t in self.types:
            lines.append(f"{t} ({self.n_cells[t]} cells): top genes {', '.join(self.top[t][:10])}")
            if self.overlap is not None:
                r = self.overlap.loc[self.overlap["cell_type"] == t].iloc[0]
                if r["marker_types"]:
                    lines.append(f"  known markers ({r['marker_types']}): {r['overlap']} of the top {r['top_k']} "
                                 f"(expected {r['expected']:.1f} of {r['n_markers']} markers among {len(self.genes)} genes), "
                                 f"p = {r['pvalue']:.3g}, FDR = {r['fdr']:.3g}: {r['overlap_genes'].replace(';', ', ') or '-'}")
                    lines.append(f"  baseline, top {r['top_k']} by mean expression: {r['expression_baseline_overlap']} markers, "
                                 f"p = {r['expression_baseline_pvalue']:.3g}; {self.shared[t]} genes shared with the attention top {r['top_k']}")
                else:
                    lines.append("  known markers: no matching cell type in the marker table")
            if self.enrichment is not None:
                e = self.enrichment[(self.enrichment["cell_type"] == t)].head(3)
                sets = "; ".join(f"{s} (FDR {q:.2g})" for s, q in zip(e["gene_set"], e["fdr"]))
                lines.append(f"  gene sets: {sets or 'none tested'}")
        return lines


def _marker_overlap(s: AttentionSettings, types: list[str], genes: list[str], top: dict[str, list[str]], top_expr: dict[str, list[str]],
                    shared: dict[str, int], n_cells: dict[str, int]) -> tuple[pd.DataFrame, dict[str, set[str]], dict[str, Any]]:
    """Overlap of each type's top genes with its known markers, with the expression baseline."""
    assert s.markers is not None
    mapping = gs.read_celltype_map(gs.DEFAULT_CELLTYPE_MAP)
    if s.celltype_map:
        mapping.update(gs.read_celltype_map(s.celltype_map))
    markers = gs.align_gene_sets(gs.read_markers(s.markers, species=s.species), genes)
    overlap = gs.marker_overlap(top, markers, genes, mapping)
    matched = gs.match_celltypes(types, markers.keys(), mapping)
    marker_sets = {t: set().union(*(markers[m] for m in matched[t])) if matched[t] else set() for t in types}
    overlap.insert(1, "n_cells", [n_cells[t] for t in overlap["cell_type"]])
    base = gs.marker_overlap(top_expr, markers, genes, mapping)
    overlap["expression_baseline_overlap"] = base["overlap"].to_numpy()
    overlap["expression_baseline_pvalue"] = base["pvalue"].to_numpy()
    overlap["shared_with_expression_top_k"] = [shared[t] for t in overlap["cell_type"]]
    unmatched = [t for t in types if not matched[t]]
    if unmatched:
        log.warning("no marker set in %s for: %s (map them with --celltype-map)", s.markers.name, ", ".join(unmatched))
    record = {"file": str(s.markers), "matched_types": matched,
              "overlap": overlap.astype(object).where(overlap.notna(), None).to_dict(orient="records")}
    return overlap, marker_sets, record


def _enrichment(s: AttentionSettings, types: list[str], genes: list[str], top: dict[str, list[str]]) -> tuple[pd.DataFrame, dict[str, Any]]:
    parts = []
    for path in s.gmt:
        sets = gs.align_gene_sets(gs.read_gmt(path), genes)
        for t in types:
            df = gs.enrich(top[t], sets, genes, s.min_set_size, s.max_set_size)
            df.insert(0, "collection", path.name)
            df.insert(0, "cell_type", t)
            parts.append(df)
    enrichment = pd.concat(parts, ignore_index=True)
    sig = enrichment[enrichment["fdr"] < 0.05]
    record = {"files": [str(p) for p in s.gmt], "n_tests": int(len(enrichment)),
              "significant_fdr_0.05": {t: sig.loc[sig["cell_type"] == t, "gene_set"].tolist()[:10] for t in types}}
    return enrichment, record


def analyse_attention(ckpt: Checkpoint, cells: ad.AnnData, labels: Sequence[str], settings: AttentionSettings,
                      device: torch.device, options: ExecutionOptions | None = None, progress: bool = True,
                      what: str = "the cells", n_cells_total: int | None = None) -> AttentionAnalysis:
    """Attention received per gene by the cells of each label (``cells``: raw counts or
    log-normalised, every cell labelled), on up to ``max_cells_per_type`` cells per label.
    ``n_cells_total``: the labelled cells these were drawn from, when ``cells`` is already that
    draw (:func:`subsample_per_type`; files read from disk)."""
    s = settings
    net = ckpt.build_model(options)
    try:
        layers = resolve_layers(net, s.layer)
    except ValueError as e:
        raise InputError(f"--layer {s.layer}: {e}") from None
    depth = ckpt.config.depth
    layer_desc = f"mean of layers {layers}" if len(layers) > 1 else f"layer {layers[0]} of 0..{depth - 1}"
    prepared, rep = ckpt.prepare(cells, what=what)
    for line in rep.lines(with_warnings=False):
        log.info("%s", line)
    labels = np.asarray(labels).astype(str)
    sel = subsample_per_type(labels, s.max_cells_per_type, s.seed)
    genes = list(ckpt.genes)
    log.info("scoring attention (%s) on %d of %d cells, %d cell types, %d genes", layer_desc, len(sel), len(labels), len(set(labels)), len(genes))
    t0 = time.time()
    batch_size = fit_batch_size(ckpt.config, s.max_memory_gb, s.batch_size)
    if batch_size < s.batch_size:
        log.info("attention batches of %d cells (of --batch-size %d) keep the working memory within --max-memory %.2g GB (%.0f MB a cell "
                 "at %d genes)", batch_size, s.batch_size, s.max_memory_gb, cell_working_bytes(ckpt.config) / 2**20, ckpt.config.n_genes)
    types, scores, counts = mean_attention_by_group(net, prepared.X[sel], labels[sel], layers, batch_size, device, progress=progress)
    seconds = time.time() - t0
    n_cells = dict(zip(types, map(int, counts)))

    table = top_genes(scores, types, genes, s.top_k)
    top = {t: table.loc[table["cell_type"] == t, "gene"].tolist() for t in types}
    # Baseline: attention largely follows expression bins, so compare with the most expressed genes of the same cells.
    expr = top_genes(mean_by_group(prepared.X[sel], labels[sel], types), types, genes, s.top_k)
    top_expr = {t: expr.loc[expr["cell_type"] == t, "gene"].tolist() for t in types}
    shared = {t: len(set(top[t]) & set(top_expr[t])) for t in types}
    metrics: dict[str, Any] = {
        "layers": layers, "top_k": s.top_k, "n_genes": len(genes), "n_cells_total": int(n_cells_total or len(labels)), "n_cells_scored": n_cells,
        "preprocessing": rep.to_dict(), "shared_with_expression_top_k": shared,
    }
    overlap, marker_sets = None, {t: set() for t in types}
    if s.markers is not None:
        overlap, marker_sets, metrics["markers"] = _marker_overlap(s, types, genes, top, top_expr, shared, n_cells)
    table["known_marker"] = [g in marker_sets[t] for t, g in zip(table["cell_type"], table["gene"])]
    enrichment = None
    if s.gmt:
        enrichment, metrics["enrichment"] = _enrichment(s, types, genes, top)
    return AttentionAnalysis(types, genes, scores, n_cells, layers, layer_desc, top, table, shared, metrics, overlap, enrichment, seconds)
