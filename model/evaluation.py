"""Scoring predictions against known labels, and the readable lines that report them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.labels import DROP_LABEL, as_label_map
from model.novelty.rule import UNASSIGNED

log = logging.getLogger("scbert")



def macro_f1(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> float:
    """Macro-F1 over the labels present in ``y_true`` (a predicted label no cell has costs only
    through recall); also what chooses a fine-tuning epoch with ``select_metric="macro_f1"``."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=sorted(set(np.asarray(y_true).tolist())), average="macro", zero_division=0))


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 and the per-class report of scikit-learn. ``macro_f1`` averages over the
    true labels (a predicted label no cell has, Unassigned included, costs only through recall);
    ``macro_f1_union`` over the true and the predicted labels (such a label counts with F1 0)."""
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    labels = sorted(set(y_true)) if classes is None else list(classes)
    return {
        "n_cells": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred),
        "macro_f1_union": float(f1_score(y_true, y_pred, labels=sorted(set(y_true) | set(y_pred)), average="macro", zero_division=0)),
        "per_class": classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0),
    }


def known_truth(truth: pd.Series | np.ndarray | Sequence[Any] | None, n_cells: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask of the cells with a known label, those labels as text); labels None when there are none."""
    if truth is None:
        return np.zeros(n_cells, dtype=bool), None
    col = truth if isinstance(truth, pd.Series) else pd.Series(list(truth))
    ok = col.notna().to_numpy()
    if not ok.any():
        return ok, None
    return ok, col[ok].astype(str).to_numpy()


def log_report_line(line: str) -> None:
    """Log one line of a run's report: a line starting ``WARNING: `` (e.g. far more cells Unassigned
    than calibrated) as a warning, which ``--quiet`` still shows; the others as information."""
    (log.warning if line.startswith("WARNING: ") else log.info)(line)


def _some(names: Sequence[str], n: int = 4) -> str:
    """The first ``n`` names, quoted, and how many more."""
    shown = ", ".join(repr(str(x)) for x in list(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def class_map(label_map: Mapping[str, str] | str | Path | None, classes: Sequence[str]) -> dict[str, str] | None:
    """The part of ``label_map`` that renames the model's own ``classes`` (a map onto names shared by
    both sides, such as coarse types: PBMC3k's naive and memory CD4 T both -> T_CD4), or None when it
    renames none of them. A class mapped to ``-`` keeps its name (its cells are predictions, not
    cells to leave out)."""
    mapping = as_label_map(label_map)
    if mapping is None:
        return None
    renamed = {c: mapping[c] for c in map(str, classes) if c in mapping and mapping[c] not in (c, DROP_LABEL)}
    return renamed or None


def scored_predictions(labels: np.ndarray, classes: Sequence[str], label_map: Mapping[str, str] | str | Path | None
                       ) -> tuple[np.ndarray, list[str]]:
    """The predicted labels and classes in the names the known labels are scored in: renamed through
    :func:`class_map` when the map renames the model's classes, else as they are."""
    renamed = class_map(label_map, classes)
    if renamed is None:
        return np.asarray(labels).astype(str), list(classes)
    pred = np.array([renamed.get(x, x) for x in np.asarray(labels).astype(str)], dtype=object).astype(str)
    return pred, sorted({renamed.get(c, c) for c in map(str, classes)})


def label_map_report(truth: pd.Series, mapped: pd.Series, classes: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """What a label map did to the query's labels ``truth`` (``mapped``: after it): the labels
    renamed, the cells left out, and mapped labels that are none of the model's ``classes``."""
    before, after = truth.astype(object), mapped.astype(object)
    known, kept = before.notna().to_numpy(), after.notna().to_numpy()
    renamed = sorted({(str(b), str(a)) for b, a in zip(before[known & kept], after[known & kept]) if str(b) != str(a)})
    dropped = int((known & ~kept).sum())
    foreign = sorted({str(a) for a in after.dropna()} - set(map(str, classes)))
    metrics: dict[str, Any] = {"renamed": dict(renamed), "cells_left_out": dropped, "not_model_classes": foreign}
    lines = [f"label map: {len(renamed)} query labels renamed ({', '.join(f'{b} -> {a}' for b, a in renamed[:4])}"
             f"{', ...' if len(renamed) > 4 else ''}); {dropped} cells left out (mapped to -)"]
    if foreign:
        lines.append(f"note: after the label map, {len(foreign)} query labels are none of the model's classes ({_some(foreign)}): "
                     f"their cells count as errors")
    return metrics, lines


def annotation_report(pred: np.ndarray, conf: np.ndarray, classes: Sequence[str], threshold: float | None,
                      truth: pd.Series | np.ndarray | None = None, truth_name: str = "the label column",
                      rule: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Metrics and readable lines about an annotation: counts per predicted type, mean confidence,
    and with ``truth`` accuracy and macro-F1 on the labelled cells (Unassigned counts as wrong).
    ``rule``: how cells became Unassigned, in words (default: confidence below ``threshold``)."""
    pred = np.asarray(pred).astype(str)
    conf = np.asarray(conf, dtype=float)
    n_un = int((pred == UNASSIGNED).sum())
    types = sorted(set(pred), key=lambda t: (t == UNASSIGNED, t))
    metrics: dict[str, Any] = {
        "n_cells": int(len(pred)), "n_unassigned": n_un, "threshold": None if threshold is None else float(threshold),
        "predicted_counts": {t: int((pred == t).sum()) for t in types},
        "mean_confidence": {t: float(conf[pred == t].mean()) for t in types},
    }
    if rule is None:
        rule = "never Unassigned" if threshold is None else f"confidence < {threshold:.2f}"
    lines = [f"{len(pred)} cells annotated, {n_un} Unassigned ({rule}); "
             + ", ".join(f"{t} {c}" for t, c in metrics["predicted_counts"].items())]
    if truth is None:
        return metrics, lines
    ok, labels = known_truth(truth, len(pred))
    if labels is None:
        log.warning("WARNING: no cell has a label in %s: accuracy is not computed", truth_name)
        return metrics, lines
    if not set(labels) & set(classes):
        # Another lab's names for the same types: an accuracy of 0 would only say the names differ.
        query_types = sorted(set(labels))
        metrics.update(n_labelled=int(ok.sum()), label_overlap=0, query_types=query_types)
        lines.append(f"accuracy not computed: none of the {len(query_types)} labels of {truth_name} ({_some(query_types)}) is one of "
                     f"the model's classes ({_some(classes)}); give a label map (two columns: query label, model class) to score them "
                     f"(predict.py --label-map FILE; label_map= in Python)")
        return metrics, lines
    m = classification_metrics(labels, pred[ok])
    metrics.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"], macro_f1_union=m["macro_f1_union"], n_labelled=int(ok.sum()),
                   per_class=m["per_class"])
    lines.append(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  on {int(ok.sum())} labelled cells "
                 f"(Unassigned counts as wrong; {n_un} Unassigned)")
    lines.append(f"macro-F1 over the true types {m['macro_f1']:.4f}; over the true and predicted types (Unassigned and types "
                 f"absent from the query count as 0) {m['macro_f1_union']:.4f}")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        metrics["unknown_types"] = unknown
        lines.append(f"note: the query has cell types the model was not trained on: {unknown}")
    return metrics, lines
