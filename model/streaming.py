"""Annotating an ``.h5ad`` larger than memory: a chunk of cells at a time, across torchrun processes.

:func:`annotate_h5ad` reads the query a chunk at a time (:class:`data.chunks.ChunkedH5ad`),
preprocesses and annotates each chunk exactly as :func:`model.inference.annotate` does the whole
file, and writes the output (a copy of the input plus the same keys as
:meth:`model.inference.AnnotationResult.to_adata`) a chunk at a time (:class:`data.chunks.H5adCopy`).
Per cell only its label codes, confidence and novelty score stay in memory (10 bytes), for the
report and plots; probabilities and embeddings go to disk as they come. Under torchrun each process
annotates every world-size-th chunk and saves it to a parts folder; rank 0 assembles the output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from data.chunks import ChunkedH5ad, H5adCopy
from data.dataset import CellDataset
from data.io import DEFAULT_SOURCE, CellSource, InputError, atomic_path
from model import distributed
from model.checkpoint import Checkpoint
from model.evaluation import UNASSIGNED
from model.inference import (
    AnnotationKeys,
    NoveltyRule,
    annotation_record,
    assign_labels,
    label_plots,
    label_report,
    novelty_rule,
    rechecks,
    resolve_recheck_margin,
    score_cells,
)
from model.nn.config import ExecutionOptions
from model.runtime import release_memory, tune_allocator

log = logging.getLogger("scbert")

DEFAULT_CHUNK = 10_000


@dataclass
class StreamedAnnotation:
    """What :func:`annotate_h5ad` keeps of an annotation written to disk: per cell the label,
    the top label, confidence and novelty score (as in :class:`model.inference.AnnotationResult`),
    and the report and plots they make."""

    labels: np.ndarray
    labels_raw: np.ndarray
    confidence: np.ndarray
    novelty_score: np.ndarray
    classes: list[str]
    rule: NoveltyRule
    model: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    n_chunks: int = 0
    chunk_size: int = 0
    rechecked: int | None = None  # cells re-scored in float32 after a bf16/fp16 pass (None: no re-check ran)
    recheck_margin: float | None = None  # the margin of that re-check

    @property
    def n_cells(self) -> int:
        return len(self.labels)

    def report(self, truth: pd.Series | np.ndarray | None = None) -> tuple[dict[str, Any], list[str]]:
        return label_report(self.labels, self.confidence, self.classes, self.rule, truth, self.rechecked, self.recheck_margin)

    def to_plots(self, folder: Path, truth: pd.Series | np.ndarray | None = None) -> list[Path]:
        return label_plots(folder, self.labels, self.confidence, self.novelty_score, self.rule, self.classes, truth)


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """Silence the per-chunk preprocessing messages after the first chunk (they repeat)."""
    if not on:
        yield
        return
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _annotate_chunk(reader: ChunkedH5ad, start: int, stop: int, ckpt: Checkpoint, net: Any, rule: NoveltyRule, stats: Any,
                    batch_size: int, device: torch.device, num_workers: int, species: str, quiet: bool,
                    recheck_margin: float | None) -> tuple[dict[str, np.ndarray], Any]:
    with _quiet(quiet):
        prepared, rep = ckpt.prepare(reader.chunk(start, stop), what=str(reader.path), species=species)
    out, scores, rechecked = score_cells(net, CellDataset(prepared.X, ckpt.config.bin_num), stats, rule, batch_size, device,
                                         progress=False, num_workers=num_workers, recheck_margin=recheck_margin)
    classes = list(ckpt.classes or [])
    labels, raw, conf = assign_labels(out["probs"], classes, rule, scores.get(rule.score))
    score = scores.get(rule.score, 1.0 - conf.astype(np.float64))
    names = np.array([*classes, UNASSIGNED], dtype=object)
    code = {c: i for i, c in enumerate(names)}
    return {
        "probabilities": out["probs"].astype(np.float32), "embedding": out["embedding"].astype(np.float32),
        "label": np.array([code[v] for v in labels], dtype=np.int32), "raw": np.array([code[v] for v in raw], dtype=np.int32),
        "confidence": conf.astype(np.float32), "novelty": np.asarray(score, dtype=np.float32), "rechecked": np.array(rechecked),
    }, rep


def _categorical(codes: np.ndarray, names: np.ndarray) -> pd.Categorical:
    """Codes as the categorical anndata writes for a text column: the values present, in natural order."""
    from natsort import natsorted  # anndata's own order for text columns (it depends on natsort)

    cat = pd.Categorical.from_codes(codes, categories=list(names)).remove_unused_categories()
    return cat.reorder_categories(natsorted(cat.categories))


def annotate_h5ad(
    path: str | Path,
    ckpt: Checkpoint,
    out: str | Path,
    *,
    source: CellSource = DEFAULT_SOURCE,
    threshold: float | str | None = "auto",
    novelty: str = "auto",
    reject_rate: float | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    options: ExecutionOptions | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    csv: str | Path | None = None,
    key_added: str = "scbert",
    species: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    recheck_margin: float | str | None = "auto",
) -> StreamedAnnotation | None:
    """Annotate the ``.h5ad`` at ``path`` a chunk of ``chunk_size`` cells at a time into ``out``
    (and the table ``csv``), with the same outputs as annotating it in memory. Under torchrun
    every process calls it; rank 0 writes the outputs and returns the result, the others None."""
    t0 = time.time()
    if not ckpt.is_classifier:
        raise InputError(f"{ckpt.source or 'the model'} is a pretrained (not fine-tuned) model: it cannot name cell types; "
                         f"fine-tune it with finetune.py first")
    classes = list(ckpt.classes or [])
    names = np.array([*classes, UNASSIGNED], dtype=object)
    keys = AnnotationKeys(key_added)
    rule, stats = novelty_rule(ckpt, novelty, threshold, reject_rate, whole_query=False)
    recheck_margin = resolve_recheck_margin(recheck_margin, ckpt, options, rule)
    chunk_size = max(1, math.ceil(chunk_size / batch_size)) * batch_size  # whole batches: the same batches as in memory
    info = distributed.current()
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    reps: list[Any] = []
    with ChunkedH5ad(path, source) as reader:
        n = reader.n_obs
        starts = list(range(0, n, chunk_size))
        mine = list(range(info.rank, len(starts), info.world_size))
        net = ckpt.build_model(options)
        tune_allocator()
        bar = tqdm(total=sum(min(n, starts[k] + chunk_size) - starts[k] for k in mine), desc="annotate", unit="cell",
                   disable=not progress or not info.is_main, smoothing=0.1)

        def annotated() -> Iterator[dict[str, np.ndarray]]:
            for k in mine:
                part, rep = _annotate_chunk(reader, starts[k], min(n, starts[k] + chunk_size), ckpt, net, rule, stats, batch_size,
                                            torch.device(device), num_workers, species, bool(reps), recheck_margin)
                if not reps:
                    reps.append(rep)  # the first chunk's report stands for all (the others differ only in their cell counts)
                release_memory()  # the chunk's matrices are freed: give their heap pages back, or they pile up chunk after chunk
                bar.update(len(part["label"]) * info.world_size)
                yield part

        try:
            if info.enabled:
                if info.is_main:
                    shutil.rmtree(parts, ignore_errors=True)
                    parts.mkdir(parents=True)
                distributed.barrier()
                for k, part in zip(mine, annotated()):
                    np.savez(parts / f"chunk{k:06d}.npz", **part)
                distributed.barrier()
                if not info.is_main:
                    return None
                chunks: Any = (dict(np.load(parts / f"chunk{k:06d}.npz")) for k in range(len(starts)))
            else:
                chunks = annotated()
            kept = {k: np.empty(n, dtype=t) for k, t in (("label", np.int32), ("raw", np.int32), ("confidence", np.float32),
                                                        ("novelty", np.float32))}
            with atomic_path(out) as tmp_out, contextlib.ExitStack() as stack:
                writer = H5adCopy(path, tmp_out)
                stack.callback(writer.close)
                table = stack.enter_context(atomic_path(csv)) if csv is not None else None
                rechecked = 0
                for k, part in enumerate(chunks):
                    start, stop = starts[k], starts[k] + len(part["label"])
                    rechecked += int(part["rechecked"])
                    writer.write_rows(keys.probabilities, start, part["probabilities"])
                    writer.write_rows(keys.embedding, start, part["embedding"])
                    for key, arr in kept.items():
                        arr[start:stop] = part[key]
                    if table is not None:
                        frame = pd.DataFrame({keys.celltype: names[part["label"]], keys.confidence: part["confidence"],
                                              keys.novelty: part["novelty"], keys.celltype_raw: names[part["raw"]]},
                                             index=pd.Index(reader.obs_names(start, stop), name="cell"))
                        probs = pd.DataFrame(part["probabilities"], index=frame.index, columns=[f"p_{c}" for c in classes])
                        pd.concat([frame, probs], axis=1).to_csv(table, mode="w" if k == 0 else "a", header=k == 0)
                prep = reps[0].to_dict()
                prep["n_cells_in"] = prep["n_cells_out"] = n
                obs = {keys.celltype: _categorical(kept["label"], names), keys.celltype_raw: _categorical(kept["raw"], names),
                       keys.confidence: kept["confidence"], keys.novelty: kept["novelty"]}
                if not rechecks(net.options, recheck_margin):
                    rechecked, recheck_margin = None, None
                uns = {keys.classes: np.array(classes, dtype=object),
                       keys.threshold: float("nan") if rule.threshold is None else float(rule.threshold),
                       keys.novelty: json.dumps(rule.to_dict()), keys.report: annotation_record(ckpt.source, prep, rechecked, recheck_margin)}
                writer.finish(obs, uns)
        finally:
            bar.close()
            if info.enabled and info.is_main:
                shutil.rmtree(parts, ignore_errors=True)
    return StreamedAnnotation(labels=names[kept["label"]], labels_raw=names[kept["raw"]], confidence=kept["confidence"],
                              novelty_score=kept["novelty"], classes=classes, rule=rule, model=ckpt.source, preprocessing=prep,
                              seconds=time.time() - t0, n_chunks=len(starts), chunk_size=chunk_size,
                              rechecked=rechecked, recheck_margin=recheck_margin)
