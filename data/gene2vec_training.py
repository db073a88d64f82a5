"""Training gene2vec embeddings anew (Du et al. 2019): co-expressed gene pairs, found from an
expression matrix block by block so that memory stays bounded (:func:`top_correlated_pairs`), fed as
two-word sentences to skip-gram word2vec (:func:`train_gene2vec`). Reading, aligning and writing
embedding tables is :mod:`data.gene2vec`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from data.gene2vec import Gene2VecReport, fill_fallback, missing_names

log = logging.getLogger("scbert")


# --------------------------------------------------------------------------------------------
# Block-wise co-expression
# --------------------------------------------------------------------------------------------


def _as_csr_float32(X: Any) -> sp.csr_matrix:
    """Return ``X`` (sparse or dense, cells x genes) as a float32 CSR matrix."""
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"expression matrix must be 2-D (cells x genes), got shape {arr.shape}")
    return sp.csr_matrix(arr.astype(np.float32, copy=False))


def _iter_blocks(n: int, block_size: int, progress: bool, desc: str) -> Iterator[tuple[int, int]]:
    """Yield (start, stop) gene blocks, with a tqdm bar if ``progress``."""
    starts = range(0, n, block_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="block", total=len(starts))
    for start in starts:
        yield start, min(start + block_size, n)


def top_correlated_pairs(
    X: Any,
    top_k: int = 10,
    min_corr: float = 0.3,
    min_cells: int = 3,
    block_size: int = 1024,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Find co-expressed gene pairs by Pearson correlation across cells, block by block.

    ``X`` is cells x genes (sparse or dense). Genes expressed (non-zero) in fewer than
    ``min_cells`` cells, or constant across cells, take no part. For every remaining gene its
    ``top_k`` most correlated partners (itself excluded) with ``r >= min_corr`` are kept; the
    union of these relations, as unordered pairs, is returned.

    The genes x genes correlation matrix is never formed: for each block of ``block_size``
    genes the centred dense block ``B - mean(B)`` (cells x block) is multiplied by the sparse
    ``X.T`` in float32, giving the covariances of all genes with the block, which are divided by
    the gene standard deviations. Peak extra memory is about
    ``block_size * (8 * n_cells + 12 * n_genes)`` bytes plus float32 copies of ``X``.

    Returns ``(pairs, corr, n_genes_considered)``: ``pairs`` int64 ``(m, 2)`` column indices with
    ``pairs[:, 0] < pairs[:, 1]`` sorted lexicographically, ``corr`` float32 ``(m,)`` their
    correlations, and the number of genes that passed the ``min_cells`` / non-constant filter.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    Xc = _as_csr_float32(X)
    n_cells, n_genes = Xc.shape
    empty = (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32))
    if n_cells < 2 or n_genes < 2:
        return (*empty, 0)

    # Per-gene statistics in float64 (exact enough for the centring below).
    data64 = Xc.data.astype(np.float64)
    n_expr = np.bincount(Xc.indices[data64 != 0], minlength=n_genes)
    col_sum = np.bincount(Xc.indices, weights=data64, minlength=n_genes)
    col_sq = np.bincount(Xc.indices, weights=data64 * data64, minlength=n_genes)
    del data64
    mean = col_sum / n_cells
    var = np.maximum(col_sq / n_cells - mean**2, 0.0)
    std = np.sqrt(var)
    active = np.flatnonzero((n_expr >= min_cells) & (std > 1e-8 * np.maximum(1.0, np.abs(mean))))
    n_active = active.size
    if n_active < 2:
        return (*empty, int(n_active))

    # genes x cells, restricted to active genes: row slices give the dense blocks cheaply.
    Xt = Xc.T.tocsr()[active]
    del Xc
    mean_a = mean[active].astype(np.float32)
    inv_std = (1.0 / std[active]).astype(np.float32)
    k = min(top_k, n_active - 1)

    partner_rows: list[np.ndarray] = []
    gene_rows: list[np.ndarray] = []
    corr_rows: list[np.ndarray] = []
    for start, stop in _iter_blocks(n_active, block_size, progress, "gene2vec correlations"):
        block = Xt[start:stop].toarray()  # (b, cells) float32
        block -= mean_a[start:stop, None]
        # Centring one side suffices: sum_c x_ci (y_cj - mean_j) = n * cov(i, j).
        cov = Xt @ np.ascontiguousarray(block.T)  # (n_active, b) float32
        del block
        cov *= inv_std[:, None]
        cov *= (inv_std[start:stop] / n_cells)[None, :]
        b = stop - start
        cov[np.arange(start, stop), np.arange(b)] = -np.inf  # exclude self
        np.negative(cov, out=cov)  # argpartition finds the smallest: negate in place, no copy
        top = np.argpartition(cov, k - 1, axis=0)[:k]  # (k, b) partner rows
        r = -np.take_along_axis(cov, top, axis=0)
        del cov
        keep = r >= min_corr
        cols = np.broadcast_to(np.arange(start, stop), top.shape)
        partner_rows.append(top[keep])
        gene_rows.append(cols[keep])
        corr_rows.append(r[keep])

    a = np.concatenate(gene_rows).astype(np.int64)
    bb = np.concatenate(partner_rows).astype(np.int64)
    r = np.concatenate(corr_rows).astype(np.float32)
    if a.size == 0:
        return (*empty, int(n_active))
    lo = np.minimum(a, bb)
    hi = np.maximum(a, bb)
    key = lo * n_active + hi
    key, first = np.unique(key, return_index=True)
    pairs = np.stack([active[lo[first]], active[hi[first]]], axis=1).astype(np.int64)
    # Both orientations of a pair carry the same correlation up to float32 rounding.
    corr = np.clip(r[first], -1.0, 1.0).astype(np.float32)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order], corr[order], int(n_active)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _skipgram(pairs: np.ndarray, n_genes: int, dim: int, rng: np.random.Generator, seed: int, workers: int,
              epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Skip-gram word2vec on the gene ``pairs`` (shuffled with ``rng``): the vectors (genes x dim,
    zero for genes in no pair) and which genes got one. Frequent-word downsampling is off: in a
    pair corpus a gene's frequency is its number of partners (see :func:`train_gene2vec`)."""
    from gensim.models import Word2Vec

    out = np.zeros((n_genes, dim), dtype=np.float32)
    found = np.zeros(n_genes, dtype=bool)
    if not len(pairs):
        return out, found
    # Tokens are column indices, so duplicate or odd gene names cannot collide.
    shuffled = pairs[rng.permutation(len(pairs))]
    sentences = [[str(a), str(b)] for a, b in shuffled.tolist()]
    model = Word2Vec(sentences=sentences, vector_size=dim, window=1, min_count=1, sg=1, seed=seed, workers=workers, epochs=epochs,
                     sample=0)
    for token, row in model.wv.key_to_index.items():
        out[int(token)] = model.wv.vectors[row]
        found[int(token)] = True
    return out, found


def train_gene2vec(
    X: Any,
    genes: Sequence[str],
    dim: int,
    *,
    seed: int = 0,
    top_k: int = 10,
    min_corr: float = 0.1,
    min_cells: int = 3,
    epochs: int = 30,
    max_cells: int = 50_000,
    block_size: int = 1024,
    workers: int = 1,
    progress: bool = True,
) -> tuple[np.ndarray, Gene2VecReport]:
    """Train gene embeddings with the Gene2vec method (Du et al. 2019) on an expression matrix.

    ``X`` is cells x genes (scipy sparse, ideally CSR, or dense) of log-normalised expression,
    its columns named by ``genes``. If it has more than ``max_cells`` cells a seeded random
    subset of ``max_cells`` cells is used. Co-expressed gene pairs are found with
    ``top_correlated_pairs`` (each gene's ``top_k`` partners with Pearson ``r >= min_corr``,
    genes in fewer than ``min_cells`` cells excluded, pairs deduplicated); each pair becomes a
    two-word sentence for skip-gram word2vec (gensim ``Word2Vec``, ``sg=1, window=1,
    min_count=1``), trained for ``epochs`` epochs. Pairs are shuffled with ``seed`` first.
    Frequent-word downsampling is switched off (``sample=0``): in a pair corpus a gene's
    frequency is its number of partners, and with the default threshold (1e-3 of the corpus)
    most tokens of a corpus of a few thousand pairs would be dropped, so little gets trained.

    Genes without any pair get the same fallback as ``embeddings_for_vocab`` (seeded random
    normal scaled to the mean per-coordinate std of the trained vectors).

    With ``workers=1`` the result is reproducible for a given ``seed``. Returns a float32
    ``(len(genes), dim)`` matrix in the order of ``genes`` and a report with
    ``source="trained"``.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_cells < 2:
        raise ValueError(f"max_cells must be >= 2, got {max_cells}")
    n_cells, n_genes = X.shape
    if n_genes != len(genes):
        raise ValueError(f"X has {n_genes} columns but {len(genes)} gene names were given")

    if sp.issparse(X) and X.format != "csr":
        X = X.tocsr()
    rng = np.random.default_rng(seed)
    if n_cells > max_cells:
        cells = np.sort(rng.choice(n_cells, size=max_cells, replace=False))
        X = X[cells]
        n_cells = max_cells

    t0 = time.perf_counter()
    pairs, corr, n_considered = top_correlated_pairs(
        X, top_k=top_k, min_corr=min_corr, min_cells=min_cells, block_size=block_size, progress=progress
    )
    t_corr = time.perf_counter() - t0

    t1 = time.perf_counter()
    out, found = _skipgram(pairs, n_genes, dim, rng, seed, workers, epochs)
    t_train = time.perf_counter() - t1
    _, fallback_text = fill_fallback(out, found, genes, seed)

    n_found = int(found.sum())
    report = Gene2VecReport(
        source="trained",
        dim=dim,
        n_vocab=n_genes,
        n_found=n_found,
        n_fallback=n_genes - n_found,
        fallback=fallback_text,
        missing_examples=missing_names(genes, found),
        extra={
            "method": "gene2vec skip-gram on co-expressed gene pairs (Du et al. 2019)",
            "n_pairs": len(pairs),
            "n_genes_paired": n_found,
            "n_genes_considered": n_considered,
            "top_k": top_k,
            "min_corr": min_corr,
            "min_cells": min_cells,
            "epochs": epochs,
            "sample": 0,
            "n_cells_used": int(n_cells),
            "seed": seed,
            "median_pair_corr": float(np.median(corr)) if len(corr) else None,
            "seconds_correlation": round(t_corr, 3),
            "seconds_training": round(t_train, 3),
        },
    )
    log.info("gene2vec: %s", report.summary())
    return out, report
