"""The float32 re-check after a bf16/fp16 pass: how much the low precision moves a model's outputs
(measured on validation cells at the end of fine-tuning and stored in the checkpoint), the margin
that follows from it, and which cells are close enough to a decision to be scored again.

A cell is re-checked when its top-two probability gap is below the margin, or its novelty score is
within the margin of the cutoff (relative to the cutoff for the unbounded scores; absolute for
softmax, a probability). The margin is "auto" by default: RECHECK_SAFETY times the largest change
measured at fine-tuning, at least RECHECK_FLOOR; RECHECK_MARGIN for checkpoints without the
measurement (BENCHMARKS.md, "bf16 and the float32 head").
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from data.dataset import CellDataset
from data.io import InputError
from model.inference import InferenceOptions, predict_outputs
from model.nn.config import ExecutionOptions
from model.nn.network import ScBERT
from model.novelty.record import NoveltyRecord, output_scores
from model.novelty.rule import NoveltyRule
from model.novelty.scores import EXPRESSION_SCORES, NETWORK_SCORES, softmax_score

log = logging.getLogger("scbert")

RECHECK_MARGIN = 0.05
RECHECK_SAFETY = 4.0
RECHECK_FLOOR = 0.005
PRECISION_CHECK_CELLS = 128  # validation cells on which fine-tuning measures the bf16 error


def rechecks(options: ExecutionOptions, margin: float | None) -> bool:
    """Whether annotation re-checks in float32: after a bf16/fp16 pass, with a margin above 0."""
    return options.precision != "fp32" and bool(margin)


def measure_precision_error(net: ScBERT, ds: CellDataset, record: NoveltyRecord | None, thresholds: dict[str, float],
                            options: InferenceOptions, precision: str = "bf16") -> dict[str, Any]:
    """How much running ``net`` in ``precision`` (with the inference defaults) instead of float32 moves
    its outputs on the cells ``ds``: the largest change of a class probability (``probs``) and of
    each network-computed novelty score relative to its calibrated threshold (``scores``), measured
    with the classifier head in float32 (``head``). What :func:`auto_recheck_margin` turns into the
    re-check margin; fine-tuning stores it in the checkpoint."""

    def run(p: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        kept = net.options
        net.configure(ExecutionOptions(precision=p))
        try:
            out = predict_outputs(net, ds, options, embed=True, features=record is not None and record.classes is not None)
        finally:
            net.configure(kept)
        return out, output_scores(out, record, which=NETWORK_SCORES)

    ref, ref_scores = run("fp32")
    low, low_scores = run(precision)
    errors = {}
    for name, v in ref_scores.items():
        t = thresholds.get(name)
        if t is not None and np.isfinite(t) and t != 0:
            errors[name] = float(np.max(np.abs(low_scores[name].astype(np.float64) - v)) / abs(t)) if len(v) else 0.0
    probs = float(np.max(np.abs(low["probs"].astype(np.float64) - ref["probs"]))) if len(ds) else 0.0
    return {"precision": precision, "n_cells": len(ds), "device": options.torch_device.type, "probs": probs, "scores": errors,
            "head": "float32"}


def auto_recheck_margin(error: dict[str, Any] | None, rule: NoveltyRule) -> float:
    """The re-check margin for a measured ``error`` (:func:`measure_precision_error`) and ``rule``:
    RECHECK_SAFETY times the most the precision moved the top-two gap (twice a probability's change)
    or the rule's score (relative to its threshold), at least RECHECK_FLOOR; RECHECK_MARGIN without a
    measurement, or when the rule's score was not measured."""
    if not error:
        return RECHECK_MARGIN
    worst = 2.0 * float(error["probs"])
    if rule.cutoff is not None and rule.score not in ("softmax", *EXPRESSION_SCORES):
        if rule.score not in error.get("scores", {}):
            return RECHECK_MARGIN
        worst = max(worst, float(error["scores"][rule.score]))
    return max(RECHECK_FLOOR, RECHECK_SAFETY * worst)


def resolve_recheck_margin(margin: float | str | None, record: NoveltyRecord | None, execution: ExecutionOptions,
                           rule: NoveltyRule) -> float | None:
    """The float32 re-check margin to use: ``margin`` as given (None or 0: off), or for ``"auto"``
    the one the model's measured error of this precision gives (:func:`auto_recheck_margin`;
    RECHECK_MARGIN for models without the measurement). None under fp32."""
    precision = execution.precision
    if precision == "fp32":
        return None
    if margin != "auto":
        if isinstance(margin, str):
            raise InputError(f"the float32 re-check margin must be a number between 0 and 1 or 'auto', got {margin!r}")
        return margin
    error = None if record is None else record.precision_error.get(precision)
    value = auto_recheck_margin(error, rule)
    if error:
        log.info("float32 re-check margin %.4f: %g x the largest %s change measured on %d validation cells at fine-tuning",
                 value, RECHECK_SAFETY, precision, error["n_cells"])
        if error["head"] != "float32" and value > RECHECK_FLOOR:
            log.info("(measured when the classifier head still ran in %s, which made most of that change: the margin is cautious, "
                     "and more cells are re-checked than needed; a model fine-tuned again measures a smaller one)", precision)
    else:
        log.info("float32 re-check margin %.2f (the checkpoint did not measure its %s error at fine-tuning)", value, precision)
    return value


def near_decision(probs: np.ndarray, rule: NoveltyRule | None, score: np.ndarray | None, margin: float = RECHECK_MARGIN) -> np.ndarray:
    """Cells whose label could flip under rounding: top-two probability gap below ``margin``, or a
    novelty ``score`` (the rule's; None: 1 - top probability) within ``margin`` of the rule's cutoff
    (``margin * |cutoff|`` for scores that are not probabilities). The ``pca_*`` and ``query_*``
    scores come from the input expression, not the network, so the precision cannot move them: no
    band around their cutoff."""
    if probs.shape[1] > 1:
        top2 = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
        near = (top2[:, 1] - top2[:, 0]) < margin
    else:
        near = np.zeros(len(probs), dtype=bool)
    cutoff = None if rule is None or rule.score in EXPRESSION_SCORES else rule.cutoff
    if cutoff is not None and np.isfinite(cutoff):
        if score is None or rule.score == "softmax":
            score, band = softmax_score(probs), margin
        else:
            band = margin * max(abs(cutoff), 1e-12)
        near |= np.abs(np.asarray(score, dtype=np.float64) - cutoff) < band
    return near


def rescore_in_float32(net: ScBERT, rows: np.ndarray, run: Any) -> Any:
    """``run()`` with ``net`` switched to float32 for the duration (the cells ``rows`` were near a
    decision after the low-precision pass), restoring its options after."""
    if not len(rows):
        return None
    low_options = net.options
    net.configure(low_options.replace(precision="fp32"))
    try:
        return run()
    finally:
        net.configure(low_options)

