"""What attn_analysis.py does once its arguments are parsed: attention per cell type, markers, gene sets."""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("scbert")

BUNDLED_MARKERS = {"panglaodb": "DEFAULT_MARKERS", "immune": "IMMUNE_MARKERS"}
BUNDLED_GMT = {"hallmark": "DEFAULT_GMT", "c2": "C2_GMT"}


def _resolve(spec: str, bundled: dict[str, str]) -> Path | None:
    """A bundled keyword, 'none', or a path."""
    from data import genesets

    key = spec.strip().lower()
    if key == "none":
        return None
    if key in bundled:
        return Path(getattr(genesets, bundled[key]))
    return Path(spec)


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


def plot_umap(adata: Any, label_key: str, path: Path, seed: int = 0) -> None:
    """UMAP of ``obsm['X_scbert']`` coloured by ``label_key`` and by ``obs['scbert_celltype']``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    a = adata.copy()
    # One category list for both columns, so a cell type has the same colour in both panels.
    cats = sorted(set(a.obs[label_key].astype(str)) | set(a.obs["scbert_celltype"].astype(str)))
    for key in (label_key, "scbert_celltype"):
        a.obs[key] = pd.Categorical(a.obs[key].astype(str), categories=cats)
    sc.pp.neighbors(a, use_rep="X_scbert", n_neighbors=max(2, min(15, a.n_obs - 1)), random_state=seed)
    sc.tl.umap(a, random_state=seed)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, title in zip(axes, [label_key, "scbert_celltype"], [f"label ({label_key})", "scBERT prediction"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)  # raised inside scanpy's plotting
            sc.pl.umap(a, color=key, ax=ax, show=False, title=title, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_attention(args: argparse.Namespace) -> dict[str, Any]:
    """Everything after argument parsing; returns the metrics written to metrics.json."""
    from data import genesets as gs
    from data.io import InputError, read_cells
    from data.preprocess import prepare
    from model.attention import mean_attention_by_group, plot_attention_heatmap, resolve_layers, top_genes
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.cli import fail, published_names, start_run, write_json
    from model.training import resolve_device

    t0 = time.time()
    out = start_run(args.out, args, protected=("attention_top_genes.csv",))
    try:
        marker_path = _resolve(args.markers, BUNDLED_MARKERS)
        gmt_specs = [s for s in args.gmt if s.strip().lower() != "none"]
        gmt_paths = [_resolve(s, BUNDLED_GMT) for s in gmt_specs]
        for path in [marker_path, *gmt_paths, Path(args.celltype_map) if args.celltype_map else None]:
            if path is not None and not path.is_file():
                raise InputError(f"{path} does not exist: give an existing file (or a bundled name: markers panglaodb/immune, gmt hallmark/c2)")
        ckpt = load_checkpoint(args.model, **published_names(args))
        net = ckpt.build_model()
        try:
            layers = resolve_layers(net, args.layer)
        except ValueError as e:
            raise InputError(f"--layer {args.layer}: {e}") from None
        depth = ckpt.config.depth
        layer_desc = f"mean of layers {layers}" if len(layers) > 1 else f"layer {layers[0]} of 0..{depth - 1}"
        if args.umap and (ckpt.config.head != "classifier" or not ckpt.classes):
            raise InputError(f"--umap colours cells by the model's predictions, but {args.model} is a pretrained (not fine-tuned) model; drop --umap or use a fine-tuned model")
        raw = read_cells(args.data)
        if args.label_key not in raw.obs:
            raise InputError(f"--label-key {args.label_key!r} is not a column of {args.data}; available columns: {list(raw.obs.columns)}")
        known = raw.obs[args.label_key].notna().to_numpy()
        if not known.any():
            raise InputError(f"column {args.label_key!r} of {args.data} is empty: no cell has a label")
        if not known.all():
            log.warning("%d cells have no %s label and are left out", int((~known).sum()), args.label_key)
        labelled = raw[known].copy()
        prepared, rep = prepare(labelled, genes=ckpt.genes, min_genes=None, target_sum=ckpt.preprocessing.get("target_sum", 1e4), what=str(args.data))
        for line in rep.lines(with_warnings=False):
            log.info("%s", line)
        labels = labelled.obs[args.label_key].astype(str).to_numpy()
        sel = subsample_per_type(labels, args.max_cells_per_type, args.seed)
        genes = list(ckpt.genes)
        device = resolve_device(args.device)
        log.info("scoring attention (%s) on %d of %d cells, %d cell types, %d genes",
                 layer_desc, len(sel), len(labels), len(set(labels)), len(genes))
        t_attn = time.time()
        types, scores, counts = mean_attention_by_group(net, prepared.X[sel], labels[sel], layers,
                                                        args.batch_size, device, args.precision, progress=not args.quiet)
        attn_seconds = time.time() - t_attn
        n_cells = dict(zip(types, map(int, counts)))

        table = top_genes(scores, types, genes, args.top_k)
        top = {t: table.loc[table["cell_type"] == t, "gene"].tolist() for t in types}
        # Baseline: attention largely follows expression bins, so compare with the most expressed genes of the same cells.
        expr = top_genes(mean_by_group(prepared.X[sel], labels[sel], types), types, genes, args.top_k)
        top_expr = {t: expr.loc[expr["cell_type"] == t, "gene"].tolist() for t in types}
        shared = {t: len(set(top[t]) & set(top_expr[t])) for t in types}
        pd.DataFrame(scores.T, index=pd.Index(genes, name="gene"), columns=types).to_csv(out / "attention_by_celltype.csv", float_format="%.6g")
        heat_genes = plot_attention_heatmap(scores, types, genes, out / "attention_heatmap.png", args.heatmap_genes,
                                            f"attention received ({layer_desc}), top {args.heatmap_genes} genes per type")

        metrics: dict[str, Any] = {
            "data": str(args.data), "model": str(args.model), "label_key": args.label_key, "layers": layers,
            "top_k": args.top_k, "n_genes": len(genes), "n_cells_total": int(len(labels)), "n_cells_scored": n_cells,
            "preprocessing": rep.to_dict(), "heatmap_genes": heat_genes, "shared_with_expression_top_k": shared,
        }
        overlap = None
        marker_sets: dict[str, set[str]] = {t: set() for t in types}
        if marker_path is not None:
            mapping = gs.read_celltype_map(gs.DEFAULT_CELLTYPE_MAP)
            if args.celltype_map:
                mapping.update(gs.read_celltype_map(args.celltype_map))
            markers = gs.align_gene_sets(gs.read_markers(marker_path, species=args.species), genes)
            overlap = gs.marker_overlap(top, markers, genes, mapping)
            matched = gs.match_celltypes(types, markers.keys(), mapping)
            marker_sets = {t: set().union(*(markers[m] for m in matched[t])) if matched[t] else set() for t in types}
            overlap.insert(1, "n_cells", [n_cells[t] for t in overlap["cell_type"]])
            base = gs.marker_overlap(top_expr, markers, genes, mapping)
            overlap["expression_baseline_overlap"] = base["overlap"].to_numpy()
            overlap["expression_baseline_pvalue"] = base["pvalue"].to_numpy()
            overlap["shared_with_expression_top_k"] = [shared[t] for t in overlap["cell_type"]]
            overlap.to_csv(out / "marker_overlap.csv", index=False, float_format="%.6g")
            unmatched = [t for t in types if not matched[t]]
            if unmatched:
                log.warning("no marker set in %s for: %s (map them with --celltype-map)", marker_path.name, ", ".join(unmatched))
            metrics["markers"] = {"file": str(marker_path), "matched_types": matched,
                                  "overlap": overlap.astype(object).where(overlap.notna(), None).to_dict(orient="records")}
        table["known_marker"] = [g in marker_sets[t] for t, g in zip(table["cell_type"], table["gene"])]
        table.to_csv(out / "attention_top_genes.csv", index=False, float_format="%.6g")

        enrichment = None
        if gmt_paths:
            parts = []
            for path in gmt_paths:
                sets = gs.align_gene_sets(gs.read_gmt(path), genes)
                for t in types:
                    df = gs.enrich(top[t], sets, genes, args.min_set_size, args.max_set_size)
                    df.insert(0, "collection", path.name)
                    df.insert(0, "cell_type", t)
                    parts.append(df)
            enrichment = pd.concat(parts, ignore_index=True)
            enrichment.to_csv(out / "enrichment.csv", index=False, float_format="%.6g")
            sig = enrichment[enrichment["fdr"] < 0.05]
            metrics["enrichment"] = {"files": [str(p) for p in gmt_paths], "n_tests": int(len(enrichment)),
                                     "significant_fdr_0.05": {t: sig.loc[sig["cell_type"] == t, "gene_set"].tolist()[:10] for t in types}}

        if args.umap:
            from model.pipeline import annotate

            log.info("embedding all %d cells for the UMAP", labelled.n_obs)
            annotated, _ = annotate(labelled, ckpt, batch_size=args.batch_size, device=device, precision=args.precision, progress=not args.quiet)
            plot_umap(annotated, args.label_key, out / "umap.png", args.seed)
            metrics["umap_accuracy_vs_label"] = float((annotated.obs["scbert_celltype"].astype(str).to_numpy() == labels).mean())
    except (InputError, CheckpointError) as e:
        fail(str(e))
    metrics["seconds_attention"] = round(attn_seconds, 1)
    metrics["seconds"] = round(time.time() - t0, 1)
    write_json(out / "metrics.json", metrics)

    lines = [f"attention received per gene ({layer_desc}; mean over heads and over up to {args.max_cells_per_type or 'all'} cells per type) "
             f"for {len(types)} cell types, {len(genes)} genes; {metrics['seconds']} s in all ({metrics['seconds_attention']} s attention)"]
    for t in types:
        lines.append(f"{t} ({n_cells[t]} cells): top genes {', '.join(top[t][:10])}")
        if overlap is not None:
            r = overlap.loc[overlap["cell_type"] == t].iloc[0]
            if r["marker_types"]:
                lines.append(f"  known markers ({r['marker_types']}): {r['overlap']} of the top {r['top_k']} "
                             f"(expected {r['expected']:.1f} of {r['n_markers']} markers among {len(genes)} genes), "
                             f"p = {r['pvalue']:.3g}, FDR = {r['fdr']:.3g}: {r['overlap_genes'].replace(';', ', ') or '-'}")
                lines.append(f"  baseline, top {r['top_k']} by mean expression: {r['expression_baseline_overlap']} markers, "
                             f"p = {r['expression_baseline_pvalue']:.3g}; {shared[t]} genes shared with the attention top {r['top_k']}")
            else:
                lines.append("  known markers: no matching cell type in the marker table")
        if enrichment is not None:
            e = enrichment[(enrichment["cell_type"] == t)].head(3)
            sets = "; ".join(f"{s} (FDR {q:.2g})" for s, q in zip(e["gene_set"], e["fdr"]))
            lines.append(f"  gene sets: {sets or 'none tested'}")
    lines.append(f"outputs in {out}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in lines:
        log.info(line)
    return metrics
