"""Thresholds that reject a chosen share of known cells (split-conformal calibration), Fisher's
combination of conformal p-values (the ``combined`` scores), and the metrics novelty is judged by.

A threshold is set on cells of known types that did not train the model (validation cells): the
split-conformal quantile, so that at most ``reject_rate`` of new cells of known types score above it
(for exchangeable cells; Vovk et al. 2005, Angelopoulos & Bates 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model.novelty.scores import COMBINED_PARTS, CROSSFIT_COMBINED_PARTS, CROSSFIT_FEATURE_COMBINED_PARTS, CROSSFIT_SCORES

# each combined score: its parts, and whether their p-values go on falling beyond the calibration range
COMBINATIONS = {"combined": (COMBINED_PARTS, False), "crossfit_combined": (CROSSFIT_COMBINED_PARTS, True),
                "crossfit_feature_combined": (CROSSFIT_FEATURE_COMBINED_PARTS, True)}
CROSSFIT_COMBINED = tuple(name for name, (parts, _) in COMBINATIONS.items() if set(parts) & set(CROSSFIT_SCORES))  # with a cross-fitted part

MAX_CALIBRATION_CELLS = 10000  # validation scores kept, so that predict.py can use another reject rate


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
class ScoreCombination:
    """Fisher's combination of conformal p-values: a cell's p-value for a score is the share of the
    ``n`` calibration cells (known types, not trained on) scoring at least as high, (1 + count) /
    (n + 1); the combined score is -2 sum log p over the parts. A cell must be unusual on one part
    or somewhat unusual on both to score high; the parts need no common scale. ``combined`` joins
    :data:`COMBINED_PARTS`, chosen on the development set (RESULTS.md, "a combined score").

    ``tail``: beyond the largest calibration score a rank p-value stops falling (1 / (n + 1)), so
    however far out a cell is on one part it cannot count for more than that. With ``tail`` the
    p-value goes on falling there, ``exp(-(x - max) / beta) / (n + 1)``, ``beta`` the mean excess
    of the top ``TAIL_CELLS`` calibration scores over the next one (an exponential tail); and
    between calibration scores it runs linearly from the rank p-value just above one to that just
    above the next (less than one rank below the step's), so that it is continuous in the score: a
    rounding-size change of a part (another batch size) cannot jump a whole rank."""

    reference: dict[str, np.ndarray]  # part -> the calibration cells' scores, sorted
    tail: bool = False

    TAIL_CELLS = 20  # the largest calibration scores whose spread sets the tail's scale

    @classmethod
    def of(cls, scores: Mapping[str, np.ndarray], parts: Sequence[str] = COMBINED_PARTS, tail: bool = False) -> ScoreCombination | None:
        """From the calibration cells' ``scores`` (None when a part is missing)."""
        if not parts or any(p not in scores for p in parts) or not len(scores[parts[0]]):
            return None
        return cls({p: np.sort(np.asarray(scores[p], dtype=np.float64)) for p in parts}, tail)

    def _tail_scale(self, ref: np.ndarray) -> float:
        m = min(self.TAIL_CELLS, len(ref) - 1)
        if m < 1:
            return math.inf
        beta = float(np.mean(ref[-m:] - ref[-m - 1]))
        return beta if beta > 0 else math.inf

    def pvalues(self, part: str, x: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
        """Per cell, (1 + calibration cells scoring >= x) / (n + 1); ``leave_one_out``: for the
        calibration cells themselves, each left out of its own reference."""
        ref = self.reference[part]
        x = np.asarray(x, dtype=np.float64)
        at_least = len(ref) - np.searchsorted(ref, x, side="left")
        if leave_one_out:
            return at_least / len(ref)  # the cell counts itself once: (1 + (count - 1)) / ((n - 1) + 1)
        if not self.tail or not len(ref):
            return (1.0 + at_least) / (len(ref) + 1.0)
        n = len(ref)
        grid = (n - np.arange(n)) / (n + 1.0)  # the rank p-value just above each calibration score (no ties)
        p = np.interp(x, ref, grid)  # below the smallest: n / (n + 1); above the largest: replaced just below
        beyond = x > ref[-1]
        p[beyond] = grid[-1] * np.exp(-(x[beyond] - ref[-1]) / self._tail_scale(ref))
        return p

    def __call__(self, scores: Mapping[str, np.ndarray], leave_one_out: bool = False) -> np.ndarray:
        return -2.0 * sum(np.log(self.pvalues(p, scores[p], leave_one_out)) for p in self.reference)


@dataclass
class Calibration:
    """Thresholds of each score, set on ``n`` calibration cells for ``reject_rate``, and the
    calibration scores themselves (for another rate later, and for the combined scores)."""

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

    @property
    def combination(self) -> ScoreCombination | None:
        """The ``combined`` score's reference: these cells' scores of its parts (None without them)."""
        return self.combination_of("combined")

    def combination_of(self, name: str) -> ScoreCombination | None:
        """The reference of the combined score ``name`` (a key of :data:`COMBINATIONS`; None without its parts)."""
        parts, tail = COMBINATIONS[name]
        return ScoreCombination.of(self.scores, parts, tail)

    def with_combined(self) -> Calibration:
        """Itself with each combined score of :data:`COMBINATIONS` of its cells (each against the
        others) and its threshold, when it has the parts' scores."""
        for name in COMBINATIONS:
            comb = self.combination_of(name)
            if comb is not None and name not in self.scores:
                self.scores[name] = comb(self.scores, leave_one_out=True)
                self.thresholds[name] = conformal_threshold(self.scores[name], self.reject_rate)
        return self

    def to_dict(self) -> dict[str, object]:
        import torch

        return {"reject_rate": self.reject_rate, "n_cells": self.n,
                "thresholds": {k: (v if math.isfinite(v) else "inf") for k, v in self.thresholds.items()},
                "scores": {k: torch.from_numpy(v) for k, v in self.scores.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Calibration:
        scores = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)).astype(np.float64) for k, v in d["scores"].items()}
        thresholds = {k: math.inf if v == "inf" else float(v) for k, v in d["thresholds"].items()}
        return cls(float(d["reject_rate"]), thresholds, scores)


def calibrate(scores: Mapping[str, np.ndarray], reject_rate: float = 0.05, seed: int = 0,
              max_cells: int = MAX_CALIBRATION_CELLS) -> Calibration:
    """Thresholds for ``reject_rate`` from the scores of calibration cells (known types, not
    trained on), with the ``combined`` score's."""
    kept = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items() if k not in COMBINATIONS}
    n = len(next(iter(kept.values())))
    if n > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
        kept = {k: v[rows] for k, v in kept.items()}
    return Calibration(reject_rate, {k: conformal_threshold(v, reject_rate) for k, v in kept.items()}, kept).with_combined()


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


def aupr(known: np.ndarray, novel: np.ndarray) -> float:
    """Average precision of the novel class (novel cells the positives, ranked by score): the area
    under its precision-recall curve, which, unlike AUROC, depends on how few the novel cells are."""
    from sklearn.metrics import average_precision_score

    if not len(known) or not len(novel):
        return float("nan")
    return float(average_precision_score(np.r_[np.zeros(len(known)), np.ones(len(novel))], np.r_[known, novel]))
