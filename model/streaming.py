"""Annotating an ``.h5ad`` larger than memory: a chunk of cells at a time, across torchrun processes.

:func:`annotate_h5ad` reads the query a chunk at a time (:class:`data.chunks.ChunkedH5ad`),
preprocesses and annotates each chunk exactly as :func:`model.annotation.annotate` does the whole
file (the same :func:`~model.annotation.score_cells`, rule and labels), and writes the output (a
copy of the input plus the keys of :meth:`model.annotation.AnnotationResult.to_adata`, with the same
:func:`~model.annotation.uns_entries` and :func:`~model.annotation.label_table`) a chunk at a time
(:class:`data.chunks.H5adCopy`). Per cell only its label codes, confidence and novelty score stay in
memory (10 bytes), for the report and plots; probabilities and embeddings go to disk as they come.
Under torchrun each process annotates every world-size-th chunk and saves it to a parts folder;
rank 0 assembles the output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data.chunks import ChunkedH5ad, H5adCopy
from data.dataset import CellDataset
from data.io import DEFAULT_SOURCE, CellSource, atomic_path
from model import distributed
from model.annotation import DEFAULT_EMBEDDING, Annotation, AnnotationKeys, fine_tuned, label_table, score_cells, uns_entries
from model.checkpoint import Checkpoint
from model.inference import DEFAULT_INFERENCE, InferenceOptions
from model.novelty.record import NoveltyRecord
from model.novelty.rule import DEFAULT_NOVELTY, UNASSIGNED, NoveltyRule, NoveltySettings, assign_labels, choose_rule
from model.novelty.scores import softmax_score
from model.recheck import rechecks, resolve_recheck_margin
from model.runtime import release_memory, tune_allocator

log = logging.getLogger("scbert")

DEFAULT_CHUNK = 10_000


@dataclass
class StreamedAnnotation(Annotation):
    """What :func:`annotate_h5ad` keeps of an annotation written to disk: per cell the label, the
    top label, confidence and novelty score, and the report and plots they make."""

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


@dataclass
class _Chunks:
    """The chunks of one file and the model that annotates them (one process's share under torchrun)."""

    reader: ChunkedH5ad
    ckpt: Checkpoint
    net: Any
    rule: NoveltyRule
    options: InferenceOptions
    margin: float | None
    species: str
    size: int
    pooling: str = DEFAULT_EMBEDDING

    @property
    def starts(self) -> list[int]:
        return list(range(0, self.reader.n_obs, self.size))

    def stop(self, k: int) -> int:
        return min(self.reader.n_obs, self.starts[k] + self.size)

    def annotate(self, k: int, quiet: bool) -> tuple[dict[str, np.ndarray], Any]:
        """Chunk ``k``'s outputs (probabilities, embedding, label codes, confidence, novelty score,
        cells re-checked) and preprocessing report."""
        start, record = self.starts[k], self.ckpt.novelty
        with _quiet(quiet):
            prepared, rep = self.ckpt.prepare(self.reader.chunk(start, self.stop(k)), what=str(self.reader.path), species=self.species)
        out, scores, rechecked = score_cells(self.net, CellDataset(prepared.X, self.ckpt.config.bin_num), record, self.rule,
                                             self.options.replace(progress=False), self.pooling, self.margin)
        classes = list(self.ckpt.classes or [])
        labels, raw, conf = assign_labels(out["probs"], classes, self.rule, scores.get(self.rule.score))
        score = scores[self.rule.score] if self.rule.score in scores else softmax_score(out["probs"])
        code = {c: i for i, c in enumerate([*classes, UNASSIGNED])}
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


def _in_order(chunks: _Chunks, annotated: Iterator[dict[str, np.ndarray]], mine: list[int], parts: Path) -> Iterator[dict[str, np.ndarray]] | None:
    """Every chunk's outputs in file order: this process's own, or under torchrun all processes'
    (each saves its chunks to ``parts``; None on the processes other than rank 0)."""
    info = distributed.current()
    if not info.enabled:
        return annotated
    if info.is_main:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
    distributed.barrier()
    for k, part in zip(mine, annotated):
        np.savez(parts / f"chunk{k:06d}.npz", **part)
    distributed.barrier()
    if not info.is_main:
        return None
    return (dict(np.load(parts / f"chunk{k:06d}.npz")) for k in range(len(chunks.starts)))


def _write(chunks: _Chunks, parts: Iterator[dict[str, np.ndarray]], path: Path, out: Path, csv: Path | None, keys: AnnotationKeys,
           first_report: Callable[[], Any], truth: dict[str, np.ndarray] | None = None
           ) -> tuple[dict[str, np.ndarray], dict[str, Any], int | None]:
    """Write the output .h5ad (and the table ``csv``, with the known labels ``truth`` of every cell)
    from the chunks' outputs, in order; returns the per-cell arrays kept, the preprocessing report
    and the cells re-checked."""
    classes = list(chunks.ckpt.classes or [])
    names = np.array([*classes, UNASSIGNED], dtype=object)
    n = chunks.reader.n_obs
    kept = {k: np.empty(n, dtype=t) for k, t in (("label", np.int32), ("raw", np.int32), ("confidence", np.float32), ("novelty", np.float32))}
    rechecked = 0
    with atomic_path(out) as tmp_out, contextlib.ExitStack() as stack:
        writer = H5adCopy(path, tmp_out)
        stack.callback(writer.close)
        table = stack.enter_context(atomic_path(csv)) if csv is not None else None
        for k, part in enumerate(parts):
            start, stop = chunks.starts[k], chunks.starts[k] + len(part["label"])
            rechecked += int(part["rechecked"])
            writer.write_rows(keys.probabilities, start, part["probabilities"])
            writer.write_rows(keys.embedding, start, part["embedding"])
            for key, arr in kept.items():
                arr[start:stop] = part[key]
            if table is not None:
                frame = label_table(keys, chunks.reader.obs_names(start, stop), names[part["label"]], part["confidence"], part["novelty"],
                                    names[part["raw"]], part["probabilities"], classes,
                                    truth={name: values[start:stop] for name, values in (truth or {}).items()})
                frame.to_csv(table, mode="w" if k == 0 else "a", header=k == 0)
        prep = first_report().to_dict()
        prep["n_cells_in"] = prep["n_cells_out"] = n
        obs = {keys.celltype: _categorical(kept["label"], names), keys.celltype_raw: _categorical(kept["raw"], names),
               keys.confidence: kept["confidence"], keys.novelty: kept["novelty"]}
        checked = rechecks(chunks.net.options, chunks.margin)
        uns = uns_entries(keys, classes, chunks.rule, chunks.ckpt.source, prep, rechecked if checked else None,
                          chunks.margin if checked else None, chunks.pooling)
        writer.finish(obs, uns)
    return kept, prep, rechecked if checked else None


def annotate_h5ad(path: str | Path, ckpt: Checkpoint, out: str | Path, *, source: CellSource = DEFAULT_SOURCE,
                  novelty: NoveltySettings = DEFAULT_NOVELTY, options: InferenceOptions = DEFAULT_INFERENCE,
                  pooling: str = DEFAULT_EMBEDDING, chunk_size: int = DEFAULT_CHUNK, csv: str | Path | None = None, key_added: str = "scbert",
                  species: str = "auto", truth: dict[str, Any] | None = None) -> StreamedAnnotation | None:
    """Annotate the ``.h5ad`` at ``path`` a chunk of ``chunk_size`` cells at a time into ``out``
    (and the table ``csv``, with the known labels ``truth``: column name -> one value per cell),
    with the same outputs as annotating it in memory. Under torchrun every process calls it; rank 0
    writes the outputs and returns the result, the others None."""
    t0 = time.time()
    ckpt = fine_tuned(ckpt)
    record: NoveltyRecord | None = ckpt.novelty
    rule = choose_rule(record, novelty, ckpt.source or "the model", whole_query=False)
    margin = resolve_recheck_margin(options.fp32_recheck, record, options.execution, rule)
    chunk_size = max(1, math.ceil(chunk_size / options.batch_size)) * options.batch_size  # whole batches: the same batches as in memory
    info = distributed.current()
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    reps: list[Any] = []
    with ChunkedH5ad(path, source) as reader:
        net = ckpt.build_model(options.execution)
        tune_allocator()
        chunks = _Chunks(reader, ckpt, net, rule, options, margin, species, chunk_size, pooling)
        mine = list(range(info.rank, len(chunks.starts), info.world_size))
        bar = tqdm(total=sum(chunks.stop(k) - chunks.starts[k] for k in mine), desc="annotate", unit="cell",
                   disable=not options.progress or not info.is_main, smoothing=0.1)

        def annotated() -> Iterator[dict[str, np.ndarray]]:
            for k in mine:
                part, rep = chunks.annotate(k, quiet=bool(reps))
                if not reps:
                    reps.append(rep)  # the first chunk's report stands for all (the others differ only in their cell counts)
                release_memory()  # the chunk's matrices are freed: give their heap pages back, or they pile up chunk after chunk
                bar.update(len(part["label"]) * info.world_size)
                yield part

        try:
            ordered = _in_order(chunks, annotated(), mine, parts)
            if ordered is None:
                return None
            kept, prep, rechecked = _write(chunks, ordered, Path(path), out, None if csv is None else Path(csv), AnnotationKeys(key_added),
                                           lambda: reps[0], {k: np.asarray(v, dtype=object) for k, v in (truth or {}).items()})
        finally:
            bar.close()
            if info.enabled and info.is_main:
                shutil.rmtree(parts, ignore_errors=True)
    names = np.array([*(ckpt.classes or []), UNASSIGNED], dtype=object)
    return StreamedAnnotation(labels=names[kept["label"]], labels_raw=names[kept["raw"]], confidence=kept["confidence"],
                              novelty_score=kept["novelty"], classes=list(ckpt.classes or []), rule=rule, model=ckpt.source,
                              preprocessing=prep, seconds=time.time() - t0, n_chunks=len(chunks.starts), chunk_size=chunk_size,
                              rechecked=rechecked, recheck_margin=margin if rechecked is not None else None)
