"""Development: per-cell novelty scores of scBERT itself (not of a logistic-regression stand-in) and
their combinations, leave-one-type-out on one file (issue 34: the per-cell default).

The protocol of the other novelty development scripts: every type with >= 20 cells held out in
turn, 2 folds, seed 0; a tenth of each known type of the training part calibrates a 5% reject rate
(and chooses the head's epoch, as in the benchmark's novel protocol). The head is trained with
``--variant`` of :mod:`scripts.experiments.head_recipe_variants` (``default``: finetune.py's recipe) on
encodings computed once per file. Each score's conformal p-values (tail-extended, as the shipped
``crossfit_combined``) are joined by Fisher's -2 sum log p. Choose on the sorted PBMCs; PBMC3k is
the table the issue reports on:

    python -m scripts.experiments.novelty_scbert_variants --data $M/pbmc_sorted_2140.h5ad \\
        --pretrained /work/runs/enc/pre_main/model.pt
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from data.labels import read_label_map
from model.checkpoint import load_checkpoint
from model.novelty.calibration import ScoreCombination
from model.novelty.record import NoveltyRecord, novelty_scores
from model.novelty.scores import energy_score
from scripts.benchmark.harness import ProtocolSettings, calibration_holdout, load_labelled, protocol_splits
from scripts.benchmark.report import NoveltyTally
from scripts.experiments.head_recipe_variants import VARIANTS, encode_file, train_model

SINGLE = ("energy", "softmax", "mahalanobis", "knn", "pca_mahalanobis", "crossfit_mahalanobis", "crossfit_knn")
COMBINATIONS = {
    "crossfit_mahalanobis + energy (crossfit_combined)": ("crossfit_mahalanobis", "energy"),
    "crossfit_mahalanobis + mahalanobis": ("crossfit_mahalanobis", "mahalanobis"),
    "crossfit_mahalanobis + mahalanobis + energy": ("crossfit_mahalanobis", "mahalanobis", "energy"),
    "crossfit_mahalanobis + knn": ("crossfit_mahalanobis", "knn"),
    "crossfit_mahalanobis + knn + energy (crossfit_feature_combined, the default)": ("crossfit_mahalanobis", "knn", "energy"),
    "crossfit_mahalanobis + crossfit_knn + mahalanobis": ("crossfit_mahalanobis", "crossfit_knn", "mahalanobis"),
    "mahalanobis + energy": ("mahalanobis", "energy"),
    # the ensemble's own scores (all heads; heads 2.. trained on some of the calibration cells)
    "crossfit_mahalanobis + knn + ens_energy": ("crossfit_mahalanobis", "knn", "ens_energy"),
    "crossfit_mahalanobis + knn + energy + disagreement": ("crossfit_mahalanobis", "knn", "energy", "disagreement"),
    "crossfit_mahalanobis + energy + disagreement": ("crossfit_mahalanobis", "energy", "disagreement"),
}
ENSEMBLE_SCORES = ("ens_energy", "disagreement")


def ensemble_scores(all_logits: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of every head together (heads, cells, classes): the energy of the mean logits, and the
    heads' disagreement (the entropy of their mean probabilities minus their mean entropy)."""
    def entropy(p: np.ndarray) -> np.ndarray:
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
    z = all_logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return {"ens_energy": energy_score(z.mean(0)), "disagreement": entropy(p.mean(0)) - entropy(p).mean(0)}


@torch.inference_mode()
def head_outputs(model: torch.nn.Module, E: torch.Tensor, rows: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """Probabilities, logits and the classifier's features of the stored encodings of ``rows``."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"probs": [], "logits": [], "features": [], "all_logits": []}
    others = list(getattr(model.to_out, "members", [model.to_out]))[1:]  # the first head's logits come with its features
    for start in range(0, len(rows), batch):
        # the novelty scores read the first head (an ensemble's calibrated one): its features and logits
        h = E[torch.as_tensor(rows[start:start + batch])]
        feats, _, logits = model.to_out.outputs(h)
        feats, logits = feats.float(), logits.float()
        for k, v in (("probs", torch.softmax(logits, -1)), ("logits", logits), ("features", feats),
                     ("all_logits", torch.stack([logits, *(m(h).float() for m in others)]))):
            parts[k].append(v)
    return {k: torch.cat(v, dim=1 if k == "all_logits" else 0).numpy() for k, v in parts.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--label-key", default="celltype")
    p.add_argument("--pretrained", required=True)
    p.add_argument("--variant", default="default", choices=list(VARIANTS))
    p.add_argument("--label-map", default=None, help="two columns: label in the data, label to use (- leaves the cells out)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    ckpt = load_checkpoint(args.pretrained)
    label_map = read_label_map(args.label_map) if args.label_map else {}
    adata, y, genes = load_labelled(args.data, args.label_key, ckpt.genes, None)
    X, y, splits = protocol_splits(ProtocolSettings(protocol="novel", folds=2, seeds=[0], label_map=label_map), adata, y, genes, args.data, args.label_key, None)
    E = encode_file(ckpt, X)
    tally = NoveltyTally()
    for split in splits:
        fit, cal = calibration_holdout(y, split)
        classes = np.unique(y[fit])
        codes = np.searchsorted(classes, y)
        model, _, _ = train_model(args.variant, ckpt, X, E, codes, len(classes), fit, split.seed, cal=cal)
        ref = head_outputs(model, E, fit)
        record = NoveltyRecord.fit(ref["features"], X[fit], codes[fit], len(classes), split.seed, density=False)
        out_c, out_q = head_outputs(model, E, cal), head_outputs(model, E, split.test)
        sc = novelty_scores(out_c["probs"], out_c["logits"], out_c["features"], None, record, expression=X[cal])
        sq = novelty_scores(out_q["probs"], out_q["logits"], out_q["features"], None, record, expression=X[split.test])
        sc.update(ensemble_scores(out_c["all_logits"]))
        sq.update(ensemble_scores(out_q["all_logits"]))
        novel = ~np.isin(y[split.test], classes)
        variants = {k: (sc[k], sq[k]) for k in (*SINGLE, *ENSEMBLE_SCORES) if k in sc}
        for name, parts in COMBINATIONS.items():
            comb = ScoreCombination.of(sc, parts, tail=True)
            variants[f"Fisher {name}"] = (comb(sc, leave_one_out=True), comb(sq))
        for name, (c, q) in variants.items():
            tally.add(name, split, c, q, novel)
        print(f"{split.key} done", flush=True)
    print(f"{args.data} (head recipe: {args.variant})")
    print("\n".join(tally.lines()))


if __name__ == "__main__":
    main()
