"""Scoring the accuracy benchmark's runs and reporting them: metrics per run, mean ± sd per method,
tables, per-class F1, confusion matrices, results.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from data.io import write_text
from data.labels import read_label_map  # noqa: F401 - the library's reader, imported here by older callers
from model.evaluation import classification_metrics
from model.novelty.rule import UNASSIGNED, NoveltyRule, assign_labels
from model.plots import plot_confusion
from scripts.benchmark.protocols import Split


def evaluate(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], threshold: float | None = None) -> dict[str, Any]:
    """Metrics of one run. Predictions are the top-scoring class. Test cells whose type the method
    never saw are *novel*: with ``threshold`` (novel protocol), cells scoring below it are
    ``Unassigned``, and the report adds the known-type accuracy (Unassigned counts as wrong), the
    fraction of novel cells left Unassigned and the AUROC of the top score for known vs novel.
    Accuracy and macro-F1 are computed on the known cells."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(str)
    pred, _, conf = assign_labels(probs, classes, None if threshold is None else NoveltyRule.published(threshold))
    known = np.isin(y_true, np.asarray(classes, dtype=str))
    m = classification_metrics(y_true[known], pred[known]) if known.any() else {"n_cells": 0, "accuracy": float("nan"), "macro_f1": float("nan"), "macro_f1_union": float("nan"), "per_class": {}}
    m["n_unseen_type"] = int((~known).sum())
    if threshold is not None:
        m["known_accuracy"] = m["accuracy"]
        m["known_unassigned"] = float((pred[known] == UNASSIGNED).mean()) if known.any() else float("nan")
        m["novel_unassigned"] = float((pred[~known] == UNASSIGNED).mean()) if (~known).any() else float("nan")
        m["auroc_known_vs_novel"] = float(roc_auc_score(known, conf)) if known.any() and (~known).any() else float("nan")
    m["y_pred"] = pred.tolist()
    return m


def evaluate_novelty(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], score: str, novelty: np.ndarray,
                     cutoff: float) -> dict[str, Any]:
    """Metrics of one run of the novel protocol for one novelty score: cells whose ``novelty`` is
    above ``cutoff`` are Unassigned. Known cells: accuracy (Unassigned counts as wrong), accuracy
    without rejection, accuracy of those kept (``assigned_accuracy``), the fraction wrongly rejected; novel cells: the fraction rejected (recall);
    both: the AUROC of the score (novel vs known) and the fraction of known cells rejected at the
    cutoff that rejects 95% of the novel ones, and the average precision of the novel class (AUPR)."""
    from model.novelty.calibration import aupr, auroc, fpr_at_tpr

    y_true = np.asarray(y_true).astype(str)
    pred, top, _ = assign_labels(probs, classes, NoveltyRule(score, cutoff), novelty)
    known = np.isin(y_true, np.asarray(classes, dtype=str))
    m = classification_metrics(y_true[known], pred[known]) if known.any() else {"n_cells": 0, "accuracy": float("nan"), "macro_f1": float("nan"), "macro_f1_union": float("nan"), "per_class": {}}
    rejected = pred == UNASSIGNED
    m.update(n_unseen_type=int((~known).sum()), known_accuracy=m["accuracy"], threshold=cutoff,
             accuracy_no_rejection=float((top[known] == y_true[known]).mean()) if known.any() else float("nan"),
             known_unassigned=float(rejected[known].mean()) if known.any() else float("nan"),
             assigned_accuracy=float((pred[known & ~rejected] == y_true[known & ~rejected]).mean()) if (known & ~rejected).any() else float("nan"),
             novel_unassigned=float(rejected[~known].mean()) if (~known).any() else float("nan"),
             auroc_known_vs_novel=auroc(novelty[known], novelty[~known]), fpr_at_95_tpr=fpr_at_tpr(novelty[known], novelty[~known]),
             aupr_novel=aupr(novelty[known], novelty[~known]), y_pred=pred.tolist())
    return m


SUMMARY_KEYS = ("accuracy", "macro_f1", "macro_f1_union", "known_accuracy", "accuracy_no_rejection", "assigned_accuracy", "known_unassigned",
                "novel_unassigned", "auroc_known_vs_novel", "fpr_at_95_tpr", "aupr_novel")


class NoveltyTally:
    """Novelty score variants over the novel protocol's runs (the development scripts): per variant
    and held-out type, the AUROC (known vs novel), the novel cells rejected and the known cells
    rejected at the conformal threshold of the calibration cells' scores, the known cells rejected
    when 95% of the novel ones are (FPR at 95% TPR) and the average precision of the novel class."""

    def __init__(self, reject_rate: float = 0.05) -> None:
        self.reject_rate = reject_rate
        self.runs: dict[str, dict[str, list[tuple[float, float, float, float, float]]]] = {}

    def add(self, name: str, split: Split, calibration: np.ndarray, query: np.ndarray, novel: np.ndarray) -> None:
        """One run's scores of variant ``name``: ``calibration`` (known cells held out of fitting) and
        ``query`` (the split's test cells, ``novel`` marking those of the held-out type)."""
        from model.novelty.calibration import aupr, auroc, conformal_threshold, fpr_at_tpr

        cut = conformal_threshold(calibration, self.reject_rate)
        known, new = query[~novel], query[novel]
        self.runs.setdefault(name, {}).setdefault(split.variant, []).append(
            (auroc(known, new), float((new > cut).mean()), float((known > cut).mean()), fpr_at_tpr(known, new), aupr(known, new)))

    def lines(self) -> list[str]:
        """One line per variant: the means over held-out types, then the AUROC of each type."""
        out = []
        for name, per in self.runs.items():
            m = np.array([np.mean(v, axis=0) for v in per.values()])
            types = " ".join(f"{k.removeprefix('novel=')} {np.mean(v, axis=0)[0]:.3f}" for k, v in per.items())
            out.append(f"{name:42s} AUROC {m[:, 0].mean():.4f}  novel recall {m[:, 1].mean():.4f}  "
                       f"known rejected {m[:, 2].mean():.4f}  FPR@95 {m[:, 3].mean():.4f}  AUPR {m[:, 4].mean():.4f}  | {types}")
        return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x == x], dtype=float)  # drop NaN
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over runs (folds x seeds) per (variant, method), and mean per-class F1."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    out = []
    for (variant, method), rs in groups.items():
        row: dict[str, Any] = {"variant": variant, "method": method, "n_runs": len(rs), "seeds": sorted({r["seed"] for r in rs}),
                               "seconds": round(float(np.mean([r["seconds"] for r in rs])), 1)}
        for k in SUMMARY_KEYS:
            if k in rs[0]:
                row[k], row[k + "_sd"] = _mean_sd([r[k] for r in rs])
        classes = sorted({c for r in rs for c, v in r["per_class"].items() if isinstance(v, dict) and c not in ("macro avg", "weighted avg")})
        row["per_class_f1"] = {c: _mean_sd([r["per_class"][c]["f1-score"] for r in rs if c in r["per_class"]])[0] for c in classes}
        out.append(row)
    return out


def _by_variant(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``rows`` grouped by their ``variant``, in order of first appearance: one table each."""
    return [(v, [r for r in rows if r["variant"] == v]) for v in dict.fromkeys(r["variant"] for r in rows)]


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """One table per variant: mean ± sd of the metrics over runs."""
    lines: list[str] = []
    for variant, rows in _by_variant(summary):
        keys = [k for k in SUMMARY_KEYS if k in rows[0] and (k != "accuracy" or "known_accuracy" not in rows[0])]
        lines += [f"**{variant}**", "", "| method | runs | " + " | ".join(k.replace("_", " ") for k in keys) + " | s/run |",
                  "|---|---|" + "---|" * len(keys) + "---|"]
        for r in sorted(rows, key=lambda r: -np.nan_to_num(r[keys[0]], nan=-1)):
            cells = [f"{r[k]:.4f} ± {r[k + '_sd']:.4f}" for k in keys]
            lines.append(f"| {r['method']} | {r['n_runs']} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def mean_over_variants(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For leave-one-type-out (several ``novel=TYPE`` variants): per method the mean over the
    held-out types of each metric's mean (sd: across the types)."""
    novel = [r for r in summary if str(r["variant"]).startswith("novel=")]
    if len({r["variant"] for r in novel}) < 2:
        return []
    out = []
    for method in dict.fromkeys(r["method"] for r in novel):
        rows = [r for r in novel if r["method"] == method]
        row: dict[str, Any] = {"variant": f"mean over the {len(rows)} held-out types", "method": method, "n_runs": len(rows),
                               "seconds": round(float(np.mean([r["seconds"] for r in rows])), 1), "per_class_f1": {}}
        for k in SUMMARY_KEYS:
            if k in rows[0]:
                row[k], row[k + "_sd"] = _mean_sd([r[k] for r in rows])
        out.append(row)
    return out


def best_novelty_scores(means: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, its calibrated novelty score (``method [score]`` rows of
    :func:`mean_over_variants`, the published rule not among them) with the highest mean AUROC over
    the held-out types: how ``model.novelty.DEFAULT_SCORE`` is chosen."""
    best: dict[str, dict[str, Any]] = {}
    for r in means:
        method, _, score = str(r["method"]).partition(" [")
        score = score.rstrip("]")
        auc = r.get("auroc_known_vs_novel")
        if not score or score.startswith("published") or " @ " in score or auc is None or not np.isfinite(auc):
            continue
        if method not in best or auc > best[method]["auroc"]:
            best[method] = {"score": score, "auroc": float(auc), "novel_recall": float(r.get("novel_unassigned", np.nan)),
                            "known_rejected": float(r.get("known_unassigned", np.nan))}
    return best


def paired_against(records: Sequence[dict[str, Any]], reference: str = "scbert") -> list[dict[str, Any]]:
    """``reference`` against every other method on the splits both were scored on (same variant,
    seed and fold): per (variant, method) the number of shared splits, the mean and sd over them of
    the reference's accuracy and macro-F1 minus the method's, and on how many splits the reference's
    accuracy was higher / lower. A paired view: the split-to-split spread, which the tables' sds
    contain, cancels. Empty when the reference did not run or nothing else did."""
    def key(r: dict[str, Any]) -> tuple[str, Any, Any]:
        return r["variant"], r["seed"], r["fold"]

    ref = {key(r): r for r in records if r["method"] == reference and "accuracy" in r}
    out = []
    for variant, method in dict.fromkeys((r["variant"], r["method"]) for r in records if r["method"] != reference):
        pairs = [(ref[key(r)], r) for r in records
                 if r["variant"] == variant and r["method"] == method and key(r) in ref and "accuracy" in r]
        if not pairs:
            continue
        d_acc = [a["accuracy"] - b["accuracy"] for a, b in pairs]
        d_f1 = [a["macro_f1"] - b["macro_f1"] for a, b in pairs]
        row: dict[str, Any] = {"variant": variant, "reference": reference, "method": method, "n_splits": len(pairs),
                               "higher": int(sum(d > 0 for d in d_acc)), "lower": int(sum(d < 0 for d in d_acc))}
        row["accuracy_diff"], row["accuracy_diff_sd"] = _mean_sd(d_acc)
        row["macro_f1_diff"], row["macro_f1_diff_sd"] = _mean_sd(d_f1)
        out.append(row)
    return out


def paired_table(paired: Sequence[dict[str, Any]]) -> str:
    """Markdown of :func:`paired_against`, one table per variant."""
    lines: list[str] = []
    for variant, rows in _by_variant(paired):
        ref = rows[0]["reference"]
        lines += [f"**{variant}: {ref} minus each method on the same splits**", "",
                  f"| method | splits | accuracy difference | macro f1 difference | splits {ref} higher / lower |", "|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["accuracy_diff"]):
            lines.append(f"| {r['method']} | {r['n_splits']} | {r['accuracy_diff']:+.4f} ± {r['accuracy_diff_sd']:.4f} | "
                         f"{r['macro_f1_diff']:+.4f} ± {r['macro_f1_diff_sd']:.4f} | {r['higher']} / {r['lower']} |")
        lines.append("")
    return "\n".join(lines)


def per_class_table(summary: Sequence[dict[str, Any]]) -> str:
    """Per-class F1 (mean over runs) as CSV: one row per (variant, method)."""
    classes = sorted({c for r in summary for c in r["per_class_f1"]})
    lines = ["variant,method," + ",".join(f'"{c}"' for c in classes)]
    for r in summary:
        vals = [f"{r['per_class_f1'][c]:.4f}" if c in r["per_class_f1"] else "" for c in classes]
        lines.append(f'"{r["variant"]}",{r["method"]},' + ",".join(vals))
    return "\n".join(lines) + "\n"


def check_same_splits(records: Sequence[dict[str, Any]]) -> None:
    """Refuse results where two methods were scored on different cells under the same split name."""
    seen: dict[str, str] = {}
    for r in records:
        key = f"{r['variant']}/seed{r['seed']}/fold{r['fold']}"
        if seen.setdefault(key, r["split"]) != r["split"]:
            raise ValueError(f"split {key} differs between runs ({seen[key]} vs {r['split']} for {r['method']}): "
                             "merge only results made from the same data, protocol and seeds")


def write_report(out: Path, records: Sequence[dict[str, Any]], y: np.ndarray | None, info: dict[str, Any]) -> list[dict[str, Any]]:
    """results.json, results.md, per_class_f1.csv and one confusion matrix PNG per (variant, method),
    pooling the test cells of the first seed's folds. ``y``: the labels the test indices refer to."""
    check_same_splits(records)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(records)
    means = mean_over_variants(summary)
    table = markdown_table(summary + means)
    best = best_novelty_scores(means)
    if best:
        table += "\nBest novelty score per method (highest mean AUROC over the held-out types):\n\n" + "".join(
            f"- {m}: {b['score']} (AUROC {b['auroc']:.4f}, novel recall {b['novel_recall']:.4f}, known rejected {b['known_rejected']:.4f})\n"
            for m, b in best.items())
    paired = paired_against(records)
    if paired:
        table += "\n" + paired_table(paired)
    header = (f"# Benchmark: protocol {info.get('protocol')} on {info.get('data')}\n\n"
              "macro f1: averaged over the true types; macro f1 union: over the true and the predicted types (a predicted type no "
              "test cell has, Unassigned included, counts with F1 0).\n\n"
              + (f"scBERT: {info['encoder']['text']}.\n\n" if info.get("encoder") else ""))
    write_text(out / "results.md", header + table + "\n")
    write_text(out / "per_class_f1.csv", per_class_table(summary))
    write_text(out / "results.json", json.dumps({"info": info, "summary": summary, "paired": paired, "best_novelty_score": best, "runs": list(records)}, indent=1, default=_json_default))
    if y is not None:
        y = np.asarray(y).astype(str)
        for r in summary:
            rs = [x for x in records if x["variant"] == r["variant"] and x["method"] == r["method"] and x["seed"] == r["seeds"][0]]
            idx = np.concatenate([x["test_index"] for x in rs]).astype(int)
            pred = np.concatenate([np.asarray(x["y_pred"], dtype=str) for x in rs])
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{r['variant']}_{r['method']}")
            plot_confusion(y[idx], pred, out / f"confusion_{safe}.png",
                           f"{r['method']} ({r['variant']}, seed {r['seeds'][0]}): accuracy {r.get('accuracy', float('nan')):.3f}")
    return summary


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Split):
        return {k: v for k, v in asdict(o).items() if k not in ("train", "test")}
    raise TypeError(type(o))
