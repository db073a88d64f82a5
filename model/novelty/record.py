"""What a fine-tuned checkpoint keeps for its novelty scores, as one object: the class statistics of
the classifier's features, the expression PCA, the query-density reference, the calibration of
every score on validation cells, and the measured bf16 error (:class:`NoveltyRecord`); and
:func:`novelty_scores`, every per-cell score that a record and one prediction pass allow."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.novelty.calibration import COMBINATIONS, Calibration
from model.novelty.crossfit import CrossFitPCA
from model.novelty.expression import ExpressionPCA
from model.novelty.query import QueryDensity
from model.novelty.scores import (
    CROSSFIT_SCORES,
    DEFAULT_SCORE,
    PCA_SCORES,
    QUERY_COMBINED_PARTS,
    ClassStatistics,
    energy_score,
    softmax_score,
)


@dataclass
class NoveltyRecord:
    """A checkpoint's ``novelty`` entry. Each part may be missing (None) when the model could not
    fit it; :meth:`to_dict` / :meth:`from_dict` read and write the current format (older ones are
    upgraded on load by :mod:`model.checkpoint.upgrade`)."""

    default: str = DEFAULT_SCORE  # the score predict.py uses with --novelty auto
    classes: ClassStatistics | None = None  # of the head's penultimate features and the cell embeddings
    pca: ExpressionPCA | None = None  # the pca_* scores
    crossfit: CrossFitPCA | None = None  # the crossfit_* scores (None: a model fine-tuned before they existed)
    density: QueryDensity | None = None  # the query_* scores (with the calibration cells projected)
    calibration: Calibration | None = None  # thresholds and the validation cells' scores
    precision_error: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> model.recheck.measure_precision_error

    @classmethod
    def fit(cls, features: np.ndarray, expression: Any, labels: np.ndarray, n_classes: int, seed: int = 0,
            density: bool = True) -> NoveltyRecord:
        """The statistics of training cells (no calibration yet): of the classifier's ``features`` (the
        knn reference too), of their ``expression`` (the model's input matrix: the PCA, its cross-fitted
        halves and, with ``density``, the query-density reference), class ids ``labels``."""
        return cls(classes=ClassStatistics.fit(features, None, labels, n_classes, seed),
                   pca=ExpressionPCA.fit(expression, labels, n_classes, seed), crossfit=CrossFitPCA.fit(expression, labels, n_classes, seed),
                   density=QueryDensity.fit(expression, seed) if density else None)

    @property
    def query_ready(self) -> bool:
        """Whether the query_* scores can be calibrated: a density reference whose calibration cells
        are those of the calibration."""
        return (self.density is not None and self.density.calibrations is not None and self.calibration is not None
                and len(self.density.calibrations[0]) == self.calibration.n)

    def can_score(self, score: str) -> bool:
        """Whether this record has what ``score`` needs (softmax and energy need nothing)."""
        if score in ("softmax", "energy"):
            return True
        if score in ("mahalanobis", "knn"):
            return self.classes is not None
        if score in PCA_SCORES:
            return self.pca is not None
        if score in CROSSFIT_SCORES:
            return self.crossfit is not None
        if score in COMBINATIONS:  # what each part needs, and the calibration its parts' scores
            ready = all(self.can_score(part) for part in COMBINATIONS[score][0])
            return ready and self.calibration is not None and self.calibration.combination_of(score) is not None
        if score == "query_density":
            return self.query_ready
        return self.query_ready and self.pca is not None and QUERY_COMBINED_PARTS[0] in self.calibration.scores

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers, as a checkpoint stores them."""
        return {"default": self.default,
                "class_statistics": None if self.classes is None else self.classes.to_dict(),
                "expression_pca": None if self.pca is None else self.pca.to_dict(),
                "crossfit_pca": None if self.crossfit is None else self.crossfit.to_dict(),
                "query_density": None if self.density is None else self.density.to_dict(),
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
                "precision_error": dict(self.precision_error)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NoveltyRecord:
        return cls(default=d["default"],
                   classes=None if d["class_statistics"] is None else ClassStatistics.from_dict(d["class_statistics"]),
                   pca=None if d["expression_pca"] is None else ExpressionPCA.from_dict(d["expression_pca"]),
                   crossfit=None if d.get("crossfit_pca") is None else CrossFitPCA.from_dict(d["crossfit_pca"]),
                   density=None if d["query_density"] is None else QueryDensity.from_dict(d["query_density"]),
                   calibration=None if d["calibration"] is None else Calibration.from_dict(d["calibration"]).with_combined(),
                   precision_error=dict(d["precision_error"]))


def output_scores(out: dict[str, np.ndarray], record: NoveltyRecord | None, which: Collection[str] | None = None,
                  expression: Any = None) -> dict[str, np.ndarray]:
    """:func:`novelty_scores` of a classifier's outputs (``model.inference.predict_outputs``): of the
    first head's probabilities and logits when the model is an ensemble of heads (the first head's
    stopping split calibrates the thresholds; the others trained on some of those cells)."""
    return novelty_scores(out.get("head_probs", out["probs"]), out.get("head_logits", out["logits"]), out.get("features"),
                          out.get("embedding"), record, which=which, expression=expression)


def novelty_scores(probs: np.ndarray, logits: np.ndarray, features: np.ndarray | None = None, embeddings: np.ndarray | None = None,
                   record: NoveltyRecord | None = None, which: Collection[str] | None = None,
                   expression: Any = None) -> dict[str, np.ndarray]:
    """Every per-cell score that the inputs allow (or those of them in ``which``): ``softmax`` and
    ``energy`` always; with a ``record``, ``mahalanobis`` (the features) and ``knn`` (the features
    or the embeddings, as the record's ``knn_input`` says), ``pca_*`` (the cells' ``expression``, the model's input matrix) and ``combined``
    (its parts' scores against the calibration)."""
    cal = None if record is None else record.calibration
    combinations = {} if cal is None else {n: c for n in COMBINATIONS if (c := cal.combination_of(n)) is not None}
    if which is not None:
        which = {*which, *(p for n, c in combinations.items() if n in which for p in c.reference)}

    def want(name: str) -> bool:
        return which is None or name in which

    out = {name: f(x) for name, f, x in (("softmax", softmax_score, probs), ("energy", energy_score, logits)) if want(name)}
    stats = None if record is None else record.classes
    if stats is not None and features is not None and want("mahalanobis"):
        out["mahalanobis"] = stats.mahalanobis(features)
    knn_input = None if stats is None else (features if stats.knn_input == "features" else embeddings)
    if knn_input is not None and want("knn"):
        out["knn"] = stats.knn(knn_input)
    if record is not None and record.pca is not None and expression is not None:
        out.update(record.pca.scores(expression, which))
    if record is not None and record.crossfit is not None and expression is not None:
        out.update(record.crossfit.scores(expression, which))
    for name, comb in combinations.items():
        if want(name) and all(p in out for p in comb.reference):
            out[name] = comb(out)
    return out
