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
from dataclasses import dataclass, field
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

    def obs(self) -> tuple[str, ...]:
        return self.celltype, self.confidence

    def obsm(self) -> tuple[str, ...]:
        return self.probabilities, self.embedding

    def uns(self) -> tuple[str, ...]:
        return self.classes, self.threshold, self.report


def assign_labels(probs: np.ndarray, classes: Sequence[str], threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidence) of each cell: the top class, or ``Unassigned`` when its probability
    (the confidence) is below ``threshold`` (None: never Unassigned)."""
    classes = np.asarray(classes, dtype=object)
    conf = probs.max(axis=1)
    labels = classes[probs.argmax(axis=1)].astype(str)
    if threshold is not None:
        labels = np.where(conf >= threshold, labels, UNASSIGNED)
    return labels.astype(str), conf


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


def _probabilities(embed: bool, pooling: str) -> BatchFn:
    def fn(model: ScBERT, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        h = model.encode(tokens)
        out = {"probs": torch.softmax(model.to_out(h).float(), dim=-1)}
        if embed:
            out["embedding"] = pool_encodings(h, tokens, pooling)
        return out
    return fn


def predict(model: ScBERT, ds: CellDataset, batch_size: int, device: torch.device, embed: bool = False, pooling: str = "mean",
            progress: bool = True, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (cells x classes) and, with ``embed``, cell embeddings (cells x dim),
    in dataset order, from one encoder pass per batch."""
    parts = [out for _, out in run_batches(model, ds, _probabilities(embed, pooling), batch_size, device, progress=progress,
                                           num_workers=num_workers)]
    probs = torch.cat([p["probs"] for p in parts]).numpy()
    return probs, (torch.cat([p["embedding"] for p in parts]).numpy() if embed else None)


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
    probabilities, the label (``Unassigned`` below ``threshold``) and its confidence, and the
    embedding; plus the model's classes and the preprocessing report."""

    probabilities: np.ndarray  # cells x classes
    classes: list[str]
    embedding: np.ndarray  # cells x dim
    threshold: float
    cell_names: list[str]
    model: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # preprocessing and model included

    def __post_init__(self) -> None:
        self.labels, self.confidence = assign_labels(self.probabilities, self.classes, self.threshold)

    @property
    def n_cells(self) -> int:
        return len(self.cell_names)

    def to_adata(self, adata: ad.AnnData, key_added: str = "scbert") -> ad.AnnData:
        """Write the annotation into ``adata`` (in place; the same cells, in order) under the keys
        of :class:`AnnotationKeys` and return it."""
        if adata.n_obs != self.n_cells:
            raise ValueError(f"the annotation has {self.n_cells} cells, the AnnData {adata.n_obs}")
        keys = AnnotationKeys(key_added)
        adata.obs[keys.celltype] = self.labels
        adata.obs[keys.confidence] = self.confidence.astype(np.float32)
        adata.obsm[keys.probabilities] = self.probabilities.astype(np.float32)
        adata.obsm[keys.embedding] = self.embedding.astype(np.float32)
        adata.uns[keys.classes] = list(self.classes)
        adata.uns[keys.threshold] = float(self.threshold)
        adata.uns[keys.report] = json.dumps({"model": self.model, "preprocessing": self.preprocessing}, default=str)
        return adata

    def to_table(self, key_added: str = "scbert") -> pd.DataFrame:
        """One row per cell (index ``cell``): label, confidence, and ``p_<class>`` per class."""
        keys = AnnotationKeys(key_added)
        index = pd.Index(self.cell_names, name="cell")
        table = pd.DataFrame({keys.celltype: self.labels, keys.confidence: self.confidence.astype(np.float32)}, index=index)
        probs = pd.DataFrame(self.probabilities.astype(np.float32), index=index, columns=[f"p_{c}" for c in self.classes])
        return pd.concat([table, probs], axis=1)

    def report(self, truth: pd.Series | np.ndarray | None = None) -> tuple[dict[str, Any], list[str]]:
        """Metrics and readable lines; with ``truth`` (known labels, missing ones as NaN/None; a
        Series' name is used in messages) also accuracy and macro-F1 (Unassigned counts as wrong)
        and the types the model never saw."""
        name = f"column {truth.name!r}" if isinstance(truth, pd.Series) and truth.name is not None else "the label column"
        return annotation_report(self.labels, self.confidence, self.classes, self.threshold, truth, name)

    def to_plots(self, folder: Path, truth: pd.Series | np.ndarray | None = None) -> list[Path]:
        """predictions.png (cells per type, confidences and the threshold) and, with ``truth``,
        confusion_matrix.png in ``folder``; returns the files written."""
        from model import plots

        written = [folder / "predictions.png"]
        plots.plot_predictions(self.labels, self.confidence, self.threshold, written[0])
        ok, labels = known_truth(truth, self.n_cells)
        if labels is not None:
            metrics = self.report(truth)[0]
            written.append(folder / "confusion_matrix.png")
            plots.plot_confusion(labels, self.labels[ok], written[1],
                                 f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
        return written


def annotate(
    adata: ad.AnnData,
    model: str | Path | Checkpoint,
    threshold: float = 0.5,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    options: ExecutionOptions | None = None,
    pooling: str = "mean",
    progress: bool = True,
    num_workers: int = 0,
    species: str = "auto",
) -> AnnotationResult:
    """Annotate the cells of ``adata`` (raw counts or log-normalised; every cell kept, in order)
    with a fine-tuned checkpoint: preprocessed as the model's inputs were, aligned to its genes,
    scored in batches (``options``: precision and speed switches of the network)."""
    import time

    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    if not ckpt.is_classifier:
        raise InputError(f"{ckpt.source or 'the model'} is a pretrained (not fine-tuned) model: it cannot name cell types; fine-tune it with finetune.py first")
    t0 = time.time()
    prepared, rep = ckpt.prepare(adata, what="the query", species=species)
    net = ckpt.build_model(options)
    tune_allocator()
    probs, emb = predict(net, CellDataset(prepared.X, ckpt.config.bin_num), batch_size, torch.device(device), embed=True,
                         pooling=pooling, progress=progress, num_workers=num_workers)
    assert emb is not None
    return AnnotationResult(probabilities=probs, classes=list(ckpt.classes or []), embedding=emb, threshold=float(threshold),
                            cell_names=list(map(str, adata.obs_names)), model=ckpt.source, preprocessing=rep.to_dict(),
                            seconds=time.time() - t0)


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
