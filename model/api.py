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

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from data.io import CellSource, InputError, select_cells
from data.preprocess import MIN_GENES, prepare
from data.vocab import read_name_list
from model import annotation
from model.checkpoint import Checkpoint, CheckpointError, choose_library_size, load_checkpoint, load_vocab
from model.inference import InferenceOptions
from model.nn.config import ExecutionOptions
from model.nn.network import POOLINGS
from model.novelty.rule import NoveltySettings
from model.runtime import resolve_device

__all__ = ["CheckpointError", "InputError", "annotate", "embed", "load_model", "preprocess"]

ModelLike = str | Path | Checkpoint
Names = list[str] | str | Path | None


def _names(x: Names, kind: str) -> list[str] | None:
    return None if x is None else read_name_list(x, kind) if isinstance(x, (str, Path)) else [str(v) for v in x]


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
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "fp32",
    fp32_recheck: float | str | None = "auto",
    species: str = "auto",
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    key_added: str = "scbert",
    copy: bool = False,
    progress: bool = True,
) -> ad.AnnData:
    """Annotate cells with a fine-tuned model, writing the keys predict.py writes:
    ``obs['scbert_celltype']`` (``Unassigned`` where the novelty rule rejects the cell),
    ``obs['scbert_celltype_raw']`` (the top type), ``obs['scbert_confidence']``, ``obs['scbert_novelty']``,
    ``obsm['scbert_probabilities']`` (columns: ``uns['scbert_classes']``), ``obsm['X_scbert']``,
    ``uns['scbert_threshold']``, ``uns['scbert_novelty']`` (the rule) and ``uns['scbert_annotation']``
    (the preprocessing report, JSON); with ``majority_voting`` also ``obs['scbert_majority_voting']``
    and ``obs['scbert_over_clustering']`` (``over_clustering``: an obs column, default Leiden clusters
    of the cells' expression PCA, ``over_clustering_basis="embedding"``: of the scBERT embedding;
    ``voting``: ``"cautious"`` (default) changes only unsure cells of nearly unanimous clusters, ``"soft"``
    blends each cell's probabilities with its cluster's, ``"hard"`` as CellTypist).

    ``threshold``: ``"auto"`` (calibrated at fine-tuning; the published 0.5 for older models), a
    number (for ``novelty="softmax"``, the default with a number: the top probability below which a
    cell is Unassigned, as published), or None (never). ``novelty``: the score (see
    :mod:`model.novelty`). ``layer``/``use_raw``: read the expression from ``adata.layers[layer]`` or
    ``adata.raw`` instead of ``X`` (as scvi-tools' ``setup_anndata(layer=...)``); ``gene_symbols``: a
    ``var`` column holding the gene names (see :class:`data.io.CellSource`). ``fp32_recheck``: with
    ``precision`` bf16/fp16, cells this close to a decision are scored again in float32 (0: never;
    ``"auto"``: from the error measured at fine-tuning, see :func:`model.recheck.resolve_recheck_margin`).
    Every cell is kept, in order. Modifies ``adata`` in place and returns it (a copy with ``copy``).
    """
    _check_adata(adata)
    ckpt = load_model(model)
    target = adata.copy() if copy else adata
    clusters = None
    if over_clustering is not None:
        if over_clustering not in adata.obs:
            raise InputError(f"over_clustering {over_clustering!r} is not a column of the AnnData; available: {list(adata.obs.columns)}")
        clusters = adata.obs[over_clustering].astype(str).to_numpy()
    cells = select_cells(target, CellSource(layer, use_raw, gene_symbols), "the AnnData")
    options = InferenceOptions(batch_size, _device(device), progress=progress, execution=ExecutionOptions(precision=precision),
                               fp32_recheck=fp32_recheck)
    result = annotation.annotate(cells, ckpt, NoveltySettings(novelty, threshold, reject_rate), options, species=species)
    if majority_voting or clusters is not None:
        result.vote(clusters, basis=over_clustering_basis, voting=voting)
    return result.to_adata(target, key_added)


def embed(
    adata: ad.AnnData,
    model: ModelLike,
    *,
    pooling: str = "mean",
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "fp32",
    species: str = "auto",
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    key_added: str = "X_scbert",
    copy: bool = False,
    progress: bool = True,
) -> ad.AnnData:
    """Cell embeddings from any checkpoint (pretrained or fine-tuned) into ``obsm[key_added]``:
    the final encodings averaged over all genes (``pooling='mean'``) or over expressed genes
    (``'expressed'``). ``layer``, ``use_raw``, ``gene_symbols``: as for :func:`annotate`. Modifies
    ``adata`` in place and returns it (a copy with ``copy``)."""
    _check_adata(adata)
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    ckpt = load_model(model)
    target = adata.copy() if copy else adata
    cells = select_cells(target, CellSource(layer, use_raw, gene_symbols), "the AnnData")
    options = InferenceOptions(batch_size, _device(device), progress=progress, execution=ExecutionOptions(precision=precision))
    emb, rep = annotation.embed(cells, ckpt, options, pooling, species)
    target.obsm[key_added] = emb.astype(np.float32)
    target.uns[f"{key_added}_embedding"] = json.dumps({"model": ckpt.source, "pooling": pooling, "preprocessing": rep}, default=str)
    return target


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
) -> ad.AnnData:
    """What preprocess.py does, in memory: a new AnnData of log2-normalised cells on ``vocab``
    (a gene list, a gene-list/.h5ad/checkpoint path, or a loaded checkpoint) or on the input's
    own genes (``n_top_genes`` most variable). ``library_size``: ``"all"``, ``"vocab"`` (the
    published order) or ``"auto"`` (a checkpoint's own setting; ``"vocab"`` for the published
    16,906-gene vocabulary; else ``"all"``). ``layer``, ``use_raw``, ``gene_symbols``: as for
    :func:`annotate`. The report is in ``uns['scbert_preprocess']``."""
    _check_adata(adata)
    ckpt = vocab if isinstance(vocab, Checkpoint) else None
    if ckpt is not None:
        genes: list[str] | None = list(ckpt.genes)
    elif isinstance(vocab, (str, Path)):
        genes = load_vocab(vocab)
    else:
        genes = None if vocab is None else [str(g) for g in vocab]
    size, _ = choose_library_size(library_size, pretrained=ckpt, vocab=vocab if isinstance(vocab, (str, Path)) else None, genes=genes)
    out, _ = prepare(select_cells(adata, CellSource(layer, use_raw, gene_symbols), "the AnnData"), genes=genes, n_top_genes=None if genes else n_top_genes, min_genes=min_genes, species=species,
                     library_size=size)
    return out
