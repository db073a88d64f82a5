"""Every figure the package writes (PNG): training curves, confusion matrices, predictions,
UMAPs of embeddings, attention heatmaps, genes per cell."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.novelty.rule import UNASSIGNED


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(y_true: Sequence[str], y_pred: Sequence[str], path: Path, title: str = "", columns: Sequence[str] | None = None) -> None:
    """Row-normalised confusion matrix (true types as rows) as a PNG. Columns: the true types, then
    the other predicted ones; or ``columns`` (then any other predicted label), e.g. a model's classes
    and Unassigned when the true types are named otherwise."""
    plt = _pyplot()
    from sklearn.metrics import confusion_matrix

    rows = sorted(set(y_true))
    cols = rows + sorted(set(y_pred) - set(rows)) if columns is None else [*columns, *sorted(set(y_pred) - set(columns))]
    names = list(dict.fromkeys([*rows, *cols]))  # scikit-learn counts over one label list: rows first, then the columns
    full = confusion_matrix(y_true, y_pred, labels=names)
    cm = full[: len(rows)][:, [names.index(c) for c in cols]]
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(cols), 1.0 + 0.5 * len(rows)))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of true type")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history: list[dict[str, float]] | list[list[dict[str, float]]], keys: Sequence[str], path: Path, title: str = "",
                 chosen_epoch: int | list[int] | None = None, baselines: dict[str, str] | None = None) -> None:
    """Training curves (one panel per key) as a PNG; ``chosen_epoch`` (1-based) is marked on every
    panel as the epoch whose weights the model kept, and ``baselines`` (panel key -> history key)
    draws a reference next to a curve, e.g. the most-common-bin baseline next to the masked accuracy.
    An ensemble's histories (one per head) and kept epochs draw one line per head."""
    plt = _pyplot()
    if history and isinstance(history[0], list):
        _plot_heads(plt, history, keys, path, title, chosen_epoch)  # type: ignore[arg-type]
        return

    keys = [k for k in keys if history and k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(epochs, [h[k] for h in history], marker="o", ms=3)
        base = (baselines or {}).get(k)
        if base is not None and base in history[0]:
            ax.plot(epochs, [h[base] for h in history], color="tab:gray", ls="--", label="most-common-bin baseline")
            ax.legend(fontsize=7)
        if chosen_epoch is not None:
            ax.axvline(chosen_epoch, color="tab:red", ls=":", lw=1)
            ax.annotate(f"kept: epoch {chosen_epoch}", (chosen_epoch, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                        color="tab:red", ha="left", va="top")
        ax.set_xlabel("epoch")
        ax.set_title(k.replace("_", " "), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_heads(plt: Any, histories: list[list[dict[str, float]]], keys: Sequence[str], path: Path, title: str,
                chosen: list[int] | None) -> None:
    """:func:`plot_history` of an ensemble: one line per head, its kept epoch a filled marker."""
    keys = [k for k in keys if histories[0] and k in histories[0][0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for j, history in enumerate(histories):
            epochs = [h["epoch"] for h in history]
            line, = ax.plot(epochs, [h[k] for h in history], marker="o", ms=2, lw=1, label=f"head {j + 1}")
            if chosen is not None and chosen[j] in epochs:
                ax.plot([chosen[j]], [history[epochs.index(chosen[j])][k]], marker="*", ms=9, color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_title(k.replace("_", " "), fontsize=9)
    axes[0][0].legend(fontsize=6, title="star: kept epoch", title_fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_predictions(pred: np.ndarray, values: np.ndarray, threshold: float | None, path: Path, score: str = "softmax") -> None:
    """Cells per predicted type, and the distribution of the values that decide Unassigned (the
    confidence for the softmax rule, else the novelty score) with the threshold, as a PNG."""
    plt = _pyplot()

    types = sorted(set(pred), key=lambda t: (t == UNASSIGNED, t))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].barh(types[::-1], [int((pred == t).sum()) for t in types[::-1]], color="tab:blue")
    axes[0].set_xlabel("cells")
    axes[0].set_title("predicted cell types", fontsize=10)
    axes[0].tick_params(axis="y", labelsize=8)
    softmax = score == "softmax"
    finite = values[np.isfinite(values)]
    bins = np.linspace(0, 1, 41) if softmax else 40
    axes[1].hist(finite, bins=bins, color="tab:gray")
    if threshold is not None and np.isfinite(threshold):
        axes[1].axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:.3g}")
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel("confidence (top class probability)" if softmax else f"{score} novelty score (higher: more novel)")
    axes[1].set_ylabel("cells")
    axes[1].set_title("confidence" if softmax else "novelty", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_umap(adata: Any, label_key: str, path: Path, seed: int = 0, prediction_key: str = "scbert_celltype",
              embedding_key: str = "X_scbert") -> None:
    """UMAP of the embeddings ``obsm[embedding_key]`` coloured by ``label_key`` and by the
    predictions ``obs[prediction_key]`` (the keys of :class:`model.inference.AnnotationKeys`)."""
    plt = _pyplot()
    import scanpy as sc

    a = adata.copy()
    # One category list for both columns, so a cell type has the same colour in both panels.
    cats = sorted(set(a.obs[label_key].astype(str)) | set(a.obs[prediction_key].astype(str)))
    for key in (label_key, prediction_key):
        a.obs[key] = pd.Categorical(a.obs[key].astype(str), categories=cats)
    sc.pp.neighbors(a, use_rep=embedding_key, n_neighbors=max(2, min(15, a.n_obs - 1)), random_state=seed)
    sc.tl.umap(a, random_state=seed)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, title in zip(axes, [label_key, prediction_key], [f"label ({label_key})", "scBERT prediction"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)  # raised inside scanpy's plotting
            sc.pl.umap(a, color=key, ax=ax, show=False, title=title, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention_heatmap(scores: np.ndarray, groups: Sequence[str], genes: Sequence[str], path: str | Path,
                           n_per_type: int = 10, title: str = "") -> list[str]:
    """Heatmap of the union of each group's ``n_per_type`` top genes (rows) x groups (columns).

    Each gene's scores are z-scored across groups (raw scores with a single group); rows and
    columns are ordered by hierarchical clustering. Returns the plotted genes, top to bottom.
    """
    plt = _pyplot()
    from scipy.cluster.hierarchy import leaves_list, linkage

    idx: list[int] = []
    for row in scores:
        for j in np.argsort(-row, kind="stable")[:n_per_type]:
            if j not in idx:
                idx.append(int(j))
    M = scores[:, idx].T  # genes x groups
    if M.shape[1] > 1:
        sd = M.std(axis=1, keepdims=True)
        Z = np.divide(M - M.mean(axis=1, keepdims=True), sd, out=np.zeros_like(M), where=sd > 0)
        label = "z-score across cell types"
    else:
        Z, label = M, "mean attention received"
    rows = leaves_list(linkage(Z, "average")) if Z.shape[0] > 2 else np.arange(Z.shape[0])
    cols = leaves_list(linkage(Z.T, "average")) if Z.shape[1] > 2 else np.arange(Z.shape[1])
    Z = Z[np.ix_(rows, cols)]
    row_names = [genes[idx[i]] for i in rows]
    col_names = [groups[i] for i in cols]
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * len(col_names), 1.5 + 0.16 * len(row_names)))
    lim = float(np.abs(Z).max()) or 1.0
    im = ax.imshow(Z, aspect="auto", cmap="RdBu_r" if M.shape[1] > 1 else "viridis",
                   vmin=-lim if M.shape[1] > 1 else None, vmax=lim if M.shape[1] > 1 else None, interpolation="nearest")
    ax.set_yticks(range(len(row_names)), row_names, fontsize=6)
    ax.set_xticks(range(len(col_names)), col_names, rotation=60, ha="right", fontsize=8)
    ax.set_title(title or f"top {n_per_type} attended genes per cell type", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return row_names


def plot_genes_per_cell(n_genes: np.ndarray, min_genes: int | None, path: Path, title: str = "") -> None:
    """Histogram of expressed genes per cell, with the --min-genes cut, as a PNG."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(n_genes, bins=50, color="tab:blue")
    if min_genes:
        ax.axvline(min_genes, color="tab:red", ls="--", label=f"--min-genes {min_genes}: {int((n_genes < min_genes).sum())} cells dropped")
        ax.legend(fontsize=8)
    ax.set_xlabel("expressed genes per cell")
    ax.set_ylabel("cells")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
