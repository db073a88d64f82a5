"""Gene2vec gene embeddings: read the published release, align to a vocabulary, or train anew.

scBERT adds to every gene token a frozen gene2vec vector of that gene. This module

* reads the published Gene2vec embeddings, either the word2vec text file
  (``read_word2vec_text``) or the ``.npy`` matrix with its gene list (``read_npy_embeddings``);
* aligns any such table to a model vocabulary with a documented fallback for genes that have
  no vector (``embeddings_for_vocab``);
* (training anew with the Gene2vec recipe is :mod:`data.gene2vec_training`);
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

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


def fill_fallback(
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


def missing_names(names: Sequence[str], found_mask: np.ndarray) -> list[str]:
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
    _, fallback_text = fill_fallback(out, found_mask, vocab, seed)
    n_found = int(found_mask.sum())
    report = Gene2VecReport(
        source=source,
        dim=dim,
        n_vocab=len(vocab),
        n_found=n_found,
        n_fallback=len(vocab) - n_found,
        fallback=fallback_text,
        missing_examples=missing_names(vocab, found_mask),
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
