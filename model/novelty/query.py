"""Scores of a whole query: ``query_density``, the share of a cell's nearest neighbours (in an
expression PCA) that are query cells rather than training cells, and ``query_combined``, its
Fisher combination with ``pca_mahalanobis``. A type missing from training makes a region where the
query is dense and the training cells are not, even right beside a known type (naive beside
memory T cells), where distance scores see nothing unusual. A cell's score depends on the other
cells of the query, so the threshold is set at prediction: the calibration cells join the query's
neighbour graph and are scored with it (transductive conformal calibration). The query as a whole
must come from the training data's batch: :func:`query_shift` tells when it does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.novelty.calibration import ScoreCombination
from model.novelty.expression import ExpressionPCA
from model.novelty.scores import MAX_REFERENCE_CELLS, QUERY_COMBINED_PARTS, as_array


def density_neighbours(n_points: int) -> int:
    """The neighbours :class:`QueryDensity` counts among ``n_points`` (training + query + calibration
    cells): sqrt(n), between 15 and 200 (chosen on the development set among 1, 2 and 3 sqrt(n),
    RESULTS.md)."""
    return int(np.clip(round(math.sqrt(n_points)), 15, 200))


# exact distances, computed pair by pair: the same neighbours whatever the thread count (the brute-force
# search's BLAS products round differently with the number of threads and reorder near-ties)
KNN_ALGORITHM = "kd_tree"
MIN_QUERY_CELLS = 100  # below this, query_density has little power (a missing type makes no dense region)
# A query from the training cells' own batch has about half its known cells above the calibration
# cells' median query_density (its novel cells above it too): 0.5 + f / 2 with a novel share f.
# Above this share the query as a whole differs from the training cells (another batch, technology or
# tissue: every region is query-dense), which the score cannot tell from novelty (RESULTS.md).
QUERY_SHIFT_SHARE = 0.8


def query_shift(query: np.ndarray, calibration: np.ndarray) -> float:
    """The share of query cells whose ``query_density`` is above the calibration cells' median
    (about 0.5 plus half the novel share for a query of the training cells' batch; near 1 when the
    whole query is shifted; compare with ``QUERY_SHIFT_SHARE``)."""
    if not len(query) or not len(calibration):
        return float("nan")
    return float((np.asarray(query) > np.median(calibration)).mean())


@dataclass
class QueryDensity:
    """The ``query_density`` score: per query cell, the share of its ``k`` nearest neighbours that
    are query or calibration cells rather than training (reference) cells, in a PCA of scaled
    expression (:func:`density_neighbours` gives ``k``). Where the query holds a type the training
    cells lack, the query is locally denser than the reference, and the share goes up.

    Cross-fitted on two halves of the training cells: a PCA fitted on one half, the other half
    projected into it as the reference, and the same with the halves swapped; the score is the mean
    of the two shares. Cells that fit a PCA lie farther apart in it than new cells do (in-sample
    components follow their own noise), so a reference made of the cells that fitted the PCA would
    make every new cell look like a query neighbour of other new cells; one half alone is noisier
    (RESULTS.md). The calibration cells (validation cells, known types, never trained on) are scored
    in the same graph as the query, so their scores are the threshold's reference for this very
    query."""

    pcas: list[ExpressionPCA]  # one per half of the training cells (projections only, no class statistics)
    references: list[np.ndarray]  # per PCA: the other half of the training cells, projected (cells x components, float32)
    calibrations: list[np.ndarray] | None = None  # per PCA: the calibration cells, projected

    CHUNK = 4096  # query cells whose neighbours are searched at a time

    @classmethod
    def fit(cls, X: Any, seed: int = 0, max_cells: int = MAX_REFERENCE_CELLS) -> QueryDensity | None:
        """From the training cells ``X`` (as :meth:`ExpressionPCA.fit`), split in two seeded halves
        of at most ``max_cells`` each. None below 30 training cells."""
        n = X.shape[0]
        if n < 30:
            return None
        order = np.random.default_rng(seed).permutation(n)
        halves = [np.sort(order[: n // 2][:max_cells]), np.sort(order[n // 2:][:max_cells])]
        pcas, refs = [], []
        for fit_rows, ref_rows in (halves, halves[::-1]):
            pca = ExpressionPCA.fit(X[fit_rows], None, 0, seed, max_cells=max_cells)
            pcas.append(pca)
            refs.append(pca.transform(X[ref_rows]).astype(np.float32))
        return cls(pcas, refs)

    def set_calibration(self, X: Any) -> QueryDensity:
        """Project and keep the calibration cells ``X``."""
        self.calibrations = [p.transform(X).astype(np.float32) for p in self.pcas]
        return self

    def score(self, X: Any, calibration: Any = None, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``query_density`` of the query cells ``X`` and of the calibration cells (``calibration``:
        their expression; default: the ones kept by :meth:`set_calibration`), each PCA's share from
        one neighbour graph of reference, query and calibration cells (``k`` neighbours; default
        :func:`density_neighbours`), averaged over the PCAs."""
        if calibration is None and self.calibrations is None:
            raise ValueError("query_density needs calibration cells: set_calibration() or calibration=")
        shares = []
        for i, pca in enumerate(self.pcas):
            cal = self.calibrations[i] if calibration is None else pca.transform(calibration).astype(np.float32)
            shares.append(self._share(self.references[i], pca.transform(X).astype(np.float32), cal, k))
        share = np.mean(shares, axis=0)
        n_query = X.shape[0]
        return share[:n_query], share[n_query:]

    def _share(self, reference: np.ndarray, query: np.ndarray, cal: np.ndarray, k: int | None) -> np.ndarray:
        """Per query and calibration cell, the share of its neighbours that are not reference cells."""
        from sklearn.neighbors import NearestNeighbors

        points = np.vstack([reference, query, cal])
        k = min(k or density_neighbours(len(points)), len(points) - 1)
        index = NearestNeighbors(n_neighbors=k + 1, algorithm=KNN_ALGORITHM).fit(points)
        side = np.arange(len(points)) >= len(reference)  # True: query or calibration cell
        share = np.empty(len(query) + len(cal))
        for start in range(0, len(share), self.CHUNK):
            rows = np.arange(start, min(start + self.CHUNK, len(share))) + len(reference)
            _, idx = index.kneighbors(points[rows], n_neighbors=k + 1)
            idx = np.where(idx == rows[:, None], idx[:, -1:], idx)[:, :k]  # drop the cell itself (ties: wherever it is)
            share[rows - len(reference)] = side[idx].mean(axis=1)
        return share

    def to_dict(self) -> dict[str, Any]:
        import torch

        return {"pcas": [p.to_dict() for p in self.pcas], "references": [torch.from_numpy(r) for r in self.references],
                "calibrations": None if self.calibrations is None else [torch.from_numpy(c) for c in self.calibrations]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QueryDensity:
        cal = d["calibrations"]
        return cls([ExpressionPCA.from_dict(p) for p in d["pcas"]], [as_array(r) for r in d["references"]],
                   None if cal is None else [as_array(c) for c in cal])


def query_scores(density: QueryDensity, expression: Any, scores: Mapping[str, np.ndarray], calibration_scores: Mapping[str, np.ndarray],
                 calibration_expression: Any = None, mahalanobis: str = "pca_mahalanobis",
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``query_density`` and ``query_combined`` of the query cells (``expression``; their other
    ``scores``) and of the calibration cells (``calibration_scores``, aligned with the calibration
    cells of ``density`` or with ``calibration_expression``). ``query_combined`` needs the
    ``mahalanobis`` score (the expression PCA's) of both; without it only ``query_density``."""
    q, c = density.score(expression, calibration_expression)
    out_q, out_c = {"query_density": q}, {"query_density": c}
    if mahalanobis in scores and mahalanobis in calibration_scores:
        if len(calibration_scores[mahalanobis]) != len(c):
            raise ValueError(f"{len(calibration_scores[mahalanobis])} calibration scores for {len(c)} calibration cells")
        parts = (mahalanobis, QUERY_COMBINED_PARTS[1])
        comb = ScoreCombination.of({mahalanobis: calibration_scores[mahalanobis], "query_density": c}, parts)
        out_q["query_combined"] = comb({mahalanobis: scores[mahalanobis], "query_density": q})
        out_c["query_combined"] = comb({mahalanobis: calibration_scores[mahalanobis], "query_density": c}, leave_one_out=True)
    return out_q, out_c


# A query cell whose nearest training cell is closer than this share of the calibration cells' median
# nearest-training-cell distance is taken for a copy of a training cell (exact copies are at 0).
DUPLICATE_DISTANCE_SHARE = 0.01
DUPLICATE_WARN_SHARE = 0.01  # warn when at least this share of the query copies training cells
SIZE_RATIO_FACTOR = 5.0  # warn when the query/reference size ratio is this many times the calibration's, or less by it


def reference_copies(density: QueryDensity, X: Any) -> np.ndarray:
    """Per query cell (``X``), whether it is an exact or near copy of a training cell: its nearest
    training cell (in either half-model's PCA) is closer than ``DUPLICATE_DISTANCE_SHARE`` of the
    calibration cells' median distance to theirs."""
    from sklearn.neighbors import NearestNeighbors

    copies = np.zeros(X.shape[0], dtype=bool)
    for i, pca in enumerate(density.pcas):
        index = NearestNeighbors(n_neighbors=1, algorithm=KNN_ALGORITHM).fit(density.references[i])
        typical = np.median(index.kneighbors(density.calibrations[i])[0]) if density.calibrations is not None else 1.0
        dist = index.kneighbors(pca.transform(X).astype(np.float32))[0][:, 0]
        copies |= dist <= DUPLICATE_DISTANCE_SHARE * typical
    return copies


def query_warnings(density: QueryDensity, X: Any, score: str) -> list[str]:
    """What makes the ``query_*`` scores unreliable for this query (``X``), one line each: copies of
    training cells in it (the training file itself), and a query/reference size ratio far from the
    calibration's. The batch shift is :func:`query_shift`'s."""
    lines = []
    copies = reference_copies(density, X)
    if copies.mean() >= DUPLICATE_WARN_SHARE:
        lines.append(f"{int(copies.sum())} of {len(copies)} query cells ({copies.mean():.0%}) are copies of the model's training cells: "
                     f"{score} counts them as query cells around the training cells, which makes known cells look novel; "
                     f"annotate the new cells only, or use the per-cell default (--novelty auto)")
    n_ref = len(density.references[0])
    n_cal = 0 if density.calibrations is None else len(density.calibrations[0])
    if n_ref and n_cal:
        ratio, calibrated = X.shape[0] / n_ref, n_cal / n_ref
        if not 1 / SIZE_RATIO_FACTOR <= ratio / calibrated <= SIZE_RATIO_FACTOR:
            lines.append(f"the query has {X.shape[0]} cells against {n_ref} reference cells, a ratio {ratio / calibrated:.1f} times the "
                         f"calibration's ({n_cal} cells): {score}'s threshold was not set for queries of this size; "
                         f"the per-cell default (--novelty auto) does not depend on it")
    return lines
