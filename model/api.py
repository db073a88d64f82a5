"""The Python API: AnnData in, AnnData out, the same keys as the stage scripts.

>>> import anndata as ad
>>> from model import annotate, embed
>>> adata = ad.read_h5ad("query.h5ad")                  # raw counts or log-normalised
>>> annotate(adata, model="runs/finetune/model.pt")     # adds obs/obsm/uns keys, as predict.py
>>> adata.obs["scbert_celltype"].value_counts()
>>> embed(adata, model="runs/pretrain/model.pt")        # obsm["X_scbert"] from any checkpoint

For the result object itself (tables, reports, plots), use :func:`model.annotation.annotate`.
Bad input raises :class:`InputError` (a ``ValueError``) or :class:`CheckpointError` with a message
saying what was wrong and what to do; corrections (mapped gene names, recovered counts...) are
logged as warnings on the ``scbert`` logger and recorded in ``uns``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anndata as ad
import numpy as np

from data.io import CellSource, InputError, select_cells
from data.labels import label_column
from data.preprocess import MIN_GENES, prepare, query_lines
from data.values import parse_log_base
from data.vocab import read_name_list
from model import annotation
from model.annotation import AnnotationKeys, uns_value
from model.checkpoint import Checkpoint, CheckpointError, choose_library_size, load_checkpoint, load_vocab
from model.evaluation import log_report_line
from model.inference import InferenceOptions
from model.memory import check_batch_memory
from model.nn.config import ExecutionOptions
from model.novelty.rule import NoveltySettings
from model.runtime import inference_batch_size, resolve_device, resolve_precision

log = logging.getLogger("scbert")
F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["CheckpointError", "InputError", "annotate", "embed", "load_model", "preprocess"]

ModelLike = str | Path | Checkpoint
Names = list[str] | str | Path | None


# The flags a message of the library may name, as the keyword arguments of this API that do the same.
_FLAG_VALUE = re.compile(r"--(layer|species|novelty|label-key|over-clustering|gene-symbols) (?!or\b|if\b|to\b)([^\s,;:)]+)")
_FLAG = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def python_names(message: str) -> str:
    """``message`` with the command-line flags it names written as this API's keyword arguments
    (``--layer counts`` -> ``layer="counts"``, ``--use-raw`` -> ``use_raw=True``, ``--gene-symbols`` -> ``gene_symbols=``)."""
    message = _FLAG_VALUE.sub(lambda m: f'{m.group(1).replace("-", "_")}="{m.group(2).strip(chr(39) + chr(34))}"', message)
    message = message.replace("--use-raw", "use_raw=True")
    return _FLAG.sub(lambda m: m.group(1).replace("-", "_") + "=", message)


@contextlib.contextmanager
def _argument_names() -> Iterator[None]:
    """Errors of the library as this API's users call it: keyword arguments named, not flags."""
    try:
        yield
    except (InputError, CheckpointError) as e:
        raise type(e)(python_names(str(e))) from None


def _speaks_python(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _argument_names():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _names(x: Names, kind: str) -> list[str] | None:
    return None if x is None else read_name_list(x, kind) if isinstance(x, (str, Path)) else [str(v) for v in x]


@_speaks_python
def load_model(model: ModelLike, genes: Names = None, classes: Names = None) -> Checkpoint:
    """A checkpoint: ours (model.pt) or a published scBERT .pth with its ``genes`` (and ``classes``),
    given as lists or as files with one name per line. Loaded without executing code."""
    if isinstance(model, Checkpoint):
        return model
    return load_checkpoint(model, genes=_names(genes, "genes"), classes=_names(classes, "classes"))


def _device(device: str | Any) -> Any:
    return resolve_device(device) if isinstance(device, str) else device


def _check_adata(adata: Any) -> None:
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"expected an AnnData (cells x genes), got {type(adata).__name__}; read files with anndata.read_h5ad "
                         f"or data.io.read_cells")


def _inference(ckpt: Checkpoint, batch_size: int | str, device: str | Any, precision: str, progress: bool,
               fp32_recheck: float | str | None = "auto") -> InferenceOptions:
    """The inference options of an API call: ``batch_size="auto"`` and ``precision="auto"`` resolved
    as predict.py resolves them, and the batch checked against the free memory."""
    dev = _device(device)
    precision, why = resolve_precision(precision, dev)
    if batch_size == "auto":
        batch_size = inference_batch_size(ckpt.config.seq_len, ckpt.config.dim, dev)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number >= 1 or 'auto', got {batch_size!r}")
    need = check_batch_memory(ckpt.config, batch_size, dev, name="batch_size")
    log.info("precision %s (%s); %s", precision, why, need.describe(batch_size))
    return InferenceOptions(batch_size, dev, progress=progress, execution=ExecutionOptions(precision=precision), fp32_recheck=fp32_recheck)


def _embedding_key(embedding: bool | str, key_added: str) -> str | None:
    if embedding is True:
        return AnnotationKeys(key_added).embedding
    if embedding is False or embedding is None:
        return None
    return str(embedding)


@_speaks_python
def annotate(
    adata: ad.AnnData,
    model: ModelLike,
    *,
    threshold: float | str | None = "auto",
    novelty: str = "auto",
    reject_rate: float | None = None,
    majority_voting: bool = False,
    over_clustering: str | None = None,
    over_clustering_basis: str = "expression",
    voting: str = "cautious",
    label_key: str | None = None,
    label_map: Mapping[str, str] | str | Path | None = None,
    embedding: bool | str = True,
    pooling: str = "head",
    batch_size: int | str = "auto",
    device: str = "auto",
    precision: str = "auto",
    fp32_recheck: float | str | None = "auto",
    species: str = "auto",
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    log_base: str | float | None = "auto",
    key_added: str = "scbert",
    copy: bool = False,
    progress: bool = True,
) -> ad.AnnData:
    """Annotate cells with a fine-tuned model, writing the keys predict.py writes:
    ``obs['scbert_celltype']`` (``Unassigned`` where the novelty rule rejects the cell),
    ``obs['scbert_celltype_raw']`` (the top type), ``obs['scbert_confidence']``, ``obs['scbert_novelty']``,
    ``obsm['scbert_probabilities']`` (columns: ``uns['scbert_classes']``), the cell embeddings of the
    same pass in ``obsm['X_scbert']`` (``embedding``: another obsm key, or False for none; ``pooling``:
    ``"head"``, the classifier's penultimate features, where cell types separate; ``"mean"`` or
    ``"expressed"``, the final encodings averaged over all or expressed genes, as :func:`embed`), ``uns['scbert_threshold']``,
    ``uns['scbert_novelty']`` (the rule, a dict) and ``uns['scbert_annotation']`` (a dict: the model,
    the preprocessing report; with ``label_key`` also ``evaluation``, the accuracy against the known
    labels ``obs[label_key]``, their names renamed to the model's classes by ``label_map``: a dict or
    a two-column file, ``-`` leaving cells out; the report lines are logged). With ``majority_voting``
    also ``obs['scbert_majority_voting']`` and ``obs['scbert_over_clustering']`` (``over_clustering``:
    an obs column, default Leiden clusters of the cells' expression PCA, ``over_clustering_basis="embedding"``:
    of the scBERT embedding; ``voting``: ``"cautious"`` (default) changes only unsure cells of nearly
    unanimous clusters, ``"soft"`` blends each cell's probabilities with its cluster's, ``"hard"`` as CellTypist).

    ``threshold``: ``"auto"`` (calibrated at fine-tuning; the published 0.5 for older models), a
    number (for ``novelty="softmax"``, the default with a number: the top probability below which a
    cell is Unassigned, as published), or None (never). ``novelty``: the score (see
    :mod:`model.novelty`). ``layer``/``use_raw``: read the expression from ``adata.layers[layer]`` or
    ``adata.raw`` instead of ``X`` (as scvi-tools' ``setup_anndata(layer=...)``); ``gene_symbols``: a
    ``var`` column holding the gene names (see :class:`data.io.CellSource`); ``log_base``: the base of
    log-normalised values whose totals cannot be checked (``"auto"``: scanpy's ``uns['log1p']``, else 2).
    ``batch_size`` and ``precision`` ``"auto"``: as predict.py (bf16 where it is known to be faster;
    a batch that would not fit in the free memory is refused). ``fp32_recheck``: with bf16/fp16,
    cells this close to a decision are scored again in float32 (0: never; ``"auto"``: from the error
    measured at fine-tuning, see :func:`model.recheck.resolve_recheck_margin`). Every cell is kept,
    in order. Modifies ``adata`` in place and returns it (a copy with ``copy``).
    """
    _check_adata(adata)
    if pooling not in annotation.EMBEDDINGS:
        raise InputError(f"pooling must be one of {annotation.EMBEDDINGS}, got {pooling!r}")
    if label_map is not None and label_key is None:
        raise InputError("label_map renames the known labels of label_key: give label_key too")
    truth = label_column(adata, label_key, "the AnnData") if label_key is not None else None
    ckpt = load_model(model)
    target = adata.copy() if copy else adata
    clusters = None
    if over_clustering is not None:
        if over_clustering not in adata.obs:
            raise InputError(f"over_clustering {over_clustering!r} is not a column of the AnnData; available: {list(adata.obs.columns)}")
        clusters = adata.obs[over_clustering].astype(str).to_numpy()
    cells = select_cells(target, CellSource(layer, use_raw, gene_symbols, parse_log_base(log_base)), "the AnnData")
    options = _inference(ckpt, batch_size, device, precision, progress, fp32_recheck)
    result = annotation.annotate(cells, ckpt, NoveltySettings(novelty, threshold, reject_rate), options, species=species, pooling=pooling)
    if majority_voting or clusters is not None:
        result.vote(clusters, basis=over_clustering_basis, voting=voting)
    metrics, lines = result.report(truth, label_map)
    for line in [*query_lines(result.preprocessing), *lines]:
        log_report_line(line)
    keys = AnnotationKeys(key_added)
    result.to_adata(target, key_added)
    emb_key = _embedding_key(embedding, key_added)
    if emb_key != keys.embedding:
        emb = target.obsm.pop(keys.embedding)
        if emb_key is not None:
            target.obsm[emb_key] = emb
        target.uns[keys.report]["embedding_key"] = emb_key or "not written (embedding=False)"
    if truth is not None:
        target.uns[keys.report]["evaluation"] = uns_value({k: v for k, v in metrics.items() if k != "per_class"})
    return target


@_speaks_python
def embed(
    adata: ad.AnnData,
    model: ModelLike,
    *,
    pooling: str = "auto",
    batch_size: int | str = "auto",
    device: str = "auto",
    precision: str = "auto",
    species: str = "auto",
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    log_base: str | float | None = "auto",
    key_added: str = "X_scbert",
    copy: bool = False,
    progress: bool = True,
) -> ad.AnnData:
    """Cell embeddings from any checkpoint (pretrained or fine-tuned) into ``obsm[key_added]``:
    for a fine-tuned model by default the classifier's penultimate features (``pooling='head'``, as
    :func:`annotate` writes them), for a pretrained encoder the final encodings averaged over all
    genes (``'mean'``) or over expressed genes (``'expressed'``). ``layer``, ``use_raw``, ``gene_symbols``, ``log_base``, ``batch_size``,
    ``precision``: as for :func:`annotate`. Modifies
    ``adata`` in place and returns it (a copy with ``copy``)."""
    _check_adata(adata)
    ckpt = load_model(model)
    pooling = ("head" if ckpt.classes else "mean") if pooling == "auto" else pooling
    if pooling not in annotation.EMBEDDINGS:
        raise InputError(f"pooling must be auto or one of {annotation.EMBEDDINGS}, got {pooling!r}")
    target = adata.copy() if copy else adata
    cells = select_cells(target, CellSource(layer, use_raw, gene_symbols, parse_log_base(log_base)), "the AnnData")
    options = _inference(ckpt, batch_size, device, precision, progress)
    emb, rep = annotation.embed(cells, ckpt, options, pooling, species)
    target.obsm[key_added] = emb.astype(np.float32)
    target.uns[f"{key_added}_embedding"] = uns_value({"model": ckpt.source, "pooling": pooling, "preprocessing": rep})
    return target


@_speaks_python
def preprocess(
    adata: ad.AnnData,
    vocab: list[str] | str | Path | Checkpoint | None = None,
    *,
    n_top_genes: int | None = None,
    min_genes: int | None = MIN_GENES,
    species: str = "auto",
    library_size: str = "auto",
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    log_base: str | float | None = "auto",
) -> ad.AnnData:
    """What preprocess.py does, in memory: a new AnnData of log2-normalised cells on ``vocab``
    (a gene list, a gene-list/.h5ad/checkpoint path, or a loaded checkpoint) or on the input's
    own genes (``n_top_genes`` most variable). ``library_size``: ``"all"``, ``"vocab"`` (the
    published order) or ``"auto"`` (a checkpoint's own setting; ``"vocab"`` for the published
    16,906-gene vocabulary; else ``"all"``). ``layer``, ``use_raw``, ``gene_symbols``: as for
    :func:`annotate` (and ``log_base``). The report is in ``uns['scbert_preprocess']``."""
    _check_adata(adata)
    ckpt = vocab if isinstance(vocab, Checkpoint) else None
    if ckpt is not None:
        genes: list[str] | None = list(ckpt.genes)
    elif isinstance(vocab, (str, Path)):
        genes = load_vocab(vocab)
    else:
        genes = None if vocab is None else [str(g) for g in vocab]
    size, _ = choose_library_size(library_size, pretrained=ckpt, vocab=vocab if isinstance(vocab, (str, Path)) else None, genes=genes)
    out, _ = prepare(select_cells(adata, CellSource(layer, use_raw, gene_symbols, parse_log_base(log_base)), "the AnnData"), genes=genes, n_top_genes=None if genes else n_top_genes, min_genes=min_genes, species=species,
                     library_size=size)
    return out
