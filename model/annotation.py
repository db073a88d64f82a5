"""Annotation as one contract: cells + a fine-tuned checkpoint -> :func:`annotate` ->
:class:`AnnotationResult` (labels, ``Unassigned`` where the novelty rule rejects a cell, confidence,
probabilities, embeddings), which writes itself into an AnnData under the key names of
:class:`AnnotationKeys` (:meth:`~AnnotationResult.to_adata`), a table (:meth:`~AnnotationResult.to_table`),
a report and plots. ``predict.py``, the Python API (:mod:`model.api`), ``attn_analysis.py --umap``
and the accuracy benchmark all go through it; :mod:`model.streaming` annotates a file a chunk at a
time with the same pieces (:func:`score_cells`, :func:`label_table`, :func:`uns_entries`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from data.dataset import CellDataset
from data.io import InputError
from data.labels import as_label_map, map_labels
from model.checkpoint import Checkpoint, load_checkpoint
from model.evaluation import annotation_report, class_map, known_truth, label_map_report, scored_predictions
from model.inference import DEFAULT_INFERENCE, InferenceOptions, embed_cells, predict_outputs
from model.nn.network import POOLINGS, ScBERT
from model.novelty.calibration import COMBINATIONS
from model.novelty.record import NoveltyRecord, output_scores
from model.novelty.rule import (
    DEFAULT_NOVELTY,
    UNASSIGNED,
    NoveltyRule,
    NoveltySettings,
    assign_labels,
    choose_rule,
    query_rule,
    rejection_report,
)
from model.novelty.scores import EXPRESSION_SCORES, QUERY_COMBINED_PARTS, QUERY_SCORES, softmax_score
from model.recheck import near_decision, rechecks, rescore_in_float32, resolve_recheck_margin
from model.runtime import tune_allocator


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


# What obsm['X_scbert'] holds: "head", the classifier's penultimate features (what its decision uses; types
# separate there: RESULTS.md, "An embedding that separates types"), or a pooling of the final encodings.
EMBEDDINGS = ("head", *POOLINGS)
DEFAULT_EMBEDDING = "head"


# --------------------------------------------------------------------------------------------
# Scoring: one pass for the outputs and the novelty scores, with the float32 re-check
# --------------------------------------------------------------------------------------------


def score_cells(net: ScBERT, ds: CellDataset, record: NoveltyRecord | None, rule: NoveltyRule, options: InferenceOptions,
                pooling: str = DEFAULT_EMBEDDING, recheck_margin: float | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """The model's outputs (see :func:`model.inference.predict_outputs`; ``embedding``: the cell
    embedding ``pooling`` names, one of :data:`EMBEDDINGS`) and the novelty scores the rule needs
    (``softmax`` and ``energy`` always; others when the rule uses them), from one pass. After a
    bf16/fp16 pass, the cells :func:`model.recheck.near_decision` finds are run again in float32 and
    their outputs replaced, so that labels match a float32 run (``recheck_margin`` None or 0: no
    re-check). Returns outputs, scores and the number of cells re-checked."""
    if pooling not in EMBEDDINGS:
        raise InputError(f"pooling must be one of {EMBEDDINGS}, got {pooling!r}")
    wanted = {"softmax", "energy", rule.score, *COMBINATIONS.get(rule.score, ((),))[0]}  # a combined score: its parts too
    if rule.score in QUERY_SCORES:
        wanted.add(QUERY_COMBINED_PARTS[0])  # for query_combined and query_rule's fall-back; the query score itself: query_rule
    head = pooling == "head"
    features = head or (record is not None and record.classes is not None and bool(wanted & {"mahalanobis", "knn"}))
    expression = bool(wanted & {*EXPRESSION_SCORES, *COMBINATIONS})  # the pca_* scores (and so the combined ones) read the input matrix

    def run(dataset: CellDataset, show: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        # older models' knn reference is of mean-pooled encodings: with the head's features as the embedding, the pass pools by mean
        out = predict_outputs(net, dataset, options.replace(progress=show), embed=True, features=features,
                              pooling="mean" if head else pooling)
        if not out:
            return out, {}
        scores = output_scores(out, record, which=wanted, expression=dataset.X if expression else None)
        if head:
            out["embedding"] = out["features"]
        return out, scores

    out, scores = run(ds, options.progress)
    if not (rechecks(net.options, recheck_margin) and out):
        return out, scores, 0
    rows = np.flatnonzero(near_decision(out["probs"], rule, scores.get(rule.score), recheck_margin))
    again = rescore_in_float32(net, rows, lambda: run(ds.subset(rows), False))
    if again is not None:
        for k, v in again[0].items():
            out[k][rows] = v
        for k, v in again[1].items():
            scores[k][rows] = v
    return out, scores, len(rows)


# --------------------------------------------------------------------------------------------
# What an annotation writes: the table, the uns entries, the report and the plots
# --------------------------------------------------------------------------------------------


def uns_value(obj: Any) -> Any:
    """``obj`` as anndata writes it into ``uns`` of an ``.h5ad`` and reads it back alike: dicts (keys
    as text) of numbers, text, booleans, None and arrays; a list of one kind becomes an array, a mixed
    list (or a list of dicts, which h5py cannot store) its JSON text."""
    obj = json.loads(json.dumps(obj, default=str))  # numpy scalars, paths and the like as plain values
    return _uns(obj)


def _uns(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _uns(v) for k, v in obj.items()}
    if isinstance(obj, list):
        if all(isinstance(v, str) for v in obj):
            return np.array(obj, dtype=object)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj) or all(isinstance(v, bool) for v in obj):
            return np.array(obj)
        return json.dumps(obj)
    return obj


EMBEDDING_MEANINGS = {"head": "the classifier's penultimate features (of the first head of an ensemble)",
                      "mean": "the final encodings averaged over all genes", "expressed": "the final encodings averaged over the expressed genes"}


def annotation_record(model: str | None, preprocessing: dict[str, Any], rechecked: int | None, margin: float | None, embedding: str,
                      embedding_key: str) -> dict[str, Any]:
    """What ``uns['scbert_annotation']`` holds: the model, the preprocessing report, how many cells
    the float32 re-check re-scored (None: no re-check ran) and its margin, and which cell embedding
    ``obsm[embedding_key]`` holds."""
    return uns_value({"model": model, "preprocessing": preprocessing, "rechecked_fp32": rechecked, "recheck_margin": margin,
                      "embedding": embedding, "embedding_key": embedding_key, "embedding_meaning": EMBEDDING_MEANINGS.get(embedding, embedding)})


def uns_entries(keys: AnnotationKeys, classes: Sequence[str], rule: NoveltyRule, model: str | None, preprocessing: dict[str, Any],
                rechecked: int | None, margin: float | None, embedding: str) -> dict[str, Any]:
    """The ``uns`` entries of an annotation: classes, threshold, the rule and the run's record (as
    dicts, which ``.h5ad`` files store as groups)."""
    return {keys.classes: np.array(list(classes), dtype=object),
            keys.threshold: float("nan") if rule.threshold is None else float(rule.threshold),
            keys.novelty: uns_value(rule.to_dict()), keys.report: annotation_record(model, preprocessing, rechecked, margin, embedding, keys.embedding)}


def label_table(keys: AnnotationKeys, cell_names: Sequence[str], labels: np.ndarray, confidence: np.ndarray, novelty: np.ndarray,
                labels_raw: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
                majority_voting: np.ndarray | None = None, truth: dict[str, Sequence[Any]] | None = None) -> pd.DataFrame:
    """One row per cell (index ``cell``): the known labels ``truth`` (column name -> values, e.g.
    the --label-key column and its label-mapped version) when given, label, confidence, novelty,
    top label, majority voting (when done), and ``p_<class>`` per class: the ``--csv`` table."""
    index = pd.Index(list(cell_names), name="cell")
    cols: dict[str, Any] = {name: np.asarray(values, dtype=object) for name, values in (truth or {}).items()}
    # the novelty score in float64: "score > cutoff" read back from the file gives exactly the labels written
    cols.update({keys.celltype: labels, keys.confidence: np.asarray(confidence, dtype=np.float32),
                 keys.novelty: np.asarray(novelty, dtype=np.float64), keys.celltype_raw: labels_raw})
    if majority_voting is not None:
        cols[keys.majority_voting] = majority_voting
    table = pd.DataFrame(cols, index=index)
    probs = pd.DataFrame(np.asarray(probabilities, dtype=np.float32), index=index, columns=[f"p_{c}" for c in classes])
    return pd.concat([table, probs], axis=1)


def known_labels(truth: pd.Series | np.ndarray | None, label_map: Mapping[str, str] | str | Path | None, n_cells: int
                 ) -> pd.Series | None:
    """The known labels as a Series (missing ones as NaN), renamed through ``label_map`` (a dict, or
    a file of two columns read by :func:`data.labels.read_label_map`) when one is given."""
    if truth is None:
        return None
    series = truth if isinstance(truth, pd.Series) else pd.Series(list(truth), name=None)
    if len(series) != n_cells:
        raise InputError(f"{len(series)} known labels for {n_cells} annotated cells")
    mapping = as_label_map(label_map)
    if mapping is None:
        return series.reset_index(drop=True)
    return map_labels(series.reset_index(drop=True), mapping)


def label_report(labels: np.ndarray, confidence: np.ndarray, classes: Sequence[str], rule: NoveltyRule,
                 truth: pd.Series | np.ndarray | None = None, rechecked: int | None = None,
                 margin: float | None = None, label_map: Mapping[str, str] | str | Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """Metrics and readable lines of an annotation's labels (see :meth:`Annotation.report`);
    ``rechecked``: cells re-scored in float32 after a low-precision pass, with the re-check's ``margin``;
    ``label_map``: the query's label names -> the model's classes (see :func:`known_labels`)."""
    name = f"column {truth.name!r}" if isinstance(truth, pd.Series) and truth.name is not None else "the label column"
    label_map = as_label_map(label_map)  # a file is read once, not by each of the steps below
    mapped = known_labels(truth, label_map, len(labels))
    scored, scored_classes = scored_predictions(labels, classes, label_map)
    metrics, lines = annotation_report(labels, confidence, classes, rule.threshold, None, name, rule.describe())
    if mapped is not None:
        scores, score_lines = annotation_report(scored, confidence, scored_classes, rule.threshold, mapped, name, rule.describe())
        metrics.update({k: v for k, v in scores.items() if k not in metrics})
        lines += score_lines[1:]
    if label_map is not None and mapped is not None:
        metrics["label_map"], map_lines = label_map_report(known_labels(truth, None, len(labels)), mapped, scored_classes)
        renamed = class_map(label_map, classes)
        if renamed:
            metrics["label_map"]["model_classes_renamed"] = renamed
            map_lines.insert(1, f"label map: also renames {len(renamed)} of the model's classes for scoring "
                                f"({', '.join(f'{a} -> {b}' for a, b in list(renamed.items())[:4])}{', ...' if len(renamed) > 4 else ''})")
        lines[1:1] = map_lines
    metrics["novelty"] = rule.to_dict()
    rejected, rejected_lines = rejection_report(labels, rule)
    metrics.update(rejected)
    lines[1:1] = rejected_lines
    if rechecked is not None:
        metrics["rechecked_fp32"] = int(rechecked)
        metrics["recheck_margin"] = margin
        within = "" if margin is None else f" (within {margin:.4g})"
        lines.insert(1, f"{rechecked} of {len(labels)} cells near a decision{within} were scored again in float32 after the low-precision pass")
    return metrics, lines


class Annotation:
    """What every annotation has, per cell (in input order): ``labels`` (``Unassigned`` where the
    novelty ``rule`` rejects the cell), ``labels_raw`` (the top class), ``confidence`` and
    ``novelty_score`` (the rule's score); the model's ``classes``; and the report and plots they
    make. Shared by :class:`AnnotationResult` (in memory) and
    :class:`model.streaming.StreamedAnnotation` (written to disk a chunk at a time)."""

    labels: np.ndarray
    labels_raw: np.ndarray
    confidence: np.ndarray
    novelty_score: np.ndarray
    classes: list[str]
    rule: NoveltyRule
    rechecked: int | None  # cells re-scored in float32 after a bf16/fp16 pass (None: no re-check ran)
    recheck_margin: float | None  # the margin of that re-check

    @property
    def n_cells(self) -> int:
        return len(self.labels)

    @property
    def threshold(self) -> float | None:
        return self.rule.threshold

    def report(self, truth: pd.Series | np.ndarray | None = None,
               label_map: Mapping[str, str] | str | Path | None = None) -> tuple[dict[str, Any], list[str]]:
        """Metrics and readable lines; with ``truth`` (known labels, missing ones as NaN/None; a
        Series' name is used in messages) also accuracy and macro-F1 (Unassigned counts as wrong)
        and the types the model never saw; ``label_map`` renames the known labels to the model's
        classes first (a dict or a two-column file; ``-`` leaves cells out). When no known label is
        one of the model's classes, no accuracy is given, and the report says so."""
        return label_report(self.labels, self.confidence, self.classes, self.rule, truth, self.rechecked, self.recheck_margin,
                            label_map)

    def to_plots(self, folder: Path, truth: pd.Series | np.ndarray | None = None,
                 label_map: Mapping[str, str] | str | Path | None = None) -> list[Path]:
        """predictions.png (cells per type, novelty scores and the cutoff) and, with ``truth``
        (renamed through ``label_map``), confusion_matrix.png in ``folder``: known labels as rows;
        when none of them is a class of the model, the model's classes and Unassigned as columns.
        Returns the files written."""
        from model import plots

        rule, label_map = self.rule, as_label_map(label_map)  # the file read once
        written = [folder / "predictions.png"]
        plots.plot_predictions(self.labels, self.novelty_score if rule.score != "softmax" else self.confidence, rule.threshold,
                               written[0], rule.score)
        ok, known = known_truth(known_labels(truth, label_map, self.n_cells), self.n_cells)
        if known is not None:
            metrics = label_report(self.labels, self.confidence, self.classes, rule, truth, label_map=label_map)[0]
            written.append(folder / "confusion_matrix.png")
            if "accuracy" in metrics:
                plots.plot_confusion(known, scored_predictions(self.labels, self.classes, label_map)[0][ok], written[1],
                                     f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
            else:
                plots.plot_confusion(known, np.asarray(self.labels)[ok], written[1], "query labels vs the model's classes",
                                     columns=[*self.classes, UNASSIGNED])
        return written


@dataclass
class AnnotationResult(Annotation):
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
    embedding_name: str = DEFAULT_EMBEDDING  # which cell embedding ``embedding`` is (one of EMBEDDINGS)
    expression: Any = field(default=None, repr=False)  # the prepared cells x genes matrix, for over-clustering on expression

    def __post_init__(self) -> None:
        if self.rule.cutoff is not None and self.rule.score not in self.novelty and self.rule.score != "softmax":
            raise ValueError(f"the rule's score {self.rule.score!r} was not computed")
        self.labels, self.labels_raw, self.confidence = assign_labels(self.probabilities, self.classes, self.rule,
                                                                      self.novelty.get(self.rule.score))

    @property
    def novelty_score(self) -> np.ndarray:
        """The score the rule uses, per cell (1 - confidence for softmax)."""
        return self.novelty[self.rule.score] if self.rule.score in self.novelty else softmax_score(self.probabilities)

    def vote(self, clusters: Sequence[Any] | None = None, seed: int = 0, basis: str = "expression", voting: str = "cautious",
             resolution: float | None = None) -> AnnotationResult:
        """Majority voting: each cell gets its cluster's label only when it is unsure and the cluster
        nearly unanimous (``voting="cautious"``, the default, :func:`model.majority_voting.cautious_vote`),
        the top class of its probabilities averaged half and half with its cluster's mean
        (``"soft"``: confident cells keep their label), or the most common label of its cluster
        (``"hard"``, CellTypist's). Clusters: ``clusters`` given, or Leiden over-clusters of the
        cells' expression PCA (``basis="expression"``) or of the scBERT embedding (``"embedding"``)."""
        from model.majority_voting import OVER_CLUSTERING_BASES, VOTING_RULES, expression_pcs, over_cluster, vote

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
        self.majority_voting = vote(voting, self.labels, self.probabilities, self.classes, self.over_clustering)
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
        adata.obs[keys.novelty] = self.novelty_score.astype(np.float64)  # float64: "score > cutoff" from the file gives the labels
        if self.majority_voting is not None:
            adata.obs[keys.over_clustering] = pd.Categorical(self.over_clustering)
            adata.obs[keys.majority_voting] = self.majority_voting
        adata.obsm[keys.probabilities] = self.probabilities.astype(np.float32)
        adata.obsm[keys.embedding] = self.embedding.astype(np.float32)
        adata.uns.update(uns_entries(keys, self.classes, self.rule, self.model, self.preprocessing, self.rechecked, self.recheck_margin,
                                     self.embedding_name))
        return adata

    def to_table(self, key_added: str = "scbert", truth: dict[str, Sequence[Any]] | None = None) -> pd.DataFrame:
        """One row per cell (index ``cell``): the known labels ``truth`` (column name -> one value
        per cell) when given, label, confidence, novelty, top label, majority voting (when done),
        and ``p_<class>`` per class."""
        return label_table(AnnotationKeys(key_added), self.cell_names, self.labels, self.confidence, self.novelty_score,
                           self.labels_raw, self.probabilities, self.classes, self.majority_voting, truth)

    def report(self, truth: pd.Series | np.ndarray | None = None,
               label_map: Mapping[str, str] | str | Path | None = None) -> tuple[dict[str, Any], list[str]]:
        """:meth:`Annotation.report`, and how majority voting scores when it was done."""
        label_map = as_label_map(label_map)  # the file read once
        metrics, lines = super().report(truth, label_map)
        if self.majority_voting is not None:
            ok, known = known_truth(known_labels(truth, label_map, self.n_cells), self.n_cells)
            if "accuracy" not in metrics:
                known = None
            n_clusters = len(set(self.over_clustering))
            changed = int((self.majority_voting != self.labels).sum())
            metrics["majority_voting"] = {"n_clusters": n_clusters, "changed": changed}
            line = f"majority voting over {n_clusters} over-clusters changed {changed} labels"
            if known is not None:
                acc = float((scored_predictions(self.majority_voting, self.classes, label_map)[0][ok] == known).mean())
                metrics["majority_voting"]["accuracy"] = acc
                line += f"; accuracy {acc:.4f}"
            lines.append(line)
        return metrics, lines


# --------------------------------------------------------------------------------------------
# The entry points: annotate and embed an AnnData
# --------------------------------------------------------------------------------------------


def fine_tuned(model: str | Path | Checkpoint) -> Checkpoint:
    """The checkpoint ``model`` (loaded when a path), refused when it cannot name cell types."""
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    if not ckpt.is_classifier:
        raise InputError(f"{ckpt.source or 'the model'} is a pretrained (not fine-tuned) model: it cannot name cell types; "
                         f"fine-tune it with finetune.py first")
    return ckpt


def annotate(adata: ad.AnnData, model: str | Path | Checkpoint, novelty: NoveltySettings = DEFAULT_NOVELTY,
             options: InferenceOptions = DEFAULT_INFERENCE, species: str = "auto", pooling: str = DEFAULT_EMBEDDING) -> AnnotationResult:
    """Annotate the cells of ``adata`` (raw counts or log-normalised; every cell kept, in order)
    with a fine-tuned checkpoint: preprocessed as the model's inputs were, aligned to its genes,
    scored in batches as ``options`` say, with the novelty scores the rule needs computed in the
    same pass; ``novelty`` chooses the rule (:func:`model.novelty.rule.choose_rule`). Under
    bf16/fp16, cells near a decision are re-scored in float32 (``options.fp32_recheck``)."""
    ckpt = fine_tuned(model)
    record = ckpt.novelty
    rule = choose_rule(record, novelty, ckpt.source or "the model")
    margin = resolve_recheck_margin(options.fp32_recheck, record, options.execution, rule)
    t0 = time.time()
    prepared, rep = ckpt.prepare(adata, what="the query", species=species)
    net = ckpt.build_model(options.execution)
    tune_allocator()
    out, scores, rechecked = score_cells(net, CellDataset(prepared.X, ckpt.config.bin_num), record, rule, options, pooling, margin)
    rule = query_rule(rule, record, prepared.X, scores, fall_back=novelty.score == "auto")
    checked = rechecks(net.options, margin)
    return AnnotationResult(probabilities=out["probs"], classes=list(ckpt.classes or []), embedding=out["embedding"], rule=rule,
                            cell_names=list(map(str, adata.obs_names)), novelty=scores, model=ckpt.source,
                            preprocessing=rep.to_dict(), seconds=time.time() - t0,
                            rechecked=rechecked if checked else None, recheck_margin=margin if checked else None, embedding_name=pooling,
                            expression=prepared.X)


def embed(adata: ad.AnnData, model: str | Path | Checkpoint, options: InferenceOptions = DEFAULT_INFERENCE, pooling: str = "mean",
          species: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Cell embeddings (cells x dim, in order, every cell kept) of ``adata`` from any of our
    checkpoints, pretrained or fine-tuned, with the preprocessing report."""
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    if pooling == "head" and not ckpt.classes:
        raise InputError("pooling='head' takes the classifier's features: it needs a fine-tuned model; for a pretrained encoder use "
                         "pooling='mean' or 'expressed'")
    prepared, rep = ckpt.prepare(adata, species=species)
    net = ckpt.build_model(options.execution)
    tune_allocator()
    ds = CellDataset(prepared.X, ckpt.config.bin_num)
    if pooling == "head":
        return predict_outputs(net, ds, options, features=True)["features"], rep.to_dict()
    return embed_cells(net, ds, options, pooling), rep.to_dict()
