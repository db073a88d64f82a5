"""Novelty in the expression itself: a PCA of the training cells' scaled log expression, and the
``pca_mahalanobis`` and ``pca_knn`` scores in it (the ``mahalanobis`` and ``knn`` scores of
:mod:`model.novelty.scores` in PCA coordinates). They do not depend on what the classifier learnt,
only on how far a cell's expression is from that of the training types, as the baselines' scores
in the accuracy benchmark."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.novelty.scores import MAX_REFERENCE_CELLS, PCA_SCORES, ClassStatistics, as_array

PCA_COMPONENTS = 30
SCALE_CLIP = 10.0  # scaled expression is clipped here (scanpy pp.scale(max_value=10)), so a rare gene cannot dominate


def dense_rows(X: Any, rows: np.ndarray) -> np.ndarray:
    """Rows of a CSR, dense or row-source matrix as a dense float32 array."""
    sub = X[rows]
    return np.asarray(sub.todense() if hasattr(sub, "todense") else sub, dtype=np.float32)


def standardise(dense: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """``(x - mean) / sd`` clipped at +-SCALE_CLIP, float32 (cells x genes)."""
    z = dense - mean.astype(np.float32)
    z /= sd.astype(np.float32)  # in place: one cells x genes copy, not two
    return np.clip(z, -SCALE_CLIP, SCALE_CLIP, out=z)


@dataclass
class ExpressionPCA:
    """A PCA of the training cells' log expression, scaled to unit variance per gene and clipped at
    +-``SCALE_CLIP`` (as scanpy's ``pp.scale``), with :class:`ClassStatistics` in its coordinates.
    ``scale`` None: a PCA of the centred, unscaled expression (``fit(scaled=False)``, kept for
    comparisons; RESULTS.md, "the expression PCA of scaled genes")."""

    mean: np.ndarray  # genes: the training cells' mean expression
    components: np.ndarray  # components x genes (float32)
    stats: ClassStatistics | None  # class means, shared precision and kNN reference, in PCA coordinates (None: a projection only)
    scale: np.ndarray | None = None  # genes: the training cells' sd (None: unscaled PCA)
    offset: np.ndarray | None = None  # components: the PCA's own centre of the clipped values, projected

    CHUNK = 1024  # cells projected at a time (a dense chunk: 70 MB at 16,906 genes)

    @classmethod
    def fit(cls, X: Any, labels: np.ndarray | None, n_classes: int, seed: int = 0, n_components: int = PCA_COMPONENTS,
            max_cells: int = MAX_REFERENCE_CELLS, scaled: bool = True) -> ExpressionPCA:
        """From the training cells ``X`` (cells x genes: CSR, dense, or a row source giving CSR for
        ``X[rows]``) and their class ids (None: the projection alone, no class statistics); at most
        ``max_cells`` of them (a seeded sample). ``scaled=False``: centred, unscaled expression."""
        from sklearn.decomposition import PCA

        rows = np.arange(X.shape[0])
        if len(rows) > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_cells, replace=False))
        dense = dense_rows(X, rows)
        mean = dense.mean(axis=0, dtype=np.float64)
        sd = dense.std(axis=0, dtype=np.float64)
        sd[sd < 1e-8] = 1.0  # a gene constant in the training cells: centred, not scaled
        z = standardise(dense, mean, sd) if scaled else dense - mean.astype(np.float32)
        n = min(n_components, z.shape[0] - 1, z.shape[1])
        pca = PCA(n_components=max(n, 1), random_state=seed).fit(z)
        stats = None
        if labels is not None:
            coords = pca.transform(z)
            stats = ClassStatistics.fit(coords, coords, np.asarray(labels)[rows], n_classes, seed)  # its own cap on the reference cells
        components = pca.components_.astype(np.float32)
        if not scaled:
            return cls(mean, components, stats)
        return cls(mean, components, stats, sd, pca.mean_ @ components.T.astype(np.float64))

    def transform(self, X: Any) -> np.ndarray:
        """Cells x components, a chunk of cells at a time: ``(clip((x - mean) / scale) - centre) @
        components.T`` (unscaled PCA: ``(x - mean) @ components.T``)."""
        W = self.components.T.astype(np.float64)
        shift = self.mean @ W if self.scale is None else self.offset
        parts = []
        for start in range(0, X.shape[0], self.CHUNK):
            rows = np.arange(start, min(start + self.CHUNK, X.shape[0]))
            if self.scale is None:
                parts.append(np.asarray(X[rows] @ W, dtype=np.float64) - shift)
            else:
                parts.append(standardise(dense_rows(X, rows), self.mean, self.scale) @ W - shift)
        return np.concatenate(parts) if parts else np.zeros((0, W.shape[1]))

    def scores(self, X: Any, which: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """``pca_mahalanobis`` and ``pca_knn`` (or those of them in ``which``) of the cells ``X``."""
        wanted = [s for s in PCA_SCORES if which is None or s in which]
        if not wanted or self.stats is None:
            return {}
        z = self.transform(X)
        fns = {"pca_mahalanobis": self.stats.mahalanobis, "pca_knn": self.stats.knn}
        return {s: fns[s](z) for s in wanted}

    def to_dict(self) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {"mean": torch.from_numpy(self.mean), "components": torch.from_numpy(self.components),
                               "class_statistics": None if self.stats is None else self.stats.to_dict(),
                               "scale": None, "offset": None}
        if self.scale is not None:
            out.update(scale=torch.from_numpy(self.scale), offset=torch.from_numpy(np.asarray(self.offset)))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExpressionPCA:
        stats = None if d["class_statistics"] is None else ClassStatistics.from_dict(d["class_statistics"])
        scale = None if d["scale"] is None else as_array(d["scale"])
        return cls(as_array(d["mean"]), as_array(d["components"]), stats, scale, None if scale is None else as_array(d["offset"]))
