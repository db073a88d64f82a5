"""Novelty scores (is this cell of a type the model was not trained on?) and their calibration.

Six scores, higher = more novel, all computed from what one prediction pass has (logits, the
classifier's penultimate features, the cell embedding, and the cell's input expression):

- ``softmax``: 1 - the top class probability (the published rule is ``softmax`` > 0.5);
- ``energy``: -logsumexp of the logits (Liu et al. 2020);
- ``mahalanobis``: the smallest squared Mahalanobis distance of the penultimate head features to a
  class mean, with one covariance shared by the classes, shrunk (Ledoit-Wolf) (Lee et al. 2018);
- ``knn``: the Euclidean distance of the cell embedding to its k-th nearest training cell (Sun et
  al. 2022), on L2-normalised embeddings;
- ``pca_mahalanobis`` and ``pca_knn``: the same two in a PCA of the training cells' log expression
  of the model's genes (:class:`ExpressionPCA`): they do not depend on what the classifier learnt,
  only on how far the cell's expression is from that of the training types (as the baselines'
  scores in the accuracy benchmark);
- ``combined``: Fisher's combination, -2 sum log p, of the conformal p-values of ``pca_mahalanobis``
  (far from the training expression) and ``energy`` (the classifier is unsure), each p-value the
  share of calibration cells scoring at least as high (:class:`ScoreCombination`). Chosen on the
  development set (sorted PBMCs) among four combinations, see RESULTS.md;
- ``query_density`` and ``query_combined`` (:class:`QueryDensity`): scores of the query as a whole.
  ``query_density`` is the share of a cell's nearest neighbours (in an expression PCA) that are
  query cells rather than training cells: a type missing from training makes a region where the
  query is dense and the training cells are not, even right beside a known type (naive beside
  memory T cells), where distance scores see nothing unusual. ``query_combined`` is Fisher's
  combination of it with ``pca_mahalanobis``. A cell's score depends on the other cells of the
  query, so their threshold is set at prediction: the calibration cells join the query's
  neighbour graph and are scored with it (transductive conformal calibration).

:class:`NoveltyStats` holds what the last four need from the training cells (at most
``MAX_REFERENCE_CELLS`` of them, a seeded sample; the PCA adds ``PCA_COMPONENTS`` + 2 floats per gene). :func:`calibrate` sets, on cells of known
types that did not train the model (validation cells), the threshold of each score above which a
cell is rejected: the split-conformal quantile, so that at most ``reject_rate`` of new cells of
known types are rejected (for exchangeable cells; Vovk et al. 2005, Angelopoulos & Bates 2021).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCORES = ("softmax", "energy", "mahalanobis", "knn", "pca_mahalanobis", "pca_knn", "combined", "query_density", "query_combined")
PCA_SCORES = ("pca_mahalanobis", "pca_knn")
QUERY_SCORES = ("query_density", "query_combined")  # depend on the whole query: thresholds set at prediction
EXPRESSION_SCORES = (*PCA_SCORES, *QUERY_SCORES)  # computed from the input expression alone (the network's precision cannot move them)
COMBINED_PARTS = ("pca_mahalanobis", "energy")  # the scores that ``combined`` joins
QUERY_COMBINED_PARTS = ("pca_mahalanobis", "query_density")  # the scores that ``query_combined`` joins
PCA_COMPONENTS = 30
SCALE_CLIP = 10.0  # scaled expression is clipped here (scanpy pp.scale(max_value=10)), so a rare gene cannot dominate
MAX_REFERENCE_CELLS = 5000  # training cells kept for the kNN score and the class statistics (seeded sample)
MAX_CALIBRATION_CELLS = 10000  # validation scores kept, so that predict.py can use another reject rate
KNN_K = 10
# The score predict.py uses by default: the one with the highest mean AUROC (known vs held-out type)
# for scBERT in the benchmark of RESULTS.md (PBMC3k leave-one-type-out, 8 types, 2 folds, the
# large-corpus encoder; results.json "best_novelty_score"): pca_mahalanobis 0.841, mahalanobis 0.702,
# energy 0.673, knn 0.629, pca_knn 0.580, softmax 0.565 (4 December); 0.852 with the scaled PCA, combined
# 0.822 (5 December); query_combined 0.961, query_density 0.951 (5 December, third session). It needs the whole query
# from the training data's batch: inference.query_rule falls back to pca_mahalanobis otherwise.
DEFAULT_SCORE = "query_combined"


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def softmax_score(probs: np.ndarray) -> np.ndarray:
    """1 - the top class probability, in float64 (the published rule rejects above 0.5)."""
    return 1.0 - probs.max(axis=1).astype(np.float64)


def energy_score(logits: np.ndarray) -> np.ndarray:
    return -logsumexp(logits.astype(np.float64))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class NoveltyStats:
    """What the ``mahalanobis`` and ``knn`` scores need from the training cells (and, in ``pca`` and
    ``density``, the expression scores)."""

    class_means: np.ndarray  # classes x features (penultimate head features)
    precision: np.ndarray  # features x features: inverse of the shared, shrunk covariance
    reference: np.ndarray  # cells x dim: L2-normalised embeddings of (up to MAX_REFERENCE_CELLS) training cells
    k: int = KNN_K
    pca: ExpressionPCA | None = None  # for the pca_* scores (checkpoints of 3 December and before have none)
    density: QueryDensity | None = None  # for the query_* scores (checkpoints of 5 December and before have none)
    combination: ScoreCombination | None = None  # for ``combined``: the calibration cells' scores (not saved with the stats)
    calibration: Calibration | None = None  # for the query_* scores: the calibration cells' scores (not saved with the stats)
    _index: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def fit(cls, features: np.ndarray, embeddings: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0,
            max_cells: int = MAX_REFERENCE_CELLS, k: int = KNN_K) -> NoveltyStats:
        """From the training cells' features, embeddings and class ids (0..n_classes-1)."""
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
        return cls(means, precision, _normalise(embeddings).astype(np.float32), min(k, len(labels)))

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
        dist, _ = self._index.kneighbors(_normalise(embeddings).astype(np.float32), n_neighbors=self.k)
        return dist[:, -1].astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        import torch

        out = {"class_means": torch.from_numpy(self.class_means), "precision": torch.from_numpy(self.precision),
               "reference": torch.from_numpy(self.reference), "k": int(self.k)}
        if self.pca is not None:
            out["pca"] = self.pca.to_dict()
        if self.density is not None:
            out["density"] = self.density.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NoveltyStats:
        pca = ExpressionPCA.from_dict(d["pca"]) if d.get("pca") else None
        density = QueryDensity.from_dict(d["density"]) if d.get("density") else None
        return cls(_array(d["class_means"]), _array(d["precision"]), _array(d["reference"]), int(d["k"]), pca, density)


def _array(x: Any) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _dense_rows(X: Any, rows: np.ndarray) -> np.ndarray:
    sub = X[rows]
    return np.asarray(sub.todense() if hasattr(sub, "todense") else sub, dtype=np.float32)


@dataclass
class ExpressionPCA:
    """A PCA of the training cells' log expression, scaled to unit variance per gene and clipped at
    +-``SCALE_CLIP`` (as scanpy's ``pp.scale``), with the class statistics of :class:`NoveltyStats`
    in its coordinates. Checkpoints of 4 December have no ``scale``: their PCA is of the centred,
    unscaled expression, and is read and used as such."""

    mean: np.ndarray  # genes: the training cells' mean expression
    components: np.ndarray  # components x genes (float32)
    stats: NoveltyStats | None  # class means, shared precision and kNN reference, in PCA coordinates (None: a projection only)
    scale: np.ndarray | None = None  # genes: the training cells' sd (None: unscaled PCA)
    offset: np.ndarray | None = None  # components: the PCA's own centre of the clipped values, projected

    CHUNK = 1024  # cells projected at a time (a dense chunk: 70 MB at 16,906 genes)

    @classmethod
    def fit(cls, X: Any, labels: np.ndarray | None, n_classes: int, seed: int = 0, n_components: int = PCA_COMPONENTS,
            max_cells: int = MAX_REFERENCE_CELLS, scaled: bool = True) -> ExpressionPCA:
        """From the training cells ``X`` (cells x genes: CSR, dense, or a row source giving CSR for
        ``X[rows]``) and their class ids (None: the projection alone, no class statistics); at most
        ``max_cells`` of them (a seeded sample). ``scaled=False``: the PCA of centred, unscaled
        expression (that of 4 December)."""
        from sklearn.decomposition import PCA

        rows = np.arange(X.shape[0])
        if len(rows) > max_cells:
            rows = np.sort(np.random.default_rng(seed).choice(len(rows), max_cells, replace=False))
        dense = _dense_rows(X, rows)
        mean = dense.mean(axis=0, dtype=np.float64)
        sd = dense.std(axis=0, dtype=np.float64)
        sd[sd < 1e-8] = 1.0  # a gene constant in the training cells: centred, not scaled
        z = _scaled(dense, mean, sd) if scaled else dense - mean.astype(np.float32)
        n = min(n_components, z.shape[0] - 1, z.shape[1])
        pca = PCA(n_components=max(n, 1), random_state=seed).fit(z)
        stats = None
        if labels is not None:
            coords = pca.transform(z)
            stats = NoveltyStats.fit(coords, coords, np.asarray(labels)[rows], n_classes, seed)  # its own cap on the reference cells
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
                parts.append(_scaled(_dense_rows(X, rows), self.mean, self.scale) @ W - shift)
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

        out = {"mean": torch.from_numpy(self.mean), "components": torch.from_numpy(self.components)}
        if self.stats is not None:
            out["stats"] = self.stats.to_dict()
        if self.scale is not None:
            out.update(scale=torch.from_numpy(self.scale), offset=torch.from_numpy(np.asarray(self.offset)))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExpressionPCA:
        scaled = d.get("scale") is not None
        return cls(_array(d["mean"]), _array(d["components"]), NoveltyStats.from_dict(d["stats"]) if d.get("stats") else None,
                   _array(d["scale"]) if scaled else None, _array(d["offset"]) if scaled else None)


def _scaled(dense: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """``(x - mean) / sd`` clipped at +-SCALE_CLIP, float32 (cells x genes)."""
    z = dense - mean.astype(np.float32)
    z /= sd.astype(np.float32)  # in place: one cells x genes copy, not two
    return np.clip(z, -SCALE_CLIP, SCALE_CLIP, out=z)


@dataclass
class ScoreCombination:
    """Fisher's combination of conformal p-values: a cell's p-value for a score is the share of the
    ``n`` calibration cells (known types, not trained on) scoring at least as high, (1 + count) /
    (n + 1); the combined score is -2 sum log p over the parts. A cell must be unusual on one part
    or somewhat unusual on both to score high; the parts need no common scale."""

    reference: dict[str, np.ndarray]  # part -> the calibration cells' scores, sorted

    @classmethod
    def of(cls, scores: Mapping[str, np.ndarray], parts: Sequence[str] = COMBINED_PARTS) -> ScoreCombination | None:
        """From the calibration cells' ``scores`` (None when a part is missing)."""
        if not parts or any(p not in scores for p in parts) or not len(scores[parts[0]]):
            return None
        return cls({p: np.sort(np.asarray(scores[p], dtype=np.float64)) for p in parts})

    def pvalues(self, part: str, x: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
        """Per cell, (1 + calibration cells scoring >= x) / (n + 1); ``leave_one_out``: for the
        calibration cells themselves, each left out of its own reference."""
        ref = self.reference[part]
        at_least = len(ref) - np.searchsorted(ref, np.asarray(x, dtype=np.float64), side="left")
        if leave_one_out:
            return at_least / len(ref)  # the cell counts itself once: (1 + (count - 1)) / ((n - 1) + 1)
        return (1.0 + at_least) / (len(ref) + 1.0)

    def __call__(self, scores: Mapping[str, np.ndarray], leave_one_out: bool = False) -> np.ndarray:
        return -2.0 * sum(np.log(self.pvalues(p, scores[p], leave_one_out)) for p in self.reference)


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

        out: dict[str, Any] = {"pcas": [p.to_dict() for p in self.pcas], "references": [torch.from_numpy(r) for r in self.references]}
        if self.calibrations is not None:
            out["calibrations"] = [torch.from_numpy(c) for c in self.calibrations]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QueryDensity:
        cal = d.get("calibrations")
        return cls([ExpressionPCA.from_dict(p) for p in d["pcas"]], [_array(r) for r in d["references"]],
                   None if cal is None else [_array(c) for c in cal])


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
        parts = (mahalanobis, "query_density")
        comb = ScoreCombination.of({mahalanobis: calibration_scores[mahalanobis], "query_density": c}, parts)
        out_q["query_combined"] = comb({mahalanobis: scores[mahalanobis], "query_density": q})
        out_c["query_combined"] = comb({mahalanobis: calibration_scores[mahalanobis], "query_density": c}, leave_one_out=True)
    return out_q, out_c


def novelty_scores(probs: np.ndarray, logits: np.ndarray, features: np.ndarray | None = None, embeddings: np.ndarray | None = None,
                   stats: NoveltyStats | None = None, which: Collection[str] | None = None,
                   expression: Any = None) -> dict[str, np.ndarray]:
    """Every score that the inputs allow (or those of them in ``which``): ``softmax`` and
    ``energy`` always, ``mahalanobis`` and ``knn`` with ``stats`` (and the features / embeddings),
    ``pca_*`` with stats that have a PCA and the cells' ``expression`` (the model's input matrix),
    ``combined`` with stats that have its ``combination`` and the inputs of its parts."""
    combination = None if stats is None else stats.combination
    if which is not None and "combined" in which and combination is not None:
        which = {*which, *combination.reference}

    def want(name: str) -> bool:
        return which is None or name in which

    out = {name: f(x) for name, f, x in (("softmax", softmax_score, probs), ("energy", energy_score, logits)) if want(name)}
    if stats is not None and features is not None and want("mahalanobis"):
        out["mahalanobis"] = stats.mahalanobis(features)
    if stats is not None and embeddings is not None and want("knn"):
        out["knn"] = stats.knn(embeddings)
    if stats is not None and stats.pca is not None and expression is not None:
        out.update(stats.pca.scores(expression, which))
    if want("combined") and combination is not None and all(p in out for p in combination.reference):
        out["combined"] = combination(out)
    return out


def conformal_threshold(scores: np.ndarray, reject_rate: float) -> float:
    """The split-conformal threshold: the ceil((n + 1)(1 - reject_rate))-th smallest of the ``n``
    calibration ``scores``; a new cell of a known type has a score above it with probability at
    most ``reject_rate``. Infinite (reject nothing) when n is too small for that rate."""
    if not 0.0 < reject_rate < 1.0:
        raise ValueError(f"reject_rate must be in (0, 1), got {reject_rate}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(s) + 1) * (1.0 - reject_rate))
    return math.inf if rank > len(s) else float(s[rank - 1])


@dataclass
class Calibration:
    """Thresholds of each score, set on ``n`` calibration cells for ``reject_rate``, and the
    calibration scores themselves (for another rate later)."""

    reject_rate: float
    thresholds: dict[str, float]
    scores: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return len(next(iter(self.scores.values())))

    def threshold(self, score: str, reject_rate: float | None = None) -> float:
        if reject_rate is None or reject_rate == self.reject_rate:
            return self.thresholds[score]
        return conformal_threshold(self.scores[score], reject_rate)


def calibrate(scores: Mapping[str, np.ndarray], reject_rate: float = 0.05, seed: int = 0,
              max_cells: int = MAX_CALIBRATION_CELLS) -> Calibration:
    """Thresholds for ``reject_rate`` from the scores of calibration cells (known types, not
    trained on)."""
    kept = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items() if k != "combined"}
    n = len(next(iter(kept.values())))
    if n > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
        kept = {k: v[rows] for k, v in kept.items()}
    return with_combined(Calibration(reject_rate, {k: conformal_threshold(v, reject_rate) for k, v in kept.items()}, kept))


def with_combined(cal: Calibration) -> Calibration:
    """``cal`` with the ``combined`` score of its cells (each against the others) and its threshold,
    when it has the parts' scores (checkpoints calibrated before ``combined`` existed get it here)."""
    comb = ScoreCombination.of(cal.scores)
    if comb is not None and "combined" not in cal.scores:
        cal.scores["combined"] = comb(cal.scores, leave_one_out=True)
        cal.thresholds["combined"] = conformal_threshold(cal.scores["combined"], cal.reject_rate)
    return cal


def novelty_record(stats: NoveltyStats | None, calibration: Calibration | None) -> dict[str, Any]:
    """What a checkpoint stores (its ``novelty`` entry): plain tensors and numbers."""
    import torch

    out: dict[str, Any] = {"scores": list(SCORES), "default": DEFAULT_SCORE}
    if stats is not None:
        out["stats"] = stats.to_dict()
    if calibration is not None:
        out["calibration"] = {"reject_rate": calibration.reject_rate, "n_cells": calibration.n,
                              "thresholds": {k: (v if math.isfinite(v) else "inf") for k, v in calibration.thresholds.items()},
                              "scores": {k: torch.from_numpy(v) for k, v in calibration.scores.items()}}
    return out


def read_novelty_record(record: Mapping[str, Any] | None) -> tuple[NoveltyStats | None, Calibration | None]:
    """The stats and calibration of a checkpoint's ``novelty`` entry (None where absent)."""
    if not record:
        return None, None
    stats = NoveltyStats.from_dict(record["stats"]) if record.get("stats") else None
    cal = None
    if record.get("calibration"):
        c = record["calibration"]
        scores = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)).astype(np.float64) for k, v in c["scores"].items()}
        thresholds = {k: math.inf if v == "inf" else float(v) for k, v in c["thresholds"].items()}
        cal = with_combined(Calibration(float(c["reject_rate"]), thresholds, scores))
        if stats is not None:
            stats.combination = ScoreCombination.of(cal.scores)
            stats.calibration = cal
    return stats, cal


def auroc(known: np.ndarray, novel: np.ndarray) -> float:
    """Probability that a novel cell scores above a known one (ties half)."""
    from sklearn.metrics import roc_auc_score

    if not len(known) or not len(novel):
        return float("nan")
    return float(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(novel))], np.r_[known, novel]))


def fpr_at_tpr(known: np.ndarray, novel: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of known cells rejected by the threshold that rejects ``tpr`` of the novel cells."""
    if not len(known) or not len(novel):
        return float("nan")
    cut = np.quantile(novel, 1.0 - tpr)
    return float((known >= cut).mean())
