"""Majority voting over an over-clustering, as CellTypist does: every cell of a small cluster gets
the label most of the cluster's cells were given. Smooths isolated mistakes; the over-clustering
is a given obs column, or Leiden clusters (igraph + leidenalg), at a resolution that grows with the
number of cells, of the cells' expression PCA (the default, as CellTypist) or of the scBERT
embedding (``basis="embedding"``: measured to mix types on PBMC3k, RESULTS.md). Three rules:
``hard`` (CellTypist's: every cell takes its cluster's label), ``soft`` (probabilities blended with
the cluster's mean) and ``cautious`` (the default: only unsure cells of nearly unanimous clusters
change), since clusters coarser than the types (naive / memory T cells) make hard voting erase types."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np


def over_clustering_resolution(n_cells: int) -> float:
    """CellTypist's over-clustering resolutions: 5 below 5,000 cells, 10 below 20,000, 15 below
    40,000, 20 below 100,000, 25 below 200,000, 30 from there on."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0)):
        if n_cells < limit:
            return resolution
    return 30.0


OVER_CLUSTERING_BASES = ("expression", "embedding")
VOTING_RULES = ("hard", "soft", "cautious")
CAUTIOUS_UNSURE = 0.5  # cautious voting: only cells whose top probability is below this may change label ...
CAUTIOUS_MAJORITY = 0.8  # ... and only to a label that at least this share of their cluster's cells have


def expression_pcs(X: Any, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """Principal components of log-normalised expression (cells x genes, dense or sparse), each gene
    scaled to unit variance and clipped at 10, as scanpy's standard clustering recipe does."""
    from scipy import sparse
    from sklearn.decomposition import PCA

    dense = np.asarray(X.todense() if sparse.issparse(X) else X, dtype=np.float32)
    sd = dense.std(0)
    z = np.clip((dense - dense.mean(0)) / np.where(sd > 0, sd, 1.0), -10.0, 10.0)
    n = max(1, min(n_pcs, z.shape[0] - 1, z.shape[1]))
    return PCA(n_components=n, random_state=seed).fit_transform(z).astype(np.float32)


def over_cluster(embedding: np.ndarray, resolution: float | None = None, seed: int = 0) -> np.ndarray:
    """Leiden clusters (as strings) of the kNN graph of ``embedding`` (cells x dim)."""
    import torch

    # scanpy's kNN graph and Leiden reset OpenMP's thread count for the whole process (seen: torch's
    # 1 thread -> all cores, which then oversubscribes the CPU in every later training step)
    threads = torch.get_num_threads()
    try:
        return _leiden(embedding, resolution, seed)
    finally:
        torch.set_num_threads(threads)


def _leiden(embedding: np.ndarray, resolution: float | None, seed: int) -> np.ndarray:
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=np.zeros((embedding.shape[0], 1), dtype=np.float32), obsm={"X_emb": np.asarray(embedding, dtype=np.float32)})
    sc.pp.neighbors(a, use_rep="X_emb", n_neighbors=max(2, min(15, a.n_obs - 1)), random_state=seed)
    res = over_clustering_resolution(a.n_obs) if resolution is None else resolution
    sc.tl.leiden(a, resolution=res, random_state=seed, flavor="igraph", n_iterations=2, directed=False, key_added="over")
    return a.obs["over"].astype(str).to_numpy()


def majority_vote(labels: Any, clusters: Any) -> np.ndarray:
    """Per cell, the most common of ``labels`` in its cluster (ties: the label seen first)."""
    labels, clusters = np.asarray(labels).astype(str), np.asarray(clusters).astype(str)
    if len(labels) != len(clusters):
        raise ValueError(f"{len(labels)} labels for {len(clusters)} cluster assignments")
    winner = {c: Counter(labels[clusters == c]).most_common(1)[0][0] for c in np.unique(clusters)}
    return np.array([winner[c] for c in clusters], dtype=object).astype(str)


def soft_vote(probabilities: np.ndarray, clusters: Any, weight: float = 0.5) -> np.ndarray:
    """Per cell, ``(1 - weight)`` of its own class probabilities plus ``weight`` of its cluster's
    mean: a confident cell keeps its label, an unsure one follows its cluster (``weight=1`` is a
    vote of the mean probabilities)."""
    p = np.asarray(probabilities, dtype=np.float64)
    clusters = np.asarray(clusters).astype(str)
    if len(p) != len(clusters):
        raise ValueError(f"{len(p)} cells of probabilities for {len(clusters)} cluster assignments")
    _, inverse = np.unique(clusters, return_inverse=True)
    sums = np.zeros((inverse.max() + 1, p.shape[1]))
    np.add.at(sums, inverse, p)
    means = sums / np.bincount(inverse)[:, None]
    return (1.0 - weight) * p + weight * means[inverse]


def cautious_vote(probabilities: np.ndarray, clusters: Any, unsure: float = CAUTIOUS_UNSURE, majority: float = CAUTIOUS_MAJORITY) -> np.ndarray:
    """Per cell, the class index it ends with: its own top class, unless its top probability is below
    ``unsure`` and at least ``majority`` of its cluster's cells have one top class, which it then
    takes. Confident cells and mixed clusters (types finer than the clusters) are left alone; chosen
    on the development set (sorted PBMCs) as the rule that changes accuracy least (RESULTS.md)."""
    p = np.asarray(probabilities)
    clusters = np.asarray(clusters).astype(str)
    if len(p) != len(clusters):
        raise ValueError(f"{len(p)} cells of probabilities for {len(clusters)} cluster assignments")
    top = p.argmax(axis=1)
    out = top.copy()
    _, inverse = np.unique(clusters, return_inverse=True)
    for c in range(inverse.max() + 1 if len(inverse) else 0):
        rows = np.flatnonzero(inverse == c)
        counts = np.bincount(top[rows], minlength=p.shape[1])
        if counts.max() >= majority * len(rows):
            change = rows[p[rows].max(axis=1) < unsure]
            out[change] = counts.argmax()
    return out


def vote(rule: str, labels: np.ndarray, probabilities: np.ndarray, classes: Any, clusters: Any) -> np.ndarray:
    """Each cell's label after majority voting by ``rule`` (:data:`VOTING_RULES`): ``hard`` votes the
    cells' ``labels``, ``soft`` and ``cautious`` their ``probabilities`` (columns: ``classes``)."""
    names = np.asarray(classes, dtype=object)
    if rule == "hard":
        return majority_vote(labels, clusters)
    if rule == "cautious":
        return names[cautious_vote(probabilities, clusters)].astype(str)
    if rule == "soft":
        return names[soft_vote(probabilities, clusters).argmax(1)].astype(str)
    raise ValueError(f"voting must be one of {VOTING_RULES}, got {rule!r}")
