"""Running a trained model on cells: one batched inference loop, and annotation as one contract.

:func:`annotate` (cells + a fine-tuned checkpoint) returns an :class:`AnnotationResult`; ``predict.py``,
the Python API (:mod:`model.api`), ``attn_analysis.py --umap`` and the accuracy benchmark all go
through it. The result writes itself into an AnnData (:meth:`AnnotationResult.to_adata`, under the
key names of :class:`AnnotationKeys`), a table (:meth:`~AnnotationResult.to_table`), a report and
plots. The rule that makes a cell ``Unassigned`` lives in :func:`assign_labels`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from data.dataset import CellDataset
from data.io import InputError
from model import distributed
from model.checkpoint import Checkpoint, load_checkpoint
from model.evaluation import UNASSIGNED, annotation_report, known_truth
from model.nn.config import ExecutionOptions
from model.nn.network import POOLINGS, ScBERT, pool_encodings
from model.runtime import tune_allocator

log = logging.getLogger("scbert")


@dataclass(frozen=True)
class AnnotationKeys:
    """Where annotations live in an AnnData, for the prefix ``key_added`` (default ``scbert``)."""

    key_added: str = "scbert"

    @property
    def celltype(self) -> str:
        return f"{self.key_added}_celltype"  # obs: the label, or Unassigned

    @property
    def confidence(self) -> str:
        return f"{self.key_added}_confidence"  # obs: the top class probability

    @property
    def probabilities(self) -> str:
        return f"{self.key_added}_probabilities"  # obsm: cells x classes

    @property
    def embedding(self) -> str:
        return f"X_{self.key_added}"  # obsm: cells x dim

    @property
    def classes(self) -> str:
        return f"{self.key_added}_classes"  # uns: the columns of the probabilities

    @property
    def threshold(self) -> str:
        return f"{self.key_added}_threshold"  # uns

    @property
    def report(self) -> str:
        return f"{self.key_added}_annotation"  # uns: JSON of the model and the preprocessing report

    @property
    def celltype_raw(self) -> str:
        return f"{self.key_added}_celltype_raw"  # obs: the top class, never Unassigned

    @property
    def novelty(self) -> str:
        return f"{self.key_added}_novelty"  # obs: the novelty score that decides Unassigned; uns: the rule (score, threshold, reject rate)

    @property
    def majority_voting(self) -> str:
        return f"{self.key_added}_majority_voting"  # obs: the majority label of the cell's over-cluster

    @property
    def over_clustering(self) -> str:
        return f"{self.key_added}_over_clustering"  # obs: the over-cluster of each cell

    def obs(self) -> tuple[str, ...]:
        return self.celltype, self.confidence

    def obsm(self) -> tuple[str, ...]:
        return self.probabilities, self.embedding

    def uns(self) -> tuple[str, ...]:
        return self.classes, self.threshold, self.report


@dataclass(frozen=True)
class NoveltyRule:
    """When a cell is ``Unassigned``: when its novelty ``score`` (see :mod:`model.novelty`) is above
    ``cutoff`` (None: never). ``reject_rate``: the rate the cutoff was calibrated for (None: set by
    hand). The published rule is ``NoveltyRule.published(0.5)``: top probability below 0.5."""

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
    always for ``softmax``: 1 - the top probability). The one place where cells become Unassigned."""
    classes = np.asarray(classes, dtype=object)
    conf = probs.max(axis=1)
    top = classes[probs.argmax(axis=1)].astype(str)
    labels = top
    if rule is not None and rule.cutoff is not None:
        if novelty is None or rule.score == "softmax":
            novelty = 1.0 - conf.astype(np.float64)
        labels = np.where(novelty > rule.cutoff, UNASSIGNED, top)
    return labels.astype(str), top, conf


# --------------------------------------------------------------------------------------------
# The batched inference loop
# --------------------------------------------------------------------------------------------

BatchFn = Callable[[ScBERT, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@torch.inference_mode()
def run_batches(model: ScBERT, ds: CellDataset, fn: BatchFn, batch_size: int, device: torch.device, rows: np.ndarray | None = None,
                progress: bool = False, desc: str = "predict", num_workers: int = 0) -> Iterable[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """``fn(model, batch)`` on each batch of the cells of ``ds`` (all, or ``rows`` in that order;
    ``batch['tokens']`` on ``device``, ``batch['index']`` the cells' indices in ``ds``), in eval mode
    under the model's precision: yields (cell indices, ``fn``'s outputs on the CPU). The one
    inference loop of the package (annotation, embeddings, validation, attention scores)."""
    model.eval().to(device)
    n = len(ds) if rows is None else len(rows)
    bar = tqdm(total=n, desc=desc, unit="cell", disable=not progress, leave=False)
    try:
        for batch in ds.loader(batch_size, rows, num_workers):
            batch["tokens"] = batch["tokens"].to(device)
            with model.autocast():
                out = fn(model, batch)
            yield batch["index"].numpy(), {k: v.cpu() for k, v in out.items()}
            bar.update(len(batch["index"]))
    finally:
        bar.close()


def _probabilities(embed: bool, pooling: str, features: bool = False) -> BatchFn:
    def fn(model: ScBERT, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        h = model.encode(tokens)
        feats = model.to_out.features(h)  # the classifier's penultimate activations (float32)
        logits = model.to_out.logits(feats)
        out = {"probs": torch.softmax(logits, dim=-1), "logits": logits}
        if features:
            out["features"] = feats.float()
        if embed:
            out["embedding"] = pool_encodings(h, tokens, pooling)
        return out
    return fn


def predict_outputs(model: ScBERT, ds: CellDataset, batch_size: int, device: torch.device, embed: bool = False, features: bool = False,
                    pooling: str = "mean", progress: bool = True, num_workers: int = 0) -> dict[str, np.ndarray]:
    """Per cell, in dataset order, from one encoder pass per batch: ``probs`` and ``logits``
    (cells x classes), with ``features`` the classifier's penultimate activations (cells x hidden),
    with ``embed`` the cell embeddings (cells x dim)."""
    parts = [out for _, out in run_batches(model, ds, _probabilities(embed, pooling, features), batch_size, device, progress=progress,
                                           num_workers=num_workers)]
    return {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]} if parts else {}


def predict(model: ScBERT, ds: CellDataset, batch_size: int, device: torch.device, embed: bool = False, pooling: str = "mean",
            progress: bool = True, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (cells x classes) and, with ``embed``, cell embeddings (cells x dim),
    in dataset order, from one encoder pass per batch."""
    out = predict_outputs(model, ds, batch_size, device, embed, pooling=pooling, progress=progress, num_workers=num_workers)
    return out["probs"], out.get("embedding")


def predict_distributed(model: ScBERT, ds: CellDataset, batch_size: int, device: torch.device, num_workers: int = 0) -> np.ndarray:
    """:func:`predict`'s probabilities with the cells shared among the processes of a torchrun job
    (each scores a contiguous block; every rank gets all probabilities, in dataset order, each cell
    once). In a single process it is :func:`predict`."""
    if not distributed.current().enabled:
        return predict(model, ds, batch_size, device, progress=False, num_workers=num_workers)[0]
    rows = distributed.shard(len(ds))
    parts = [out["probs"] for _, out in run_batches(model, ds, _probabilities(False, "mean"), batch_size, device, rows=rows,
                                                    num_workers=num_workers)]
    mine = torch.cat(parts).numpy() if parts else np.zeros((0, model.config.n_classes), dtype=np.float32)
    return np.concatenate(distributed.all_gather_objects(mine))


# Cells this close to a decision are scored again in float32 after a bf16/fp16 pass: a top-two
# probability gap below the margin, or a novelty score within the margin of the cutoff (relative to
# the cutoff for the unbounded scores; absolute for softmax, a probability). The margin is "auto" by
# default: RECHECK_SAFETY times the largest change that the low precision made to this model's
# outputs on its validation cells, measured at the end of fine-tuning (:func:`measure_precision_error`,
# stored in the checkpoint), at least RECHECK_FLOOR; RECHECK_MARGIN for checkpoints without it.
RECHECK_MARGIN = 0.05
RECHECK_SAFETY = 4.0
RECHECK_FLOOR = 0.005
PRECISION_CHECK_CELLS = 128  # validation cells on which fine-tuning measures the bf16 error
NETWORK_SCORES = ("energy", "mahalanobis", "knn")  # novelty scores that the precision can move, besides softmax


def rechecks(options: ExecutionOptions, margin: float | None) -> bool:
    """Whether :func:`score_cells` re-checks in float32: after a bf16/fp16 pass, with a margin above 0."""
    return options.precision != "fp32" and bool(margin)


def measure_precision_error(net: ScBERT, ds: CellDataset, stats: Any, thresholds: dict[str, float], batch_size: int,
                            device: torch.device, precision: str = "bf16", progress: bool = False) -> dict[str, Any]:
    """How much running ``net`` in ``precision`` (with the inference defaults) instead of float32 moves
    its outputs on the cells ``ds``: the largest change of a class probability (``probs``) and of
    each network-computed novelty score relative to its calibrated threshold (``scores``). What
    :func:`auto_recheck_margin` turns into the re-check margin; fine-tuning stores it in the checkpoint."""
    from model.novelty import novelty_scores

    def run(p: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        kept = net.options
        net.configure(ExecutionOptions(precision=p))
        try:
            out = predict_outputs(net, ds, batch_size, device, embed=True, features=stats is not None, progress=progress)
        finally:
            net.configure(kept)
        return out, novelty_scores(out["probs"], out["logits"], out.get("features"), out["embedding"], stats, which=NETWORK_SCORES)

    ref, ref_scores = run("fp32")
    low, low_scores = run(precision)
    errors = {}
    for name, v in ref_scores.items():
        t = thresholds.get(name)
        if t is not None and np.isfinite(t) and t != 0:
            errors[name] = float(np.max(np.abs(low_scores[name].astype(np.float64) - v)) / abs(t)) if len(v) else 0.0
    probs = float(np.max(np.abs(low["probs"].astype(np.float64) - ref["probs"]))) if len(ds) else 0.0
    return {"precision": precision, "n_cells": len(ds), "device": torch.device(device).type, "probs": probs, "scores": errors,
            "head": "float32"}  # measured with the classifier head in float32 (models measured before: in the low precision)


def auto_recheck_margin(error: dict[str, Any] | None, rule: NoveltyRule) -> float:
    """The re-check margin for a measured ``error`` (:func:`measure_precision_error`) and ``rule``:
    RECHECK_SAFETY times the most the precision moved the top-two gap (twice a probability's change)
    or the rule's score (relative to its threshold), at least RECHECK_FLOOR; RECHECK_MARGIN without a
    measurement, or when the rule's score was not measured."""
    from model.novelty import EXPRESSION_SCORES

    if not error:
        return RECHECK_MARGIN
    worst = 2.0 * float(error["probs"])
    if rule.cutoff is not None and rule.score not in ("softmax", *EXPRESSION_SCORES):
        if rule.score not in error.get("scores", {}):
            return RECHECK_MARGIN
        worst = max(worst, float(error["scores"][rule.score]))
    return max(RECHECK_FLOOR, RECHECK_SAFETY * worst)


def resolve_recheck_margin(margin: float | str | None, ckpt: Checkpoint, options: ExecutionOptions | None,
                           rule: NoveltyRule) -> float | None:
    """The float32 re-check margin to use: ``margin`` as given (None or 0: off), or for ``"auto"``
    the one the checkpoint's measured error of this precision gives (:func:`auto_recheck_margin`;
    RECHECK_MARGIN for checkpoints that did not measure it). None under fp32."""
    precision = (options or ExecutionOptions()).precision
    if precision == "fp32":
        return None
    if margin != "auto":
        if isinstance(margin, str):
            raise InputError(f"the float32 re-check margin must be a number between 0 and 1 or 'auto', got {margin!r}")
        return margin
    error = ((ckpt.novelty or {}).get("precision_error") or {}).get(precision)
    value = auto_recheck_margin(error, rule)
    if error:
        log.info("float32 re-check margin %.4f: %g x the largest %s change measured on %d validation cells at fine-tuning",
                 value, RECHECK_SAFETY, precision, error["n_cells"])
        if error.get("head") != "float32" and value > RECHECK_FLOOR:
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
    from model.novelty import EXPRESSION_SCORES

    if probs.shape[1] > 1:
        top2 = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
        near = (top2[:, 1] - top2[:, 0]) < margin
    else:
        near = np.zeros(len(probs), dtype=bool)
    cutoff = None if rule is None or rule.score in EXPRESSION_SCORES else rule.cutoff
    if cutoff is not None and np.isfinite(cutoff):
        if score is None or rule.score == "softmax":
            score, band = 1.0 - probs.max(axis=1).astype(np.float64), margin
        else:
            band = margin * max(abs(cutoff), 1e-12)
        near |= np.abs(np.asarray(score, dtype=np.float64) - cutoff) < band
    return near


def score_cells(net: ScBERT, ds: CellDataset, stats: Any, rule: NoveltyRule, batch_size: int, device: torch.device,
                pooling: str = "mean", progress: bool = True, num_workers: int = 0,
                recheck_margin: float | None = RECHECK_MARGIN) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """The model's outputs (see :func:`predict_outputs`, with embeddings) and the novelty scores
    the rule needs (``softmax`` and ``energy`` always; ``mahalanobis`` / ``knn`` when the rule uses
    them), from one pass. After a bf16/fp16 pass, the cells :func:`near_decision` finds are run again
    in float32 and their outputs replaced, so that labels match a float32 run (``recheck_margin``
    None or 0: no re-check). Returns outputs, scores and the number of cells re-checked."""
    from model.novelty import EXPRESSION_SCORES, QUERY_COMBINED_PARTS, QUERY_SCORES, novelty_scores

    wanted = {"softmax", "energy", rule.score}
    if rule.score in QUERY_SCORES:
        wanted.add(QUERY_COMBINED_PARTS[0])  # for query_combined and query_rule's fall-back; the query score itself: query_rule
    features = stats is not None and "mahalanobis" in wanted
    expression = bool(wanted & {*EXPRESSION_SCORES, "combined"})  # the pca_* scores (and so combined) also read the cells' input matrix

    def run(dataset: CellDataset, show: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        out = predict_outputs(net, dataset, batch_size, device, embed=True, features=features, pooling=pooling, progress=show,
                              num_workers=num_workers)
        if not out:
            return out, {}
        return out, novelty_scores(out["probs"], out["logits"], out.get("features"), out["embedding"], stats, which=wanted,
                                   expression=dataset.X if expression else None)

    out, scores = run(ds, progress)
    if not (rechecks(net.options, recheck_margin) and out):
        return out, scores, 0
    rows = np.flatnonzero(near_decision(out["probs"], rule, scores.get(rule.score), recheck_margin))
    if len(rows):
        low_options = net.options
        net.configure(low_options.replace(precision="fp32"))
        try:
            again, again_scores = run(ds.subset(rows), False)
        finally:
            net.configure(low_options)
        for k, v in again.items():
            out[k][rows] = v
        for k, v in again_scores.items():
            scores[k][rows] = v
    return out, scores, len(rows)


def embed_cells(model: ScBERT, ds: CellDataset, batch_size: int, device: torch.device, pooling: str = "mean",
                progress: bool = True) -> np.ndarray:
    """Cell embeddings (cells x dim, float32, in order) from the final encodings of any model,
    pretrained or fine-tuned: see :func:`model.nn.network.pool_encodings`."""
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")

    def fn(m: ScBERT, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"embedding": pool_encodings(m.encode(batch["tokens"]), batch["tokens"], pooling)}

    parts = [out["embedding"] for _, out in run_batches(model, ds, fn, batch_size, device, progress=progress, desc="embed")]
    return torch.cat(parts).numpy()


# --------------------------------------------------------------------------------------------
# Annotation: one function, one result
# --------------------------------------------------------------------------------------------


@dataclass
class AnnotationResult:
    """What annotating cells with a fine-tuned model gives: per cell (in input order) the class
    probabilities, the top label, the label (``Unassigned`` where the novelty ``rule`` rejects the
    cell), its confidence, its novelty scores and its embedding; plus the model's classes and the
    preprocessing report. :meth:`vote` adds majority voting over an over-clustering."""

    probabilities: np.ndarray  # cells x classes
    classes: list[str]
    embedding: np.ndarray  # cells x dim
    rule: NoveltyRule
    cell_names: list[str]
    novelty: dict[str, np.ndarray] = field(default_factory=dict)  # every score computed, per cell
    model: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # preprocessing and model included
    over_clustering: np.ndarray | None = None
    majority_voting: np.ndarray | None = None
    rechecked: int | None = None  # cells re-scored in float32 after a bf16/fp16 pass (None: no re-check ran)
    recheck_margin: float | None = None  # the margin of that re-check
    expression: Any = field(default=None, repr=False)  # the prepared cells x genes matrix, for over-clustering on expression

    def __post_init__(self) -> None:
        if self.rule.cutoff is not None and self.rule.score not in self.novelty and self.rule.score != "softmax":
            raise ValueError(f"the rule's score {self.rule.score!r} was not computed")
        self.labels, self.labels_raw, self.confidence = assign_labels(self.probabilities, self.classes, self.rule,
                                                                      self.novelty.get(self.rule.score))

    @property
    def n_cells(self) -> int:
        return len(self.cell_names)

    @property
    def threshold(self) -> float | None:
        return self.rule.threshold

    @property
    def novelty_score(self) -> np.ndarray:
        """The score the rule uses, per cell (1 - confidence for softmax)."""
        return self.novelty.get(self.rule.score, 1.0 - self.confidence.astype(np.float64))

    def vote(self, clusters: Sequence[Any] | None = None, seed: int = 0, basis: str = "expression", voting: str = "cautious",
             resolution: float | None = None) -> AnnotationResult:
        """Majority voting: each cell gets its cluster's label only when it is unsure and the cluster
        nearly unanimous (``voting="cautious"``, the default, :func:`model.majority_voting.cautious_vote`),
        the top class of its probabilities averaged half and half with its cluster's mean
        (``"soft"``: confident cells keep their label), or the most common label of its cluster
        (``"hard"``, CellTypist's). Clusters: ``clusters`` given, or Leiden
        over-clusters of the cells' expression PCA (``basis="expression"``) or of the scBERT
        embedding (``"embedding"``). Returns the result."""
        from model.majority_voting import (
            OVER_CLUSTERING_BASES,
            VOTING_RULES,
            cautious_vote,
            expression_pcs,
            majority_vote,
            over_cluster,
            soft_vote,
        )

        if basis not in OVER_CLUSTERING_BASES or voting not in VOTING_RULES:
            raise InputError(f"over-clustering basis {basis!r} / voting {voting!r}: use one of {OVER_CLUSTERING_BASES} / {VOTING_RULES}")
        if clusters is not None:
            self.over_clustering = np.asarray(clusters).astype(str)
        elif basis == "embedding":
            self.over_clustering = over_cluster(self.embedding, resolution, seed=seed)
        else:
            if self.expression is None:
                raise InputError("over-clustering on expression needs the cells' prepared expression, which this result does not keep "
                                 "(it came from a streamed run): pass clusters, or basis='embedding'")
            self.over_clustering = over_cluster(expression_pcs(self.expression, seed=seed), resolution, seed=seed)
        if len(self.over_clustering) != self.n_cells:
            raise InputError(f"the over-clustering has {len(self.over_clustering)} entries for {self.n_cells} cells")
        if voting == "hard":
            self.majority_voting = majority_vote(self.labels, self.over_clustering)
        elif voting == "cautious":
            self.majority_voting = np.asarray(self.classes, dtype=object)[cautious_vote(self.probabilities, self.over_clustering)].astype(str)
        else:
            smoothed = soft_vote(self.probabilities, self.over_clustering)
            self.majority_voting = np.asarray(self.classes, dtype=object)[smoothed.argmax(1)].astype(str)
        return self

    def to_adata(self, adata: ad.AnnData, key_added: str = "scbert") -> ad.AnnData:
        """Write the annotation into ``adata`` (in place; the same cells, in order) under the keys
        of :class:`AnnotationKeys` and return it."""
        if adata.n_obs != self.n_cells:
            raise ValueError(f"the annotation has {self.n_cells} cells, the AnnData {adata.n_obs}")
        keys = AnnotationKeys(key_added)
        adata.obs[keys.celltype] = self.labels
        adata.obs[keys.celltype_raw] = self.labels_raw
        adata.obs[keys.confidence] = self.confidence.astype(np.float32)
        adata.obs[keys.novelty] = self.novelty_score.astype(np.float32)
        if self.majority_voting is not None:
            adata.obs[keys.over_clustering] = pd.Categorical(self.over_clustering)
            adata.obs[keys.majority_voting] = self.majority_voting
        adata.obsm[keys.probabilities] = self.probabilities.astype(np.float32)
        adata.obsm[keys.embedding] = self.embedding.astype(np.float32)
        adata.uns[keys.classes] = list(self.classes)
        adata.uns[keys.threshold] = float("nan") if self.threshold is None else float(self.threshold)
        adata.uns[keys.novelty] = json.dumps(self.rule.to_dict())
        adata.uns[keys.report] = annotation_record(self.model, self.preprocessing, self.rechecked, self.recheck_margin)
        return adata

    def to_table(self, key_added: str = "scbert") -> pd.DataFrame:
        """One row per cell (index ``cell``): label, confidence, novelty, top label, majority
        voting (when done), and ``p_<class>`` per class."""
        keys = AnnotationKeys(key_added)
        index = pd.Index(self.cell_names, name="cell")
        cols: dict[str, Any] = {keys.celltype: self.labels, keys.confidence: self.confidence.astype(np.float32),
                                keys.novelty: self.novelty_score.astype(np.float32), keys.celltype_raw: self.labels_raw}
        if self.majority_voting is not None:
            cols[keys.majority_voting] = self.majority_voting
        table = pd.DataFrame(cols, index=index)
        probs = pd.DataFrame(self.probabilities.astype(np.float32), index=index, columns=[f"p_{c}" for c in self.classes])
        return pd.concat([table, probs], axis=1)

    def report(self, truth: pd.Series | np.ndarray | None = None) -> tuple[dict[str, Any], list[str]]:
        """Metrics and readable lines; with ``truth`` (known labels, missing ones as NaN/None; a
        Series' name is used in messages) also accuracy and macro-F1 (Unassigned counts as wrong),
        the types the model never saw, and how majority voting scores."""
        metrics, lines = label_report(self.labels, self.confidence, self.classes, self.rule, truth, self.rechecked, self.recheck_margin)
        if self.majority_voting is not None:
            ok, known = known_truth(truth, self.n_cells)
            n_clusters = len(set(self.over_clustering))
            changed = int((self.majority_voting != self.labels).sum())
            metrics["majority_voting"] = {"n_clusters": n_clusters, "changed": changed}
            line = f"majority voting over {n_clusters} over-clusters changed {changed} labels"
            if known is not None:
                acc = float((self.majority_voting[ok] == known).mean())
                metrics["majority_voting"]["accuracy"] = acc
                line += f"; accuracy {acc:.4f}"
            lines.append(line)
        return metrics, lines

    def to_plots(self, folder: Path, truth: pd.Series | np.ndarray | None = None) -> list[Path]:
        """predictions.png (cells per type, novelty scores and the cutoff) and, with ``truth``,
        confusion_matrix.png in ``folder``; returns the files written."""
        return label_plots(folder, self.labels, self.confidence, self.novelty_score, self.rule, self.classes, truth)


def annotation_record(model: str | None, preprocessing: dict[str, Any], rechecked: int | None, margin: float | None = None) -> str:
    """What ``uns['scbert_annotation']`` holds (JSON): the model, the preprocessing report, how many
    cells the float32 re-check re-scored (None: no re-check ran) and its margin."""
    return json.dumps({"model": model, "preprocessing": preprocessing, "rechecked_fp32": rechecked, "recheck_margin": margin},
                      default=str)


def label_report(labels: np.ndarray, confidence: np.ndarray, classes: Sequence[str], rule: NoveltyRule,
                 truth: pd.Series | np.ndarray | None = None, rechecked: int | None = None,
                 margin: float | None = None) -> tuple[dict[str, Any], list[str]]:
    """Metrics and readable lines of an annotation's labels (see :meth:`AnnotationResult.report`);
    ``rechecked``: cells re-scored in float32 after a low-precision pass (:func:`score_cells`), with
    the re-check's ``margin``."""
    name = f"column {truth.name!r}" if isinstance(truth, pd.Series) and truth.name is not None else "the label column"
    metrics, lines = annotation_report(labels, confidence, classes, rule.threshold, truth, name, rule.describe())
    metrics["novelty"] = rule.to_dict()
    if rechecked is not None:
        metrics["rechecked_fp32"] = int(rechecked)
        metrics["recheck_margin"] = margin
        within = "" if margin is None else f" (within {margin:.4g})"
        lines.insert(1, f"{rechecked} of {len(labels)} cells near a decision{within} were scored again in float32 after the low-precision pass")
    return metrics, lines


def label_plots(folder: Path, labels: np.ndarray, confidence: np.ndarray, novelty_score: np.ndarray, rule: NoveltyRule,
                classes: Sequence[str], truth: pd.Series | np.ndarray | None = None) -> list[Path]:
    """predictions.png and, with ``truth``, confusion_matrix.png (see :meth:`AnnotationResult.to_plots`)."""
    from model import plots

    written = [folder / "predictions.png"]
    plots.plot_predictions(labels, novelty_score if rule.score != "softmax" else confidence, rule.threshold, written[0], rule.score)
    ok, known = known_truth(truth, len(labels))
    if known is not None:
        metrics = label_report(labels, confidence, classes, rule, truth)[0]
        written.append(folder / "confusion_matrix.png")
        plots.plot_confusion(known, np.asarray(labels)[ok], written[1], f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    return written


def novelty_rule(ckpt: Checkpoint, novelty: str = "auto", threshold: float | str | None = "auto",
                 reject_rate: float | None = None, whole_query: bool = True) -> tuple[NoveltyRule, Any]:
    """The rule that makes cells Unassigned, and the novelty statistics it needs.

    ``threshold``: ``"auto"`` (the cutoff calibrated at the end of fine-tuning, for ``reject_rate``
    or the rate it was calibrated for), a number (for ``softmax`` the top probability below which
    a cell is Unassigned, as published; for the others the score above which it is), or None
    (never). ``novelty``: a score of :data:`model.novelty.SCORES`, or ``"auto"``: the checkpoint's
    default with ``threshold="auto"``, ``softmax`` with a number. A checkpoint fine-tuned before
    novelty calibration existed falls back to the published rule (top probability < 0.5).

    The ``query_*`` scores compare the whole query with the training cells: their calibrated cutoff
    is set once the query is scored (:func:`query_rule`; until then the rule's cutoff is None).
    ``whole_query=False`` (a query annotated a chunk at a time): the default falls back to
    ``pca_mahalanobis``, and asking for a ``query_*`` score is an error."""
    from model.novelty import DEFAULT_SCORE, PCA_SCORES, QUERY_COMBINED_PARTS, QUERY_SCORES, SCORES, read_novelty_record

    stats, cal = read_novelty_record(ckpt.novelty)
    if novelty != "auto" and novelty not in SCORES:
        raise InputError(f"--novelty must be auto or one of {SCORES}, got {novelty!r}")
    if novelty in QUERY_SCORES and not whole_query:
        raise InputError(f"--novelty {novelty} compares the whole query with the training cells, and this query is annotated a chunk "
                         f"at a time (--backed, or under torchrun): read it whole, or choose --novelty pca_mahalanobis")
    if threshold is None:
        return NoveltyRule(novelty if novelty != "auto" else "softmax", None), stats
    model_name = ckpt.source or "the model"
    query_ready = (stats is not None and stats.density is not None and stats.density.calibrations is not None and cal is not None
                   and len(stats.density.calibrations[0]) == cal.n)
    if threshold == "auto":
        if cal is None:
            log.info("%s has no novelty calibration (fine-tuned before it existed): using the published rule, Unassigned when the "
                     "top probability is below 0.5", model_name)
            if novelty not in ("auto", "softmax"):
                raise InputError(f"--novelty {novelty} needs the calibration that fine-tuning now stores: give a --threshold, or "
                                 f"fine-tune the model again")
            return PUBLISHED_RULE, stats
        score = (ckpt.novelty or {}).get("default", DEFAULT_SCORE) if novelty == "auto" else novelty
        rate = cal.reject_rate if reject_rate is None else reject_rate
        if score in QUERY_SCORES:
            usable = query_ready and (score == "query_density" or (stats.pca is not None and QUERY_COMBINED_PARTS[0] in cal.scores))
            if usable and whole_query:
                return NoveltyRule(score, None, rate), stats  # the cutoff: query_rule, once the query is scored
            if novelty != "auto":
                raise InputError(f"--novelty {score}: {model_name} was fine-tuned before that score existed: choose one of "
                                 f"{sorted(cal.thresholds)}, or fine-tune the model again")
            log.info("novelty score %s: %s; using pca_mahalanobis", score,
                     "the query is annotated a chunk at a time" if usable else "the model has no statistics for it")
            score = "pca_mahalanobis"
        if novelty == "auto" and score not in cal.thresholds:  # a record older than its package's default score
            score = next(s for s in ("pca_mahalanobis", "mahalanobis", "softmax") if s in cal.thresholds)
        if score not in cal.thresholds:
            raise InputError(f"--novelty {score}: {model_name} was calibrated before that score existed (it has "
                             f"{sorted(cal.thresholds)}): choose one of those, or fine-tune the model again")
        return NoveltyRule(score, cal.threshold(score, rate), rate), stats
    t = float(threshold)
    score = "softmax" if novelty == "auto" else novelty
    if score == "softmax":
        if not 0.0 <= t <= 1.0:
            raise InputError(f"a softmax threshold is a probability between 0 and 1, got {t}")
        return NoveltyRule.published(t), stats
    needs_pca = score in (*PCA_SCORES, "combined", "query_combined")
    missing = (stats is None or (needs_pca and stats.pca is None) or (score == "combined" and stats.combination is None)
               or (score in QUERY_SCORES and not query_ready))
    if score in ("mahalanobis", "knn", *PCA_SCORES, "combined", *QUERY_SCORES) and missing:
        raise InputError(f"--novelty {score} needs the training statistics and calibration that fine-tuning now stores: fine-tune the "
                         f"model again, or use --novelty softmax or energy")
    return NoveltyRule(score, t), stats


def query_rule(rule: NoveltyRule, stats: Any, expression: Any, scores: dict[str, np.ndarray],
               fall_back: bool = False) -> NoveltyRule:
    """For a rule on a ``query_*`` score: that score of the query cells (``expression``, the model's
    input matrix; added to ``scores``, which must hold the other scores of the cells) and, for a
    calibrated rule, its cutoff: the conformal threshold of the calibration cells scored in the same
    neighbour graph. When the query as a whole differs from the training cells
    (:func:`model.novelty.query_shift` above ``QUERY_SHIFT_SHARE``: another batch, technology or
    tissue), the score would reject most known cells: with ``fall_back`` (the default rule) a
    calibrated rule becomes ``pca_mahalanobis`` at the same reject rate, else a warning says so.
    Other rules are returned as they are."""
    from model.novelty import MIN_QUERY_CELLS, QUERY_SCORES, QUERY_SHIFT_SHARE, conformal_threshold, query_scores, query_shift

    if rule.score not in QUERY_SCORES:
        return rule
    if stats is None or stats.density is None or stats.density.calibrations is None or stats.calibration is None:
        raise InputError(f"--novelty {rule.score} needs the statistics that fine-tuning now stores: fine-tune the model again, or "
                         f"use --novelty pca_mahalanobis")
    n = expression.shape[0]
    if n < MIN_QUERY_CELLS:
        log.warning("%s compares the query's density with the training cells': with %d cells (< %d) a type missing from training "
                    "can hardly make a dense region, so few novel cells will be found; annotate more cells at once, or use "
                    "--novelty pca_mahalanobis", rule.score, n, MIN_QUERY_CELLS)
    q, c = query_scores(stats.density, expression, scores, stats.calibration.scores)
    scores.update(q)
    shift = query_shift(q["query_density"], c["query_density"])
    if shift > QUERY_SHIFT_SHARE:
        why = (f"{shift:.0%} of the query cells are denser around them than the median validation cell (about 50-65% when the "
               f"query comes from the training data's batch): the query as a whole differs from the training cells (another "
               f"batch, technology or tissue), and {rule.score} cannot tell a novel type from that")
        if fall_back and rule.reject_rate is not None:
            log.info("novelty: %s; using pca_mahalanobis instead", why)
            return NoveltyRule("pca_mahalanobis", stats.calibration.threshold("pca_mahalanobis", rule.reject_rate), rule.reject_rate)
        log.warning("novelty: %s: most cells will be Unassigned; --novelty pca_mahalanobis does not depend on the query as a whole", why)
    if rule.reject_rate is None or rule.cutoff is not None:
        return rule
    return replace(rule, cutoff=conformal_threshold(c[rule.score], rule.reject_rate))


def annotate(
    adata: ad.AnnData,
    model: str | Path | Checkpoint,
    threshold: float | str | None = "auto",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    options: ExecutionOptions | None = None,
    pooling: str = "mean",
    progress: bool = True,
    num_workers: int = 0,
    species: str = "auto",
    novelty: str = "auto",
    reject_rate: float | None = None,
    recheck_margin: float | str | None = "auto",
) -> AnnotationResult:
    """Annotate the cells of ``adata`` (raw counts or log-normalised; every cell kept, in order)
    with a fine-tuned checkpoint: preprocessed as the model's inputs were, aligned to its genes,
    scored in batches (``options``: precision and speed switches of the network), with every
    novelty score the checkpoint allows computed in the same pass; ``threshold``, ``novelty`` and
    ``reject_rate`` choose the rule (:func:`novelty_rule`). Under bf16/fp16 ``options``, cells near a
    decision are re-scored in float32 (:func:`score_cells`; ``recheck_margin``: a number, None/0 for
    no re-check, or "auto", see :func:`resolve_recheck_margin`)."""
    import time

    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    if not ckpt.is_classifier:
        raise InputError(f"{ckpt.source or 'the model'} is a pretrained (not fine-tuned) model: it cannot name cell types; fine-tune it with finetune.py first")
    rule, stats = novelty_rule(ckpt, novelty, threshold, reject_rate)
    margin = resolve_recheck_margin(recheck_margin, ckpt, options, rule)
    t0 = time.time()
    prepared, rep = ckpt.prepare(adata, what="the query", species=species)
    net = ckpt.build_model(options)
    tune_allocator()
    out, scores, rechecked = score_cells(net, CellDataset(prepared.X, ckpt.config.bin_num), stats, rule, batch_size, torch.device(device),
                                         pooling, progress, num_workers, margin)
    rule = query_rule(rule, stats, prepared.X, scores, fall_back=novelty == "auto")
    rechecked_fp32 = rechecks(net.options, margin)
    return AnnotationResult(probabilities=out["probs"], classes=list(ckpt.classes or []), embedding=out["embedding"], rule=rule,
                            cell_names=list(map(str, adata.obs_names)), novelty=scores, model=ckpt.source,
                            preprocessing=rep.to_dict(), seconds=time.time() - t0,
                            rechecked=rechecked if rechecked_fp32 else None, recheck_margin=margin if rechecked_fp32 else None,
                            expression=prepared.X)


def embed(adata: ad.AnnData, model: str | Path | Checkpoint, pooling: str = "mean", batch_size: int = 16,
          device: str | torch.device = "cpu", options: ExecutionOptions | None = None, progress: bool = True,
          species: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Cell embeddings (cells x dim, in order, every cell kept) of ``adata`` from any of our
    checkpoints, pretrained or fine-tuned, with the preprocessing report."""
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    prepared, rep = ckpt.prepare(adata, species=species)
    net = ckpt.build_model(options)
    tune_allocator()
    return embed_cells(net, CellDataset(prepared.X, ckpt.config.bin_num), batch_size, torch.device(device), pooling, progress), rep.to_dict()
