"""A checkpoint's card: what it holds, readable by a person (``python -m model.info CKPT``)."""

from __future__ import annotations

import math
from typing import Any

from model.checkpoint.format import Checkpoint
from model.novelty.scores import SCORE_MEANINGS


def _n_parameters(ckpt: Checkpoint) -> int:
    return int(sum(v.numel() for k, v in ckpt.state_dict.items() if v.is_floating_point()))


def checkpoint_card(ckpt: Checkpoint) -> dict[str, Any]:
    """Model size, genes, classes with their training counts, preprocessing, recipe and training
    settings, metrics, novelty calibration and provenance, as plain data."""
    from data.genes import check_species

    c = ckpt.config
    training = ckpt.training or {}
    converted = training.get("stage") == "converted" or training.get("source") == "published scBERT code"
    sp = check_species(ckpt.genes[:2000])
    counts = (ckpt.metrics or {}).get("class_counts") or {}
    card: dict[str, Any] = {
        "file": ckpt.source,
        "kind": "fine-tuned classifier" if c.head == "classifier" else "pretrained (masked expression)",
        "origin": "converted from the published scBERT code" if converted else ("this package" if training else "this package (no training record)"),
        "model": {"genes": c.n_genes, "dim": c.dim, "depth": c.depth, "heads": c.heads, "dim_head": c.dim_head, "bin_num": c.bin_num,
                  "random_features": c.n_features, "gene_embedding": c.gene_embedding, "parameters": _n_parameters(ckpt),
                  **({"classes": c.n_classes, "classifier_hidden": c.classifier_hidden, "classifier_heads": c.classifier_members}
                     if c.head == "classifier" else {})},
        "genes": {"count": len(ckpt.genes), "first": list(ckpt.genes[:8]),
                  "species": "mouse-style symbols" if sp.looks_mouse else "human symbols (or as given)"},
        "classes": None if not ckpt.classes else [{"name": n, "training_cells": counts.get(n)} for n in ckpt.classes],
        "preprocessing": dict(ckpt.preprocessing),
        "training": {**training, **({"data": [training["data"]]} if isinstance(training.get("data"), str) else {})},
        "recipe": training.get("recipe", "ours" if training and not converted else None),
        "metrics": {k: v for k, v in (ckpt.metrics or {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)},
        "provenance": dict(ckpt.provenance) or None,
    }
    record = ckpt.novelty
    if record is not None:
        cal = record.calibration
        card["novelty"] = {"default_score": record.default, "default_score_meaning": SCORE_MEANINGS.get(record.default),
                           "knn_reference": None if record.classes is None else record.classes.knn_input,
                           "reference_cells": None if record.classes is None else int(record.classes.reference.shape[0]),
                           "query_scores": record.query_ready,
                           "reject_rate": None if cal is None else cal.reject_rate, "calibration_cells": None if cal is None else cal.n,
                           "thresholds": None if cal is None else {k: (v if math.isfinite(v) else "inf") for k, v in cal.thresholds.items()},
                           "precision_error": record.precision_error or None}
    else:
        card["novelty"] = None
    return card


KNN_REFERENCES = {"features": "the classifier's penultimate features (the first head's in an ensemble; the cell embedding `head`)",
                  "embedding": "the mean-pooled final encodings (a model fine-tuned before the classifier's features were used)"}


def card_text(card: dict[str, Any]) -> str:
    """The card as lines of text."""
    m = card["model"]
    lines = [f"{card['file']}: {card['kind']}, {card['origin']}",
             f"model: {m['genes']} genes, dim {m['dim']}, depth {m['depth']}, {m['heads']} heads of {m['dim_head']}, {m['bin_num']} bins, "
             f"{m['random_features']} random features, gene embedding {m['gene_embedding']}, {m['parameters']:,} parameters"
             + (f", {m['classifier_heads']} classifier heads (logits averaged)" if m.get("classifier_heads", 1) > 1 else "")]
    g = card["genes"]
    lines.append(f"genes: {g['count']} ({', '.join(g['first'])}, ...), {g['species']}")
    if card["classes"]:
        lines.append("classes (labelled cells of the fine-tuning data): " + ", ".join(f"{c['name']} ({c['training_cells']} cells)" if c["training_cells"] is not None else c["name"]
                                             for c in card["classes"]))
    p = card["preprocessing"]
    lines.append(f"preprocessing: library size over {'the vocabulary genes (published order)' if p.get('library_size') == 'vocab' else 'all input genes'}, "
                 f"{p.get('target_sum', 1e4):g} per cell, log{p.get('log_base', 2):g}(1 + x), cells with >= {p.get('min_genes')} genes")
    t = card["training"]
    if t:
        stage = t.get("stage", "unrecorded: the command-line flags of an older version")
        lines.append(f"training: stage {stage}, recipe {card['recipe']}" + (f", data {', '.join(map(str, t['data']))}" if t.get("data") else ""))
        for key in ("optimisation", "finetuning", "pretraining", "execution", "gene2vec"):
            if isinstance(t.get(key), dict):
                lines.append(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in t[key].items()))
        if not any(isinstance(t.get(k), dict) for k in ("optimisation", "finetuning", "pretraining")):
            lines.append("  flags: " + ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("data", "stage") and v is not None))
    if card["metrics"]:
        lines.append("metrics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in card["metrics"].items()))
    n = card["novelty"]
    if n:
        th = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (n["thresholds"] or {}).items())
        if n.get("default_score_meaning"):
            lines.append(f"novelty score {n['default_score']}: {n['default_score_meaning']}")
        lines.append(f"novelty: default score {n['default_score']}, thresholds rejecting {n['reject_rate']:.0%} of {n['calibration_cells']} "
                     f"validation cells: {th}; statistics of {n['reference_cells']} training cells"
                     + ("; query_density / query_combined: thresholds set for each query" if n.get("query_scores") else ""))
        if n.get("knn_reference"):
            lines.append(f"novelty kNN reference: {KNN_REFERENCES.get(n['knn_reference'], n['knn_reference'])} of the training cells")
        for prec, err in (n.get("precision_error") or {}).items():
            scores = ", ".join(f"{k} {v:.2g}" for k, v in err.get("scores", {}).items())
            lines.append(f"{prec} error on {err['n_cells']} validation cells: probabilities {err['probs']:.2g}"
                         + (f", novelty scores (relative to the threshold) {scores}" if scores else "")
                         + ("" if err["head"] == "float32" else f", measured with the classifier head in {prec} (a cautious margin)")
                         + " (predict.py --fp32-recheck auto reads it)")
    elif card["kind"].startswith("fine-tuned"):
        lines.append("novelty: no calibration: predict.py uses the published rule")
    prov = card["provenance"]
    lines.append(f"written by: {prov['package']} {prov.get('version')}, git commit {prov.get('git_commit')}" if prov else "written by: unknown (older file)")
    return "\n".join(lines)
