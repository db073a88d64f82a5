"""Corpora larger than memory: cells read from .h5ad files on disk, one batch at a time.

An :class:`H5adCorpus` is one or more ``.h5ad`` files (or folders of ``.h5ad`` shards) written by
``preprocess.py`` (log2-normalised, sparse CSR ``X``), seen as one cells x genes matrix on one
gene vocabulary. Only each file's row pointer (``indptr``, 8 bytes per cell) is held in memory;
``corpus[rows]`` reads just those rows' values from disk (h5py) and returns a CSR matrix, with
each file's genes put in vocabulary order by name. It plugs into
:class:`data.dataset.CellDataset` like an in-memory matrix.

Files are opened lazily in each process (DataLoader workers included), so a corpus can be handed
to worker processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from data.io import CellSource, InputError
from data.preprocess import MIN_GENES, PREP_KEY, align_to_genes, prepare, read_prepared, recorded_library_size, stack_cells

log = logging.getLogger("scbert")


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a folder stands for the ``.h5ad`` files in it (sorted by name)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            shards = sorted(p.glob("*.h5ad"))
            if not shards:
                raise InputError(f"folder {p} holds no .h5ad files; give .h5ad files written by preprocess.py or a folder of them")
            out.extend(shards)
        elif not p.exists():
            raise InputError(f"input {p} does not exist")
        else:
            out.append(p)
    return out


class _Shard:
    """One file: its row pointer in memory, its values on disk."""

    def __init__(self, path: Path) -> None:
        import h5py

        self.path = path
        if path.suffix != ".h5ad":
            raise InputError(f"{path}: reading from disk needs .h5ad files (written by preprocess.py); convert it with preprocess.py first")
        try:
            with h5py.File(path, "r") as f:
                X = f.get("X")
                if not isinstance(X, h5py.Group) or X.attrs.get("encoding-type") != "csr_matrix":
                    kind = "dense" if isinstance(X, h5py.Dataset) else (X.attrs.get("encoding-type", "missing") if X is not None else "missing")
                    raise InputError(f"{path}: its expression matrix is {kind}, not sparse by cell (CSR); write it with preprocess.py, "
                                     f"which stores cells as sparse rows")
                if "uns" not in f or PREP_KEY not in f["uns"]:
                    raise InputError(f"{path} was not written by preprocess.py (no uns['{PREP_KEY}']): reading from disk skips "
                                     f"normalisation, so run preprocess.py on it first (with --vocab to share one gene vocabulary)")
                self.shape = tuple(int(v) for v in X.attrs["shape"])
                self.indptr = np.asarray(X["indptr"][:], dtype=np.int64)
                var = f["var"]
                self.genes = [str(g) for g in var[var.attrs.get("_index", "_index")].asstr()[:]]
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - h5py raises many kinds; the user needs one message
            raise InputError(f"could not read {path} from disk: {type(e).__name__}: {e}. Is it a complete .h5ad file?") from None
        self._file: Any = None
        self._pid = -1
        self.columns: np.ndarray | None = None  # file column -> vocabulary column (-1: not in the vocabulary)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": -1}

    def _open(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def read(self, rows: np.ndarray, n_vocab: int) -> sparse.csr_matrix:
        """Rows ``rows`` (local, any order) as CSR on the vocabulary."""
        X = self._open()["X"]
        data_ds, ind_ds = X["data"], X["indices"]
        order = np.argsort(rows, kind="stable")
        datas: list[np.ndarray] = [np.empty(0, np.float32)] * len(rows)
        inds: list[np.ndarray] = [np.empty(0, np.int64)] * len(rows)
        for k in order:  # ascending rows: reads move forward through the file
            s, e = self.indptr[rows[k]], self.indptr[rows[k] + 1]
            if e > s:
                datas[k] = np.asarray(data_ds[s:e], dtype=np.float32)
                inds[k] = np.asarray(ind_ds[s:e], dtype=np.int64)
        lengths = np.fromiter((len(d) for d in datas), dtype=np.int64, count=len(rows))
        data = np.concatenate(datas) if len(rows) else np.empty(0, np.float32)
        cols = np.concatenate(inds) if len(rows) else np.empty(0, np.int64)
        if self.columns is not None:
            cols = self.columns[cols]
            keep = cols >= 0
            row_of = np.repeat(np.arange(len(rows)), lengths)
            data, cols = data[keep], cols[keep]
            lengths = np.bincount(row_of[keep], minlength=len(rows))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        return sparse.csr_matrix((data, cols, indptr), shape=(len(rows), n_vocab))


class H5adCorpus:
    """Preprocessed ``.h5ad`` files (or folders of shards) as one on-disk cells x genes matrix.

    ``genes`` is the vocabulary (default: the first file's genes); each file's genes are matched to
    it by name, genes outside it are ignored and vocabulary genes a file lacks are zero. ``rows``
    restricts the corpus to those cells (a view; see :meth:`subset`).
    """

    def __init__(self, paths: Sequence[str | Path], genes: Sequence[str] | None = None) -> None:
        self.paths = expand_paths(paths)
        self.shards = [_Shard(p) for p in self.paths]
        self.genes = list(genes) if genes is not None else list(self.shards[0].genes)
        position = {g: i for i, g in enumerate(self.genes)}
        self.coverage: dict[str, float] = {}
        for sh in self.shards:
            if sh.genes != self.genes:
                sh.columns = np.array([position.get(g, -1) for g in sh.genes], dtype=np.int64)
            present = len(set(sh.genes) & position.keys())
            self.coverage[sh.path.name] = present / max(1, len(self.genes))
        self.offsets = np.concatenate([[0], np.cumsum([sh.shape[0] for sh in self.shards])]).astype(np.int64)
        self.rows: np.ndarray | None = None

    @property
    def n_cells_total(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        n = self.n_cells_total if self.rows is None else len(self.rows)
        return n, len(self.genes)

    def subset(self, rows: Sequence[int] | np.ndarray) -> H5adCorpus:
        """The cells ``rows`` of this corpus, in that order, still on disk."""
        view = object.__new__(H5adCorpus)
        view.__dict__.update(self.__dict__)
        rows = np.asarray(rows, dtype=np.int64)
        view.rows = rows if self.rows is None else self.rows[rows]
        return view

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> sparse.csr_matrix:
        """Rows of this corpus (or view) as an in-memory CSR matrix on the vocabulary."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        glob = rows if self.rows is None else self.rows[rows]
        shard_of = np.searchsorted(self.offsets, glob, side="right") - 1
        parts: list[sparse.csr_matrix] = []
        where: list[np.ndarray] = []
        for s in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == s)
            parts.append(self.shards[s].read(glob[pick] - self.offsets[s], len(self.genes)))
            where.append(pick)
        if not parts:
            return sparse.csr_matrix((0, len(self.genes)), dtype=np.float32)
        stacked = sparse.vstack(parts, format="csr")
        return stacked[np.argsort(np.concatenate(where))] if len(parts) > 1 else stacked

    def sample(self, n: int, seed: int = 0) -> sparse.csr_matrix:
        """Up to ``n`` cells drawn at random (seeded, without replacement), read into memory: for
        statistics such as gene2vec's co-expression, which would otherwise need the whole matrix."""
        total = self.shape[0]
        if total <= n:
            return self[np.arange(total)]
        return self[np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))]


@dataclass
class Corpus:
    """Cells to pretrain on: ``X`` (an in-memory CSR matrix, or an on-disk :class:`H5adCorpus`) on
    the vocabulary ``genes``, and the cells gene2vec is computed from (with ``backed``, a seeded
    sample; None when not needed)."""

    X: Any
    genes: list[str]
    gene2vec_cells: Any = None

    @property
    def n_cells(self) -> int:
        return int(self.X.shape[0])


def read_corpus(paths: Sequence[str | Path], genes: Sequence[str] | None = None, min_genes: int | None = MIN_GENES,
                backed: bool = False, gene2vec_cells: int | None = None, seed: int = 0, library_size: str = "all",
                source: CellSource | None = None) -> Corpus:
    """The pretraining corpus of ``paths`` on ``genes`` (default: the first file's). In memory the
    files are read and preprocessed (cells with fewer than ``min_genes`` genes dropped); with
    ``backed`` they stay on disk (files written by preprocess.py) and ``gene2vec_cells`` cells are
    sampled (seeded) for gene2vec; their values are used as preprocess.py wrote them, so they must
    have been normalised with ``library_size``. ``source``: which matrix and gene names of each
    file to read (in memory only: files on disk are read as preprocess.py wrote them)."""
    if not backed:
        adata, vocab = read_prepared(paths, genes, min_genes or None, library_size=library_size, source=source)
        return Corpus(adata.X, vocab, adata.X)
    if source is not None and not source.is_default:
        raise InputError(f"--backed reads the X that preprocess.py wrote, not {source.describe()}: run preprocess.py with these "
                         f"input flags first (e.g. --layer counts), then pretrain on its output with --backed")
    recorded = recorded_library_size(expand_paths(paths)) or "all"
    if recorded != library_size:
        raise InputError(f"--backed reads the values as preprocess.py wrote them, normalised with library size {recorded!r}, but "
                         f"{library_size!r} was asked for: preprocess the files with --library-size {library_size}, or drop --backed")
    corpus = H5adCorpus(paths, genes)
    for name, frac in corpus.coverage.items():
        if frac < 0.5:
            log.warning("WARNING: %s holds only %.0f%% of the %d vocabulary genes; the others are treated as not expressed",
                        name, 100 * frac, len(corpus.genes))
    log.info("reading %d cells from %d file(s) on disk, a batch at a time", corpus.shape[0], len(corpus.paths))
    sample = corpus.sample(gene2vec_cells, seed) if gene2vec_cells else None
    return Corpus(corpus, corpus.genes, sample)


def read_labelled_on_disk(path: str | Path, genes: Sequence[str] | None, label_key: str, library_size: str = "all",
                          source: CellSource | None = None) -> tuple[H5adCorpus, pd.Series]:
    """Labelled cells of one ``.h5ad`` written by preprocess.py, left on disk (fine-tuning
    ``--backed``): the cells on ``genes`` (default: the file's) and their ``label_key`` column."""
    from data.chunks import read_obs_column

    if source is not None and not source.is_default:
        raise InputError(f"--backed reads the X that preprocess.py wrote, not {source.describe()}: run preprocess.py with these "
                         f"input flags first (e.g. --layer counts), then fine-tune on its output with --backed")
    recorded = recorded_library_size(expand_paths([path])) or "all"
    if recorded != library_size:
        raise InputError(f"--backed reads the values as preprocess.py wrote them, normalised with library size {recorded!r}, but "
                         f"{library_size!r} was asked for: preprocess the file with --library-size {library_size}, or drop --backed")
    corpus = H5adCorpus([path], genes)
    for name, frac in corpus.coverage.items():
        if frac < 0.5:
            log.warning("WARNING: %s holds only %.0f%% of the %d vocabulary genes; the others are treated as not expressed",
                        name, 100 * frac, len(corpus.genes))
    return corpus, read_obs_column(path, label_key)


# --------------------------------------------------------------------------------------------
# A pretraining corpus built from several files onto one vocabulary
# --------------------------------------------------------------------------------------------

CORPUS_KEY = "scbert_corpus"  # uns: the per-file report of build_corpus (JSON)


@dataclass
class CorpusFile:
    """What one input file gave a corpus: its cells (read, kept), its genes, and which vocabulary
    genes it measures. A vocabulary gene the file does not measure is all zeros in its cells, where
    pretraining sees it as not expressed and never masks or scores it (only expressed genes are
    masked; ``model.train.pretraining.UNMEASURED_GENES``)."""

    path: str
    cells_in: int
    cells_kept: int
    genes_in: int
    vocab_present: int
    unmeasured: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, n_unmeasured=len(self.unmeasured))

    def line(self, vocab_size: int) -> str:
        ex = ", ".join(self.unmeasured[:5]) + (", ..." if len(self.unmeasured) > 5 else "")
        return (f"{Path(self.path).name}: {self.cells_kept} of {self.cells_in} cells kept, {self.genes_in} genes; "
                f"{self.vocab_present} of {vocab_size} vocabulary genes measured, {len(self.unmeasured)} not" + (f" ({ex})" if ex else ""))


def build_corpus(paths: Sequence[str | Path], genes: Sequence[str] | None = None, min_genes: int | None = MIN_GENES,
                 species: str = "auto", library_size: str = "all", source: CellSource | None = None,
                 progress: bool = True) -> tuple[Any, list[CorpusFile]]:
    """The cells of ``paths`` preprocessed onto one vocabulary, stacked (``obs['source_file']``),
    and a report per file. ``genes``: the vocabulary; None: the genes every file measures (after
    symbol revision), in the first file's order. The AnnData carries preprocess.py's marker (so
    ``pretrain.py`` and ``--backed`` take it as it is) and the report as JSON in ``uns['scbert_corpus']``."""
    import json

    from tqdm.auto import tqdm

    from data.io import DEFAULT_SOURCE, read_cells

    if not paths:
        raise InputError("no input files: give the files of the corpus")
    if genes is None and library_size == "vocab":
        raise InputError("library sizes over the vocabulary need the vocabulary first: give one, or use library_size 'all'")
    parts: list[tuple[Any, int, int, list[str]]] = []  # prepared cells, cells in, genes in, unmeasured vocabulary genes
    for path in tqdm(list(paths), desc="corpus files", unit="file", disable=not progress):
        raw = read_cells(path, source=source or DEFAULT_SOURCE)
        adata, rep = prepare(raw, genes=genes, min_genes=None if PREP_KEY in raw.uns else min_genes, what=str(path), species=species,
                             library_size=library_size)
        parts.append((adata, raw.n_obs, raw.n_vars, rep.missing_genes))  # no vocabulary yet: every file is on its own genes
    if genes is None:  # the genes every file measures, in the first file's order
        common = set(parts[0][0].var_names).intersection(*(set(a.var_names) for a, *_ in parts[1:]))
        genes = [g for g in parts[0][0].var_names if g in common]
        if not genes:
            raise InputError("the files share no gene (after symbol revision): are they of the same species, named by symbol?")
        parts = [(_realigned(a, genes), n, g, missing) for a, n, g, missing in parts]
    genes = list(genes)
    reports = [CorpusFile(str(path), n_in, a.n_obs, g_in, len(genes) - len(missing), list(missing))
               for (a, n_in, g_in, missing), path in zip(parts, paths)]
    out = stack_cells([a for a, *_ in parts], paths, genes)
    out.uns[PREP_KEY] = parts[0][0].uns[PREP_KEY]
    out.uns[CORPUS_KEY] = json.dumps({"vocabulary": len(genes), "files": [r.to_dict() for r in reports]})
    return out, reports


def _realigned(adata: Any, genes: list[str]) -> Any:
    """``adata`` (prepared on its own genes, a superset of ``genes``) with its columns re-ordered to ``genes``."""
    import anndata as ad

    X, _ = align_to_genes(sparse.csr_matrix(adata.X), list(adata.var_names), genes)
    out = ad.AnnData(X=X, obs=adata.obs)
    out.var_names = genes
    out.uns[PREP_KEY] = adata.uns[PREP_KEY]
    return out
