"""When a cell is ``Unassigned``: the rule (a score and its cutoff), how it is chosen from what a
checkpoint stores and what the user asks (:func:`choose_rule`), how a ``query_*`` rule gets its
cutoff once the query is scored (:func:`query_rule`), and :func:`assign_labels`, the one place
where cells become Unassigned."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from data.io import InputError
from model.novelty.calibration import CROSSFIT_COMBINED, conformal_threshold
from model.novelty.query import MIN_QUERY_CELLS, QUERY_SHIFT_SHARE, query_scores, query_shift, query_warnings
from model.novelty.record import NoveltyRecord
from model.novelty.scores import CROSSFIT_SCORES, QUERY_SCORES, SCORES, softmax_score

log = logging.getLogger("scbert")

UNASSIGNED = "Unassigned"  # the label of cells the rule rejects
FALLBACK_SCORES = ("pca_mahalanobis", "mahalanobis", "softmax")  # --novelty auto when the default is not calibrated, in order


@dataclass(frozen=True)
class NoveltySettings:
    """What the user asks of the Unassigned rule: the ``score`` (a name of :data:`SCORES`, or
    ``"auto"``: the model's default with a calibrated threshold, ``softmax`` with a number), the
    ``threshold`` (``"auto"``: calibrated at fine-tuning; a number; None: never Unassigned) and,
    with ``"auto"``, the ``reject_rate`` to recalibrate for (None: the model's)."""

    score: str = "auto"
    threshold: float | str | None = "auto"
    reject_rate: float | None = None


DEFAULT_NOVELTY = NoveltySettings()


@dataclass(frozen=True)
class NoveltyRule:
    """When a cell is ``Unassigned``: when its novelty ``score`` is above ``cutoff`` (None: never).
    ``reject_rate``: the rate the cutoff was calibrated for (None: set by hand). The published rule
    is ``NoveltyRule.published(0.5)``: top probability below 0.5."""

    score: str = "softmax"
    cutoff: float | None = 0.5
    reject_rate: float | None = None

    @classmethod
    def published(cls, threshold: float | None = 0.5) -> NoveltyRule:
        """Unassigned when the top class probability is below ``threshold`` (None: never)."""
        return cls("softmax", None if threshold is None else 1.0 - float(threshold))

    @property
    def threshold(self) -> float | None:
        """The cutoff in the score's own terms: for ``softmax`` the top probability below which a cell
        is Unassigned, for the others the score above which it is."""
        if self.cutoff is None:
            return None
        return 1.0 - self.cutoff if self.score == "softmax" else self.cutoff

    def describe(self) -> str:
        if self.cutoff is None:
            return "never Unassigned"
        if self.score == "softmax":
            how = f"confidence < {self.threshold:.2f}"
        else:
            how = f"{self.score} novelty > {self.cutoff:.4g}"
        return how + (f", calibrated to reject {self.reject_rate:.0%} of known cells" if self.reject_rate is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "threshold": self.threshold, "cutoff": self.cutoff, "reject_rate": self.reject_rate,
                "calibrated": self.reject_rate is not None}


PUBLISHED_RULE = NoveltyRule.published(0.5)


def assign_labels(probs: np.ndarray, classes: Sequence[str], rule: NoveltyRule | None = PUBLISHED_RULE,
                  novelty: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, top labels, confidence) of each cell: the top class, or ``Unassigned`` when its
    novelty score is above the rule's cutoff. ``novelty``: the rule's score per cell (default, and
    always for ``softmax``: 1 - the top probability)."""
    classes = np.asarray(classes, dtype=object)
    conf = probs.max(axis=1)
    top = classes[probs.argmax(axis=1)].astype(str)
    labels = top
    if rule is not None and rule.cutoff is not None:
        if novelty is None or rule.score == "softmax":
            novelty = softmax_score(probs)
        labels = np.where(novelty > rule.cutoff, UNASSIGNED, top)
    return labels.astype(str), top, conf


def choose_rule(record: NoveltyRecord | None, settings: NoveltySettings = DEFAULT_NOVELTY, model_name: str = "the model",
                whole_query: bool = True) -> NoveltyRule:
    """The rule that makes cells Unassigned, for a model whose novelty record is ``record`` (None:
    it has none, and only the published rule works with ``"auto"``).

    The ``query_*`` scores compare the whole query with the training cells: their calibrated cutoff
    is set once the query is scored (:func:`query_rule`; until then the rule's cutoff is None).
    ``whole_query=False`` (a query annotated a chunk at a time): the default falls back to
    ``pca_mahalanobis``, and asking for a ``query_*`` score is an error."""
    novelty, threshold = settings.score, settings.threshold
    if novelty != "auto" and novelty not in SCORES:
        raise InputError(f"--novelty must be auto or one of {SCORES}, got {novelty!r}")
    if novelty in QUERY_SCORES and not whole_query:
        raise InputError(f"--novelty {novelty} compares the whole query with the training cells, and this query is annotated a chunk "
                         f"at a time (--backed, or under torchrun): read it whole, or choose --novelty pca_mahalanobis")
    if threshold is None:
        return NoveltyRule(novelty if novelty != "auto" else "softmax", None)
    if threshold == "auto":
        return _calibrated_rule(record, novelty, settings.reject_rate, model_name, whole_query)
    t = float(threshold)
    score = "softmax" if novelty == "auto" else novelty
    if score == "softmax":
        if not 0.0 <= t <= 1.0:
            raise InputError(f"a softmax threshold is a probability between 0 and 1, got {t}")
        return NoveltyRule.published(t)
    if score != "energy" and (record is None or not record.can_score(score)):
        raise InputError(f"--novelty {score} needs the training statistics and calibration that fine-tuning now stores: fine-tune the "
                         f"model again, or use --novelty softmax or energy")
    return NoveltyRule(score, t)


def _calibrated_rule(record: NoveltyRecord | None, novelty: str, reject_rate: float | None, model_name: str,
                     whole_query: bool) -> NoveltyRule:
    """:func:`choose_rule` with ``threshold="auto"``: the cutoff calibrated at fine-tuning."""
    cal = None if record is None else record.calibration
    if cal is None:
        log.info("%s has no novelty calibration: using the published rule, Unassigned when the top probability is below 0.5", model_name)
        if novelty not in ("auto", "softmax"):
            raise InputError(f"--novelty {novelty} needs the calibration that fine-tuning now stores: give a --threshold, or "
                             f"fine-tune the model again")
        return PUBLISHED_RULE
    score = record.default if novelty == "auto" else novelty
    rate = cal.reject_rate if reject_rate is None else reject_rate
    if score in QUERY_SCORES:
        usable = record.can_score(score)
        if usable and whole_query:
            return NoveltyRule(score, None, rate)  # the cutoff: query_rule, once the query is scored
        if novelty != "auto":
            raise InputError(f"--novelty {score}: {model_name} has no statistics for that score: choose one of "
                             f"{sorted(cal.thresholds)}, or fine-tune the model again")
        log.info("novelty score %s: %s; using pca_mahalanobis", score,
                 "the query is annotated a chunk at a time" if usable else "the model has no statistics for it")
        score = "pca_mahalanobis"
    if novelty == "auto" and (score not in cal.thresholds or not record.can_score(score)):
        fallback = next(s for s in FALLBACK_SCORES if s in cal.thresholds and record.can_score(s))
        log.info("%s has no statistics for the novelty score %s (fine-tuned before it existed, or on too few cells): using %s; "
                 "fine-tune again for it", model_name, score, fallback)
        score = fallback
    elif novelty != "auto" and score in (*CROSSFIT_SCORES, *CROSSFIT_COMBINED) and not record.can_score(score):
        # an explicit request is not swapped for another score behind the user's back
        usable = sorted(s for s in cal.thresholds if record.can_score(s))
        raise InputError(f"--novelty {score}: {model_name} was fine-tuned before the cross-fitted statistics existed: choose one of "
                         f"{usable} (pca_mahalanobis is the closest, but rejects more of the model's own training cells), or "
                         f"fine-tune the model again")
    if score not in cal.thresholds:
        raise InputError(f"--novelty {score}: {model_name} has no calibration for that score (it has "
                         f"{sorted(cal.thresholds)}): choose one of those, or fine-tune the model again")
    return NoveltyRule(score, cal.threshold(score, rate), rate)


def query_rule(rule: NoveltyRule, record: NoveltyRecord | None, expression: Any, scores: dict[str, np.ndarray],
               fall_back: bool = False) -> NoveltyRule:
    """For a rule on a ``query_*`` score: that score of the query cells (``expression``, the model's
    input matrix; added to ``scores``, which must hold the other scores of the cells) and, for a
    calibrated rule, its cutoff: the conformal threshold of the calibration cells scored in the same
    neighbour graph. When the query as a whole differs from the training cells (:func:`query_shift`
    above ``QUERY_SHIFT_SHARE``: another batch, technology or tissue), the score would reject most
    known cells: with ``fall_back`` (the default rule) a calibrated rule becomes ``pca_mahalanobis``
    at the same reject rate, else a warning says so. Other rules are returned as they are."""
    if rule.score not in QUERY_SCORES:
        return rule
    if record is None or not record.query_ready:
        raise InputError(f"--novelty {rule.score} needs the statistics that fine-tuning now stores: fine-tune the model again, or "
                         f"use --novelty pca_mahalanobis")
    log.warning("novelty score %s compares the whole query with the training cells: a cell's label depends on the other cells "
                "in the file, and the threshold assumes a query from the training data's batch and of a size like the "
                "calibration's; --novelty auto is per cell", rule.score)
    for line in query_warnings(record.density, expression, rule.score):
        log.warning("novelty: %s", line)
    n = expression.shape[0]
    if n < MIN_QUERY_CELLS:
        log.warning("%s compares the query's density with the training cells': with %d cells (< %d) a type missing from training "
                    "can hardly make a dense region, so few novel cells will be found; annotate more cells at once, or use "
                    "--novelty pca_mahalanobis", rule.score, n, MIN_QUERY_CELLS)
    q, c = query_scores(record.density, expression, scores, record.calibration.scores)
    scores.update(q)
    shift = query_shift(q["query_density"], c["query_density"])
    if shift > QUERY_SHIFT_SHARE:
        why = (f"{shift:.0%} of the query cells are denser around them than the median validation cell (about 50-65% when the "
               f"query comes from the training data's batch): the query as a whole differs from the training cells (another "
               f"batch, technology or tissue), and {rule.score} cannot tell a novel type from that")
        if fall_back and rule.reject_rate is not None:
            log.info("novelty: %s; using pca_mahalanobis instead", why)
            return NoveltyRule("pca_mahalanobis", record.calibration.threshold("pca_mahalanobis", rule.reject_rate), rule.reject_rate)
        log.warning("novelty: %s: most cells will be Unassigned; --novelty pca_mahalanobis does not depend on the query as a whole", why)
    if rule.reject_rate is None or rule.cutoff is not None:
        return rule
    return replace(rule, cutoff=conformal_threshold(c[rule.score], rule.reject_rate))


ALERT_P = 1e-3  # a binomial p-value below this (and twice the rate or more) says the share is far above the calibrated rate


def rejection_report(labels: np.ndarray, rule: NoveltyRule) -> tuple[dict[str, Any], list[str]]:
    """The Unassigned share of a run against the rate the rule was calibrated for: metrics and
    report lines (none for a rule set by hand). When the share is far above that rate (a one-sided
    binomial test, ``ALERT_P``), one more line gives the likely causes and what to try."""
    if rule.reject_rate is None or rule.cutoff is None or not len(labels):
        return {}, []
    from scipy.stats import binomtest

    n, k = len(labels), int((np.asarray(labels) == UNASSIGNED).sum())
    p = float(binomtest(k, n, rule.reject_rate, alternative="greater").pvalue)
    metrics = {"unassigned_share": k / n, "calibrated_reject_rate": rule.reject_rate, "unassigned_binomial_p": p}
    lines = [f"{k} of {n} cells Unassigned ({k / n:.1%}), calibrated to reject {rule.reject_rate:.0%} of known cells"]
    if p < ALERT_P and k / n >= 2 * rule.reject_rate:
        metrics["unassigned_alert"] = True
        lines.append(f"WARNING: {k / n:.0%} Unassigned is far above the calibrated {rule.reject_rate:.0%} (binomial p = {p:.1g}): "
                     f"either the query holds cell types the model was not trained on (Unassigned cells gathered in a few "
                     f"clusters), or it differs from the training data as a whole (another batch, technology or tissue: "
                     f"Unassigned cells spread over every type); look at where they fall on a UMAP, and for a batch "
                     f"shift integrate the data or fine-tune on data from this batch (--novel-type false keeps every top label)")
    return metrics, lines
