"""Majority-voting rules on a development set (RESULTS.md, "Majority voting"): 5-fold CV, seed 0,
logistic regression (L2) and the kNN reference mapping as classifiers, Leiden over-clusters of the
test cells' expression PCA (CellTypist's resolution). Rules: none, hard (CellTypist), soft (half and
half with the cluster mean, at two weights), gated (the whole cluster takes its majority label when
that label has at least a share), and cautious (only cells whose top probability is below a bar
change, and only in clusters with an 80% majority). Prints the accuracy of each and its change
against no voting. ``cautious`` (0.5, 0.8) of :mod:`model.majority_voting` was chosen with it on the
sorted PBMCs, never on PBMC3k (``$M``: the folder of the extra data sets):

    python -m scripts.experiments.majority_voting_variants --data $M/pbmc_sorted_2140.h5ad
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from model.majority_voting import cautious_vote, expression_pcs, majority_vote, over_cluster, soft_vote
from scripts.benchmark.harness import ProtocolSettings, load_labelled, protocol_splits
from scripts.benchmark.methods import KNNReference, LogisticL2
from scripts.experiments.common import each_data_file


def gated(labels: np.ndarray, clusters: np.ndarray, share: float) -> np.ndarray:
    """Every cell of a cluster whose most common label has at least ``share`` of its cells takes it."""
    out = labels.copy()
    for c in np.unique(clusters):
        rows = clusters == c
        label, n = Counter(labels[rows]).most_common(1)[0]
        if n >= share * rows.sum():
            out[rows] = label
    return out


def main(path: str, label_key: str = "celltype", label_map: dict[str, str] | None = None) -> None:
    adata, y, genes = load_labelled([path], label_key, None, 2000)
    X, y, splits = protocol_splits(ProtocolSettings(protocol="cv", folds=5, seeds=[0], label_map=dict(label_map or {})), adata, y, genes, [path], label_key, 200)
    acc: dict[tuple[str, str], list[float]] = {}
    for split in splits:
        clusters = over_cluster(expression_pcs(X[split.test], seed=0), None, seed=0)
        for factory in (LogisticL2, KNNReference):
            model = factory()
            model.fit(X[split.train], y[split.train], genes)
            p = model.predict_proba(X[split.test])
            classes = np.asarray(model.classes_)
            top = classes[p.argmax(1)]
            rules = {"none": top, "hard": majority_vote(top, clusters), "soft 0.5": classes[soft_vote(p, clusters).argmax(1)],
                     "soft 0.25": classes[soft_vote(p, clusters, 0.25).argmax(1)]}
            for share in (0.6, 0.7, 0.8, 0.9):
                rules[f"gated {share}"] = gated(top, clusters, share)
            for unsure in (0.5, 0.7, 0.9):
                rules[f"cautious {unsure}, 0.8"] = classes[cautious_vote(p, clusters, unsure, 0.8)]
            for rule, pred in rules.items():
                acc.setdefault((model.name, rule), []).append(float((pred == y[split.test]).mean()))
    print(path)
    for (method, rule), values in acc.items():
        base = np.mean(acc[(method, "none")])
        print(f"{method:10s} {rule:18s} accuracy {np.mean(values):.4f}  change {np.mean(values) - base:+.4f}")


if __name__ == "__main__":
    each_data_file(main, __doc__)
