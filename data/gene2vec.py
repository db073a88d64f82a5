"""Gene2vec gene embeddings: read the published release, align to a vocabulary, or train anew.

scBERT adds to every gene token a frozen gene2vec vector of that gene. This module

* reads the published Gene2vec embeddings, either the word2vec text file
  (``read_word2vec_text``) or the ``.npy`` matrix with its gene list (``read_npy_embeddings``);
* aligns any such table to a model vocabulary with a documented fallback for genes that have
  no vector (``embeddings_for_vocab``);
* retrains embeddings with the Gene2vec recipe (Du et al. 2019, co-expressed gene pairs fed to
  skip-gram word2vec) from an expression matrix (``train_gene2vec``), computing the gene-gene
  correlations block by block so that memory stays bounded (``top_correlated_pairs``);
* writes embeddings back in word2vec text format (``save_word2vec_text``).

Every way of producing embeddings returns a ``Gene2VecReport`` saying where the vectors came
from and how many genes fell back to the random vector.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from data.io import atomic_write

log = logging.getLogger("scbert")

PathLike = str | os.PathLike
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_MISSING_EXAMPLES = 20


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Turn numpy scalars/arrays and containers of them into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Gene2VecReport:
    """Where a gene embedding table came from and how well it covers the vocabulary."""

    source: str  # "file:<name>", "npy:<name>", "trained" or "none"
    dim: int
    n_vocab: int  # genes asked for
    n_found: int  # genes that got a real vector
    n_fallback: int  # genes that got the fallback vector
    fallback: str  # short description of the fallback
    missing_examples: list[str] = field(default_factory=list)  # up to 20 names
    extra: dict = field(default_factory=dict)  # method-specific details

    def to_dict(self) -> dict:
        """Return the report as a JSON-serialisable dict."""
        return _jsonable(dataclasses.asdict(self))

    def summary(self) -> str:
        """Return a one-line description for a log."""
        pct = 100.0 * self.n_found / self.n_vocab if self.n_vocab else 0.0
        text = (
            f"gene2vec source={self.source} dim={self.dim}: {self.n_found}/{self.n_vocab} genes "
            f"with a vector ({pct:.1f}%), {self.n_fallback} fallback [{self.fallback}]"
        )
        if self.missing_examples:
            shown = ", ".join(self.missing_examples[:5])
            more = ", ..." if self.n_fallback > 5 else ""
            text += f"; missing e.g. {shown}{more}"
        return text


# --------------------------------------------------------------------------------------------
# Fallback vectors
# --------------------------------------------------------------------------------------------


def _fallback_scale(found: np.ndarray, dim: int) -> float:
    """Mean over coordinates of the std across found vectors; 1/sqrt(dim) if undefined."""
    if found.shape[0] >= 2:
        scale = float(np.mean(np.std(found.astype(np.float64), axis=0)))
        if math.isfinite(scale) and scale > 0.0:
            return scale
    return 1.0 / math.sqrt(dim)


def _gene_rng(gene: str, seed: int) -> np.random.Generator:
    """A random generator that depends only on ``seed`` and the gene name (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}\x00{gene}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _fill_fallback(
    out: np.ndarray, found_mask: np.ndarray, names: Sequence[str], seed: int
) -> tuple[float, str]:
    """Write fallback rows into ``out`` where ``found_mask`` is False; return (scale, text)."""
    dim = out.shape[1]
    scale = _fallback_scale(out[found_mask], dim)
    for i in np.flatnonzero(~found_mask):
        out[i] = _gene_rng(str(names[i]), seed).standard_normal(dim) * scale
    if found_mask.sum() >= 2:
        how = "mean per-coordinate std of found vectors"
    else:
        how = "1/sqrt(dim), too few found vectors"
    text = f"seeded random normal per gene (seed={seed}), scale={scale:.4g} ({how})"
    return scale, text


def _missing_examples(names: Sequence[str], found_mask: np.ndarray) -> list[str]:
    """Up to 20 names of genes without a real vector, in vocabulary order."""
    idx = np.flatnonzero(~found_mask)[:_MAX_MISSING_EXAMPLES]
    return [str(names[i]) for i in idx]


def embeddings_for_vocab(
    vocab: Sequence[str],
    genes: Sequence[str],
    matrix: np.ndarray,
    source: str,
    seed: int = 0,
) -> tuple[np.ndarray, Gene2VecReport]:
    """Return the embedding rows of ``vocab`` (float32, ``(len(vocab), dim)``) and a report.

    ``genes``/``matrix`` are an embedding table (row ``i`` is the vector of ``genes[i]``; if a
    name occurs twice the first row wins). Names are matched exactly (case-sensitive).

    Fallback: a vocabulary gene without a vector gets a random normal vector drawn from a
    generator seeded by ``seed`` and the gene name (so it is the same in every run and does not
    depend on the vocabulary order), multiplied by the mean over coordinates of the standard
    deviation of the found vectors. Missing genes thus stay distinguishable from each other and
    of the same magnitude as real vectors, but carry no claimed meaning. If fewer than two
    genes are found the scale is ``1/sqrt(dim)``.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"embedding matrix must be 2-D, got shape {matrix.shape}")
    if matrix.shape[0] != len(genes):
        raise ValueError(
            f"embedding matrix has {matrix.shape[0]} rows but {len(genes)} gene names were given"
        )
    dim = int(matrix.shape[1])
    if dim < 1:
        raise ValueError("embedding dimension must be >= 1")
    row_of: dict[str, int] = {}
    for i, g in enumerate(genes):
        row_of.setdefault(str(g), i)
    rows = np.array([row_of.get(str(g), -1) for g in vocab], dtype=np.int64)
    found_mask = rows >= 0
    out = np.zeros((len(vocab), dim), dtype=np.float32)
    out[found_mask] = matrix[rows[found_mask]]
    _, fallback_text = _fill_fallback(out, found_mask, vocab, seed)
    n_found = int(found_mask.sum())
    report = Gene2VecReport(
        source=source,
        dim=dim,
        n_vocab=len(vocab),
        n_found=n_found,
        n_fallback=len(vocab) - n_found,
        fallback=fallback_text,
        missing_examples=_missing_examples(vocab, found_mask),
        extra={"n_table_genes": len(genes)},
    )
    log.info("gene2vec: %s", report.summary())
    return out, report


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------


def _open_text(path: PathLike) -> IO[str]:
    """Open a text file for reading, transparently decompressing gzip (detected by content)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _parse_header(tokens: list[str]) -> tuple[int, int] | None:
    """Return (n, dim) if the tokens form a word2vec "N D" header line, else None."""
    if len(tokens) != 2:
        return None
    try:
        return int(tokens[0]), int(tokens[1])
    except ValueError:
        return None


def read_word2vec_text(path: PathLike) -> tuple[list[str], np.ndarray]:
    """Read embeddings in word2vec text format (optionally gzipped); return (genes, float32 matrix).

    Each line holds a gene symbol followed by whitespace-separated floats; an optional first line
    ``"N D"`` (two integers) is a header that must then agree with the data. Blank lines are
    skipped. Raises ``ValueError`` naming the file and line for ragged lines, non-numbers,
    non-finite values, or a file without vectors.
    """
    name = os.fspath(path)
    genes: list[str] = []
    rows: list[np.ndarray] = []
    header: tuple[int, int] | None = None
    dim: int | None = None
    with _open_text(path) as fh:
        first = True
        for lineno, line in enumerate(fh, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if first:
                first = False
                header = _parse_header(tokens)
                if header is not None:
                    if header[0] < 0 or header[1] < 1:
                        raise ValueError(f"{name}, line {lineno}: invalid header {line.strip()!r}")
                    dim = header[1]
                    continue
            if len(tokens) < 2:
                raise ValueError(f"{name}, line {lineno}: a gene name without any vector values")
            n_values = len(tokens) - 1
            if dim is None:
                dim = n_values
            elif n_values != dim:
                raise ValueError(
                    f"{name}, line {lineno}: {n_values} values for gene {tokens[0]!r}, expected {dim}"
                )
            try:
                values = np.array(tokens[1:], dtype=np.float32)
            except ValueError as exc:
                raise ValueError(
                    f"{name}, line {lineno}: non-numeric value for gene {tokens[0]!r} ({exc})"
                ) from None
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{name}, line {lineno}: non-finite value for gene {tokens[0]!r}")
            genes.append(tokens[0])
            rows.append(values)
    if not rows:
        raise ValueError(f"{name}: no embedding vectors found (empty file?)")
    if header is not None and header[0] != len(rows):
        raise ValueError(f"{name}: header announces {header[0]} vectors but {len(rows)} were read")
    return genes, np.vstack(rows).astype(np.float32, copy=False)


def read_npy_embeddings(npy_path: PathLike, genes_path: PathLike) -> tuple[list[str], np.ndarray]:
    """Read an ``.npy`` embedding matrix and its gene list; return (genes, float32 matrix).

    ``genes_path`` is a text file (optionally gzipped) with one gene per line in row order; the
    first whitespace-separated field of each non-blank line is the name. The published
    ``gene2vec_16906.npy`` (float64) has 16906 rows. Raises ``ValueError`` if the matrix is not
    2-D, holds non-finite values, or its row count differs from the number of genes.
    """
    matrix = np.load(npy_path, allow_pickle=False)
    if matrix.ndim != 2:
        raise ValueError(f"{os.fspath(npy_path)}: expected a 2-D matrix, got shape {matrix.shape}")
    with _open_text(genes_path) as fh:
        genes = [line.split()[0] for line in fh if line.strip()]
    if matrix.shape[0] != len(genes):
        raise ValueError(
            f"{os.fspath(npy_path)} has {matrix.shape[0]} rows but {os.fspath(genes_path)} lists "
            f"{len(genes)} genes; they must correspond row by row"
        )
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{os.fspath(npy_path)}: matrix holds non-finite values")
    return genes, matrix


def load_pretrained(path: PathLike, genes_path: PathLike | None = None) -> tuple[list[str], np.ndarray, str]:
    """Read a word2vec text file, or an ``.npy`` matrix with ``genes_path``; return (genes, matrix, source).

    ``source`` is ``"file:<name>"`` or ``"npy:<name>"`` as used in ``Gene2VecReport``.
    """
    name = Path(path).name
    if name.endswith(".npy"):
        if genes_path is None:
            raise ValueError(f"{os.fspath(path)}: an .npy matrix needs a gene list file (genes_path)")
        genes, matrix = read_npy_embeddings(path, genes_path)
        return genes, matrix, f"npy:{name}"
    genes, matrix = read_word2vec_text(path)
    return genes, matrix, f"file:{name}"


def save_word2vec_text(path: PathLike, genes: Sequence[str], matrix: np.ndarray) -> None:
    """Write embeddings in word2vec text format with an ``"N D"`` header (gzip if path ends in .gz).

    Values are written with 9 significant digits so float32 vectors survive a round trip. The
    file is written to a temporary sibling and moved into place, so readers never see half a file.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != len(genes):
        raise ValueError(f"matrix of shape {matrix.shape} does not match {len(genes)} genes")
    for g in genes:
        if not str(g) or any(ch.isspace() for ch in str(g)):
            raise ValueError(f"gene name {g!r} is empty or contains whitespace")
    path = Path(path)
    with atomic_write(path, "wb") as raw:
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb") if path.suffix == ".gz" else raw
        fh = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
        fh.write(f"{matrix.shape[0]} {matrix.shape[1]}\n")
        for g, row in zip(genes, matrix):
            fh.write(str(g) + " " + " ".join(f"{v:.9g}" for v in row.tolist()) + "\n")
        fh.flush()
        fh.detach()  # leaves ``stream`` open: closing it is the gzip trailer's job, and ``raw`` is atomic_write's
        if stream is not raw:
            stream.close()


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
    from gensim.models import Word2Vec

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

    out = np.zeros((n_genes, dim), dtype=np.float32)
    found = np.zeros(n_genes, dtype=bool)
    t1 = time.perf_counter()
    if len(pairs):
        # Tokens are column indices, so duplicate or odd gene names cannot collide.
        shuffled = pairs[rng.permutation(len(pairs))]
        sentences = [[str(a), str(b)] for a, b in shuffled.tolist()]
        model = Word2Vec(
            sentences=sentences,
            vector_size=dim,
            window=1,
            min_count=1,
            sg=1,
            seed=seed,
            workers=workers,
            epochs=epochs,
            sample=0,  # no frequency downsampling, see the docstring
        )
        for token, row in model.wv.key_to_index.items():
            out[int(token)] = model.wv.vectors[row]
            found[int(token)] = True
    t_train = time.perf_counter() - t1
    _, fallback_text = _fill_fallback(out, found, genes, seed)

    n_found = int(found.sum())
    report = Gene2VecReport(
        source="trained",
        dim=dim,
        n_vocab=n_genes,
        n_found=n_found,
        n_fallback=n_genes - n_found,
        fallback=fallback_text,
        missing_examples=_missing_examples(genes, found),
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
