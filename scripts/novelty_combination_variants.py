"""Combinations of novelty scores on a development set (RESULTS.md, "Novel cell types"): leave-one-
type-out, 2 folds, seed 0, logistic regression (L2) as the classifier, a tenth of each known type
calibrating a 5% reject rate. Each score is turned into its conformal p-value against the
calibration cells; the p-values of two or three scores are joined by their minimum or by Fisher's
-2 sum log p. Prints mean AUROC, novel recall and known cells rejected per variant, and AUROC per
held-out type. The ``combined`` score of :mod:`model.novelty` (Fisher, Mahalanobis in the expression
PCA + energy) was chosen with it on the sorted PBMCs, never on PBMC3k:

    python scripts/novelty_combination_variants.py ../shared/data/more/pbmc_sorted_2140.h5ad
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.accuracy.harness import ProtocolSettings, calibration_holdout, load_labelled, protocol_splits  # noqa: E402
from model.accuracy.methods import LogisticL2  # noqa: E402
from model.novelty import ScoreCombination, auroc, conformal_threshold  # noqa: E402

COMBINATIONS = {"mahalanobis + energy": ("mahalanobis", "energy"), "mahalanobis + energy + softmax": ("mahalanobis", "energy", "softmax")}


def main(path: str, label_key: str = "celltype") -> None:
    adata, y, genes = load_labelled([path], label_key, None, 2000)
    X, y, splits = protocol_splits(ProtocolSettings(protocol="novel", folds=2, seeds=[0]), adata, y, genes, [path], label_key, 200)
    res: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for split in splits:
        fit, cal = calibration_holdout(y, split)
        model = LogisticL2()
        model.fit(X[fit], y[fit], genes)
        novel = ~np.isin(y[split.test], model.classes_)
        sc, sq = model.novelty_scores(X[cal]), model.novelty_scores(X[split.test])
        variants = {k: (sc[k], sq[k]) for k in ("mahalanobis", "energy", "softmax", "knn")}  # mahalanobis / knn: in its expression PCA
        for name, parts in COMBINATIONS.items():
            comb = ScoreCombination.of(sc, parts)
            pc = np.stack([comb.pvalues(p, sc[p], leave_one_out=True) for p in parts])
            pq = np.stack([comb.pvalues(p, sq[p]) for p in parts])
            variants[f"min p ({name})"] = (-np.log(pc.min(0)), -np.log(pq.min(0)))
            variants[f"Fisher ({name})"] = (comb(sc, leave_one_out=True), comb(sq))
        for name, (c, q) in variants.items():
            cut = conformal_threshold(c, 0.05)
            res.setdefault(name, {}).setdefault(split.variant, []).append(
                (auroc(q[~novel], q[novel]), float((q[novel] > cut).mean()), float((q[~novel] > cut).mean())))
    print(path)
    for key, per in res.items():
        m = np.array([np.mean(v, axis=0) for v in per.values()])
        types = " ".join(f"{k.removeprefix('novel=')} {np.mean(v, axis=0)[0]:.3f}" for k, v in per.items())
        print(f"{key:42s} AUROC {m[:, 0].mean():.4f}  novel recall {m[:, 1].mean():.4f}  known rejected {m[:, 2].mean():.4f}  | {types}")


if __name__ == "__main__":
    for p in sys.argv[1:] or ["../shared/data/more/pbmc_sorted_2140.h5ad"]:
        main(p)
