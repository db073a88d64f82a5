"""Cross-fitted expression scores: ``crossfit_mahalanobis`` and ``crossfit_knn``, the ``pca_*``
scores measured so that a training cell scores like a new cell of its type.

The ``pca_*`` scores fit the PCA and the class statistics on the same training cells, and a cell
that fitted a PCA lies farther out in it than a new cell does (in-sample components follow the
fitted cells' own noise): the model's own training cells get inflated scores and many are rejected.
Here the training cells are split in two halves, stratified by type. Each half fits a PCA; the
class statistics of that PCA come from the OTHER half's cells projected into it, so they describe
cells the PCA never saw. A cell's score is the smaller of its two half-model scores: a training
cell is out-of-sample for at least one half, and a new or validation cell is out-of-sample for both,
so the conformal threshold set on validation cells holds for training and new cells alike. Every
score is a function of the cell and the checkpoint alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.novelty.expression import ExpressionPCA
from model.novelty.scores import CROSSFIT_SCORES, MAX_REFERENCE_CELLS, ClassStatistics

MIN_CROSSFIT_CELLS = 30  # below this, halves of ~15 cells cannot give a PCA and class statistics


def stratified_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of row indices, each type's cells dealt alternately into them after a
    seeded shuffle (so every type with two or more cells is in both halves)."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    start = 0
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        # alternate which half gets the odd cell, so that the halves stay the same size
        first.append(rows[start::2])
        second.append(rows[1 - start::2])
        start = (start + len(rows)) % 2
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


@dataclass
class CrossFitPCA:
    """Two :class:`ExpressionPCA` half-models: each a PCA of one half of the training cells with
    :class:`ClassStatistics` of the other half's projections (see the module's text)."""

    halves: list[ExpressionPCA]

    @classmethod
    def fit(cls, X: Any, labels: np.ndarray, n_classes: int, seed: int = 0, max_cells: int = MAX_REFERENCE_CELLS) -> CrossFitPCA | None:
        """From the training cells ``X`` (as :meth:`ExpressionPCA.fit`) and their class ids; at most
        ``max_cells`` cells per half. None below ``MIN_CROSSFIT_CELLS`` cells."""
        labels = np.asarray(labels)
        if X.shape[0] < MIN_CROSSFIT_CELLS:
            return None
        a, b = stratified_halves(labels, seed)
        halves = []
        for fit_rows, stat_rows in ((a, b), (b, a)):
            pca = ExpressionPCA.fit(X[fit_rows], None, n_classes, seed, max_cells=max_cells)
            coords = pca.transform(X[stat_rows])
            pca.stats = ClassStatistics.fit(coords, coords, labels[stat_rows], n_classes, seed)
            halves.append(pca)
        return cls(halves)

    def scores(self, X: Any, which: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """``crossfit_mahalanobis`` and ``crossfit_knn`` (or those in ``which``) of the cells ``X``:
        per cell, the smaller of the two half-models' scores."""
        wanted = [s for s in CROSSFIT_SCORES if which is None or s in which]
        if not wanted:
            return {}
        out: dict[str, np.ndarray] = {}
        for pca in self.halves:
            z = pca.transform(X)
            for s in wanted:
                v = pca.stats.mahalanobis(z) if s == "crossfit_mahalanobis" else pca.stats.knn(z)
                out[s] = v if s not in out else np.minimum(out[s], v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"halves": [p.to_dict() for p in self.halves]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CrossFitPCA:
        return cls([ExpressionPCA.from_dict(p) for p in d["halves"]])
