"""Per-cell novelty scores from one prediction pass (higher = more novel), and the class statistics
in whose terms the distance scores are measured.

- ``softmax``: 1 - the top class probability (the published rule rejects above 0.5);
- ``energy``: -logsumexp of the logits (Liu et al. 2020);
- ``mahalanobis``: the smallest squared Mahalanobis distance of the classifier's penultimate
  features to a class mean, one covariance shared by the classes, shrunk (Ledoit-Wolf; Lee et al. 2018);
- ``knn``: the Euclidean distance of the L2-normalised cell embedding to its k-th nearest training
  cell (Sun et al. 2022).

The expression scores (``pca_*``) are in :mod:`model.novelty.expression`, the scores of a whole
query (``query_*``) in :mod:`model.novelty.query`, ``combined`` in :mod:`model.novelty.calibration`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# what each score measures (higher: more novel), for predict.py --help and the model card
SCORE_MEANINGS = {
    "softmax": "1 - top probability (the published rule)",
    "energy": "-logsumexp of the classifier's logits",
    "mahalanobis": "distance of the classifier's features to the nearest type's mean (shared covariance)",
    "knn": "distance of the classifier's features (older models: the mean-pooled encodings) to the 10th nearest training cell",
    "pca_mahalanobis": "the mahalanobis score in a PCA of the training cells' expression",
    "pca_knn": "the knn score in that PCA",
    "combined": "Fisher's combination of the p-values of pca_mahalanobis and energy against the validation cells",
    "crossfit_mahalanobis": "pca_mahalanobis cross-fitted: the training cells split in two halves per type, each half's PCA "
                            "scoring with the other half's class statistics, a cell's score the smaller of the two (so the training "
                            "cells score like new cells)",
    "crossfit_knn": "pca_knn cross-fitted the same way",
    "crossfit_combined": "Fisher's combination of crossfit_mahalanobis and energy, with p-values that go on falling beyond the "
                         "largest validation score (per cell: a cell's label does not depend on the other cells of the file)",
    "crossfit_feature_combined": "Fisher's combination of crossfit_mahalanobis, knn and energy (expression, the classifier's "
                                 "features, its logits), with the tail p-values of crossfit_combined (per cell)",
    "query_density": "the share of a cell's nearest neighbours that are query cells rather than training cells (whole query)",
    "query_combined": "Fisher's combination of query_density and pca_mahalanobis (whole query)",
}
SCORES = tuple(SCORE_MEANINGS)
NETWORK_SCORES = ("energy", "mahalanobis", "knn")  # computed by the network, so its precision moves them (softmax aside)
PCA_SCORES = ("pca_mahalanobis", "pca_knn")
CROSSFIT_SCORES = ("crossfit_mahalanobis", "crossfit_knn")  # the pca_* scores cross-fitted on two halves (model.novelty.crossfit)
QUERY_SCORES = ("query_density", "query_combined")  # depend on the whole query: thresholds set at prediction
EXPRESSION_SCORES = (*PCA_SCORES, *CROSSFIT_SCORES, *QUERY_SCORES)  # computed from the input expression alone (the network's precision cannot move them)
COMBINED_PARTS = ("pca_mahalanobis", "energy")  # the scores that ``combined`` joins
CROSSFIT_COMBINED_PARTS = ("crossfit_mahalanobis", "energy")  # the scores that ``crossfit_combined`` joins (with tail p-values)
CROSSFIT_FEATURE_COMBINED_PARTS = ("crossfit_mahalanobis", "knn", "energy")  # ``crossfit_feature_combined`` (tail p-values)
QUERY_COMBINED_PARTS = ("pca_mahalanobis", "query_density")  # the scores that ``query_combined`` joins
MAX_REFERENCE_CELLS = 5000  # training cells kept for the kNN score and the class statistics (seeded sample)
KNN_K = 10


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def softmax_score(probs: np.ndarray) -> np.ndarray:
    """1 - the top class probability, in float64: the one definition of the ``softmax`` score."""
    return 1.0 - np.asarray(probs).max(axis=1).astype(np.float64)


def energy_score(logits: np.ndarray) -> np.ndarray:
    return -logsumexp(logits.astype(np.float64))


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64)."""
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def as_array(x: Any) -> np.ndarray:
    """A stored tensor (or array-like) as a numpy array."""
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


@dataclass
class ClassStatistics:
    """What the ``mahalanobis`` and ``knn`` scores need from the training cells: class means and the
    shared, shrunk precision of some features, and a kNN reference of L2-normalised embeddings."""

    class_means: np.ndarray  # classes x features
    precision: np.ndarray  # features x features: inverse of the shared, shrunk covariance
    reference: np.ndarray  # cells x dim: L2-normalised embeddings of (up to MAX_REFERENCE_CELLS) training cells
    k: int = KNN_K
    # what the kNN reference holds: "features" (the classifier's penultimate features, the cell embedding of a
    # fine-tuned model, where types separate) or "embedding" (the vectors the caller passes: mean-pooled
    # encodings in models fine-tuned before this field existed, PCA coordinates in the cross-fitted scores)
    knn_input: str = "embedding"
    _index: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def fit(cls, features: np.ndarray, embeddings: np.ndarray | None, labels: np.ndarray, n_classes: int, seed: int = 0,
            max_cells: int = MAX_REFERENCE_CELLS, k: int = KNN_K) -> ClassStatistics:
        """From the training cells' features, embeddings and class ids (0..n_classes-1); without
        ``embeddings`` the kNN reference is of the features (``knn_input="features"``)."""
        knn_input = "embedding" if embeddings is not None else "features"
        embeddings = features if embeddings is None else embeddings
        from sklearn.covariance import LedoitWolf

        labels = np.asarray(labels)
        if len(labels) > max_cells:
            keep = np.sort(np.random.default_rng(seed).choice(len(labels), max_cells, replace=False))
            features, embeddings, labels = features[keep], embeddings[keep], labels[keep]
        f = features.astype(np.float64)
        means = np.zeros((n_classes, f.shape[1]))
        for c in range(n_classes):
            rows = labels == c
            means[c] = f[rows].mean(axis=0) if rows.any() else np.nan
        centred = f - means[labels]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return cls(means, precision, normalise_rows(embeddings).astype(np.float32), min(k, len(labels)), knn_input)

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        f = features.astype(np.float64)
        best = np.full(len(f), np.inf)
        for mean in self.class_means:
            if np.isnan(mean).any():
                continue
            d = f - mean
            best = np.minimum(best, np.einsum("ij,jk,ik->i", d, self.precision, d))
        return best

    def knn(self, embeddings: np.ndarray) -> np.ndarray:
        from sklearn.neighbors import NearestNeighbors

        if self._index is None:
            self._index = NearestNeighbors(n_neighbors=self.k).fit(self.reference)
        dist, _ = self._index.kneighbors(normalise_rows(embeddings).astype(np.float32), n_neighbors=self.k)
        return dist[:, -1].astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        import torch

        return {"class_means": torch.from_numpy(self.class_means), "precision": torch.from_numpy(self.precision),
                "reference": torch.from_numpy(self.reference), "k": int(self.k), "knn_input": self.knn_input}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassStatistics:
        return cls(as_array(d["class_means"]), as_array(d["precision"]), as_array(d["reference"]), int(d["k"]),
                   str(d.get("knn_input", "embedding")))

# The score predict.py uses by default: per cell (a function of the cell and the checkpoint alone),
# chosen on the development set (sorted PBMCs, leave-one-type-out; RESULTS.md, "Novel cell types
# (7 December): a per-cell default"): the best mean AUROC and recall among the per-cell scores that
# reject about the calibrated rate of the model's own training cells. Models fine-tuned before the
# cross-fitted statistics existed keep their recorded default.
DEFAULT_SCORE = "crossfit_feature_combined"
