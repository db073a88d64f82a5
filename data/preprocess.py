"""Preprocessing: filter cells, normalise to 1e4 per cell, log2(1 + x), align to a vocabulary.

Where each cell's library size (its total) is taken is a setting, stored with every model
(``library_size``):

- ``"all"`` (our default): over *all* genes of the input, before any subsetting to a vocabulary
  or to highly variable genes, in training and prediction alike;
- ``"vocab"`` (the published scBERT preprocessing, used for published checkpoints): the cells are
  first aligned to the vocabulary, then cells with fewer than ``min_genes`` expressed vocabulary
  genes are dropped, then each is normalised to 1e4 over its vocabulary genes only, then log2(1 + x).

Either is consistent when training and prediction use the same one; a model must be fed the one
it was trained with (``Checkpoint.prepare`` does that).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from data.genes import check_species, mouse_to_human, revise_symbols
from data.io import CellSource, InputError
from data.values import LOG_BASE, TARGET_SUM, ValueState, check_values, detect_state, input_log_base, normalize_log2

log = logging.getLogger("scbert")

MIN_GENES = 200  # cells expressing fewer genes are dropped before training, as published
LIBRARY_SIZES = ("all", "vocab")
PUBLISHED_VOCAB_SIZE = 16906  # genes of the published scBERT vocabulary (panglao_10000.h5ad)
# How a model's inputs were normalised; stored in every checkpoint (``Checkpoint.preprocessing``).
DEFAULT_PREPROCESSING: dict[str, Any] = {"target_sum": TARGET_SUM, "log_base": LOG_BASE, "min_genes": MIN_GENES, "library_size": "all"}
PUBLISHED_PREPROCESSING: dict[str, Any] = {**DEFAULT_PREPROCESSING, "library_size": "vocab"}
MIN_VOCAB_FRACTION = 0.5
SPECIES = ("auto", "human", "mouse")
PREP_KEY = "scbert_preprocess"  # uns key preprocess.py writes: the values are log2-normalised already


def expressed_per_cell(X: sparse.csr_matrix) -> np.ndarray:
    """Genes with a value > 0 in each cell (explicitly stored zeros do not count, as in scanpy)."""
    X = sparse.csr_matrix(X)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    return np.bincount(rows[X.data > 0], minlength=X.shape[0])


def align_to_genes(X: sparse.csr_matrix, names: Sequence[str], genes: Sequence[str]) -> tuple[sparse.csr_matrix, int]:
    """Columns of ``X`` (named ``names``, unique) re-ordered to ``genes``; absent genes are zero.

    Returns the aligned matrix and how many of ``genes`` were present.
    """
    pos = {g: i for i, g in enumerate(genes)}
    if len(pos) != len(genes):
        raise ValueError("the target gene list has duplicated names")
    src = np.array([j for j, n in enumerate(names) if n in pos], dtype=np.int64)
    dst = np.array([pos[names[j]] for j in src], dtype=np.int64)
    P = sparse.csr_matrix((np.ones(len(src), np.float32), (src, dst)), shape=(len(names), len(genes)))
    out = sparse.csr_matrix(X @ P, dtype=np.float32)
    out.sort_indices()
    return out, len(src)


@dataclass
class PrepReport:
    """What preprocessing did, for the log and for ``uns['scbert_preprocess']``."""

    n_cells_in: int = 0
    n_genes_in: int = 0
    n_cells_out: int = 0
    n_genes_out: int = 0
    normalisation: str = ""
    symbols: dict[str, Any] = field(default_factory=dict)
    symbols_summary: str = ""
    vocab_size: int | None = None
    vocab_present: int | None = None
    n_top_genes: int | None = None
    warnings: list[str] = field(default_factory=list)
    symbols_species: str = "human"
    library_size: str = "all"
    min_genes: int | None = None  # the quality filter applied (None: every cell kept)
    missing_genes: list[str] = field(default_factory=list, repr=False)  # vocabulary genes the input does not measure (not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "missing_genes"}

    def lines(self, with_warnings: bool = True) -> list[str]:
        """Readable lines; ``with_warnings=False`` for a log that has shown the warnings already."""
        out = [
            f"input: {self.n_cells_in} cells x {self.n_genes_in} genes",
            f"values: {self.normalisation}",
            f"gene symbols: {self.symbols_summary}",
        ]
        if self.vocab_size is not None:
            pct = 100.0 * (self.vocab_present or 0) / max(self.vocab_size, 1)
            out.append(f"vocabulary: {self.vocab_present} of {self.vocab_size} genes present in the input ({pct:.1f}%); the others are zero")
        if self.n_top_genes:
            out.append(f"highly variable genes: kept the top {self.n_top_genes}")
        if self.min_genes:
            dropped = self.n_cells_in - self.n_cells_out
            out.append(f"cells: kept {self.n_cells_out:,} of {self.n_cells_in:,}; {dropped:,} expressed fewer than {self.min_genes} "
                       f"{'vocabulary ' if self.library_size == 'vocab' else ''}genes (--min-genes {self.min_genes}) and were dropped")
        out.append(f"output: {self.n_cells_out} cells x {self.n_genes_out} genes")
        if with_warnings:
            out += [f"WARNING: {w}" for w in self.warnings]
        return out

    def warn(self, msg: str, loud: bool = False) -> None:
        """Record a warning for the report and show it now (framed with ``loud``)."""
        self.warnings.append(msg)
        if loud:
            log.warning("!" * 80 + "\nWARNING: %s\n" + "!" * 80, msg)
        else:
            log.warning("WARNING: %s", msg)


def query_lines(report: dict[str, Any]) -> list[str]:
    """What preparing a query did, as prediction reports it (from :meth:`PrepReport.to_dict`): the
    values detected, gene names mapped or dropped, the model's genes the query measures, cells kept."""
    out = [f"values: {report.get('normalisation', '')}", f"gene symbols: {report.get('symbols_summary', '')}"]
    size, present = report.get("vocab_size"), report.get("vocab_present")
    if size:
        out.append(f"model genes present in the query: {present or 0:,} of {size:,} ({100.0 * (present or 0) / size:.1f}%); "
                   f"the others count as not expressed")
    out.append(f"cells kept: {report.get('n_cells_out', 0):,} of {report.get('n_cells_in', 0):,}")
    return out


def naming_hint(names: Sequence[str]) -> str:
    """A guess at why gene names match nothing, for error messages."""
    names = [str(n) for n in names]
    if not names:
        return ""
    n = len(names)
    if sum(x.startswith("ENSMUSG") for x in names) > n / 2:
        return "The genes are mouse Ensembl ids (ENSMUSG...): scBERT needs human gene symbols. "
    if sum(x.startswith("ENS") for x in names) > n / 2:
        return "The genes are Ensembl ids that the bundled human table does not know (another species or release?). "
    if sum(x.replace(".", "", 1).isdigit() for x in names) > n / 2:
        return "The gene names are numbers: were Entrez ids used, or was the header row lost? "
    return ""


def _duplicates(index: Sequence[str]) -> tuple[int, list[str]]:
    s = pd.Index(index)
    dup = s[s.duplicated()]
    return len(dup), list(dict.fromkeys(map(str, dup)))[:5]


def _check_names(adata: ad.AnnData, rep: PrepReport, what: str) -> None:
    """Warn about duplicated cell or gene names and cells labelled as another species."""
    n, ex = _duplicates(adata.obs_names)
    if n:
        rep.warn(f"{what} has {n} duplicated cell names (e.g. {', '.join(ex)}); all cells are kept in order, but tables "
                 f"keyed by cell name will be ambiguous: make them unique (adata.obs_names_make_unique())")
    n, ex = _duplicates(adata.var_names)
    if n:
        rep.warn(f"{what} has {n} duplicated gene names (e.g. {', '.join(ex)}); each name becomes one column, a cell's value "
                 f"read from the first of its columns that has one (sum them beforehand if they are parts of one gene)")
    for col in adata.obs.columns:
        if str(col).lower() in ("species", "organism"):
            vals = adata.obs[col].astype(str).str.lower()
            n_mouse = int(vals.str.contains("mouse|mus musculus|mm10|mm39", regex=True).sum())
            if n_mouse:
                rep.warn(f"obs[{col!r}] says {n_mouse} of {adata.n_obs} cells are mouse cells; scBERT's gene table and published "
                         f"models are human: check that their genes were mapped to human orthologs")


def _min_genes_filter(X: sparse.csr_matrix, obs: pd.DataFrame, min_genes: int | None, what: str, among: str = "genes"
                      ) -> tuple[sparse.csr_matrix, pd.DataFrame]:
    """Drop the cells with fewer than ``min_genes`` expressed (value > 0) genes."""
    if not min_genes:
        return X, obs
    n_expr = expressed_per_cell(X)
    keep = n_expr >= min_genes
    if not keep.any():
        raise InputError(
            f"no cell of {what} expresses at least {min_genes} {among} (the most any cell has is {int(n_expr.max())}); "
            f"lower --min-genes if these cells are genuine"
        )
    if keep.all():
        return X, obs
    return X[keep], obs.iloc[np.flatnonzero(keep)]


def _prepared_state(adata: ad.AnnData, X: sparse.csr_matrix, state: ValueState, rep: PrepReport, what: str,
                    target_sum: float) -> ValueState:
    """For output of an earlier ``prepare`` (``uns[PREP_KEY]``): log2 at ``target_sum``, unless its
    values were changed afterwards."""
    vmax = float(X.data.max()) if X.nnz else 0.0
    if X.nnz and (state.kind in ("counts", "normalized", "log_counts") or vmax > math.log2(1 + target_sum) + 0.01):
        rep.warn(f"{what} is marked as written by preprocess.py, but its values are not log2-normalised "
                 f"({state.kind}, max {vmax:.3g}): it was changed afterwards; normalising it again")
        return state
    return ValueState("log", LOG_BASE, target_sum)


def merge_duplicate_columns(X: sparse.spmatrix, merged_into: dict[int, int]) -> sparse.csr_matrix:
    """``X`` (cells x input genes) with each duplicate column's values written into the kept column
    of its gene (``merged_into``: see :class:`data.genes.RevisionReport`) in the cells where that
    column has none. A gene measured under two names (a merged object of files that name it
    differently, or an alias beside its current symbol) is read from whichever column holds it in a
    cell, so a cell's values do not depend on the other columns of its file."""
    if not merged_into:
        return X
    C = sparse.csc_matrix(X)
    rows, cols, vals, filled = [], [], [], {}
    for dup, kept in sorted(merged_into.items()):  # the first duplicate first, in input order
        has = filled.get(kept)
        if has is None:
            has = C[:, kept].toarray().ravel() != 0
        extra = C[:, dup].toarray().ravel()
        take = np.flatnonzero(~has & (extra != 0))
        rows.append(take)
        cols.append(np.full(len(take), kept))
        vals.append(extra[take])
        has[take] = True
        filled[kept] = has
    add = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=X.shape, dtype=X.dtype)
    return (sparse.csr_matrix(X) + add).tocsr()


def _revised_genes(X: sparse.csr_matrix, names: list[str], genes: Sequence[str] | None, species: str, rep: PrepReport,
                   what: str) -> tuple[sparse.csr_matrix, list[str]]:
    """The genes under current human symbols (mouse symbols mapped, aliases revised, unmatched genes
    dropped, a gene under several names merged into one column; a name already in the vocabulary
    ``genes`` kept), with their columns."""
    sp = check_species(names, vocab=genes)
    if species == "mouse" or (species == "auto" and sp.looks_mouse):
        names = mouse_to_human(names)
        rep.symbols_species = "mouse"
        rep.warn(f"the genes of {what} are mouse symbols (e.g. {', '.join(sp.examples[:3])}: {sp.n_mouse_style} of {sp.n_names} "
                 f"are capitalised like mouse genes). scBERT's vocabulary is human: mapped to human symbols by upper-casing "
                 f"(Cd3e -> CD3E, right for orthologs that share their symbol); {sp.n_upper + sp.n_as_is} genes match after "
                 f"mapping, the others are dropped", loud=True)
    new_names, sym = revise_symbols(names, vocab=genes)
    rep.symbols, rep.symbols_summary = sym.to_dict(), sym.summary()
    X = merge_duplicate_columns(X, sym.merged_into)
    kept = [j for j, n in enumerate(new_names) if n is not None]
    return (X[:, kept] if len(kept) < X.shape[1] else X), [new_names[j] for j in kept]


def _on_vocabulary(X: sparse.csr_matrix, names: list[str], genes: Sequence[str] | None, rep: PrepReport, input_names: list[str],
                   what: str) -> tuple[sparse.csr_matrix, list[str]]:
    """The cells on the vocabulary ``genes`` in its order (its genes the input lacks as zeros, with a
    loud warning below MIN_VOCAB_FRACTION present), or on their own genes without a vocabulary."""
    if genes is None:
        if not names:
            raise InputError(f"no gene of {what} matches a human NCBI gene symbol. {naming_hint(input_names)}"
                             f"scBERT needs human gene symbols (e.g. CD3E) or Ensembl ids (ENSG...); first input genes: "
                             f"{input_names[:5]}")
        return X, names
    X, present = align_to_genes(X, names, genes)
    rep.vocab_size, rep.vocab_present = len(genes), present
    measured = set(names)
    rep.missing_genes = [g for g in genes if g not in measured]
    if present == 0:
        raise InputError(
            f"none of the {len(genes)} vocabulary genes occurs in {what}. {naming_hint(input_names)}Are the genes "
            f"named by human symbol (e.g. CD3E) and is this the right model? First input genes: {input_names[:5]}; "
            f"first vocabulary genes: {list(genes[:5])}"
        )
    if present < MIN_VOCAB_FRACTION * len(genes):
        rep.warn(
            f"only {present} of {len(genes)} vocabulary genes ({100 * present / len(genes):.1f}%) are in {what}; "
            f"the other genes are treated as not expressed and predictions may be unreliable",
            loud=True,
        )
    return X, list(genes)


def prepare(
    adata: ad.AnnData,
    genes: Sequence[str] | None = None,
    n_top_genes: int | None = None,
    min_genes: int | None = MIN_GENES,
    target_sum: float = TARGET_SUM,
    what: str = "the input",
    species: str = "auto",
    library_size: str = "all",
) -> tuple[ad.AnnData, PrepReport]:
    """Full preprocessing: cells x genes of any supported kind -> log2-normalised cells x vocabulary.

    ``genes``: the target vocabulary (ordered); ``None`` builds one from the input (all revised
    genes, or the ``n_top_genes`` most variable). ``min_genes``: drop cells with fewer expressed
    genes (``None`` keeps every cell, as prediction must). ``library_size``: ``"all"`` normalises
    each cell over all its input genes, then aligns; ``"vocab"`` aligns first, then filters and
    normalises over the vocabulary genes, as the published preprocessing did (see the module
    docstring). Output of an earlier ``prepare`` (marked by ``uns[PREP_KEY]``) is never normalised
    twice; with ``"vocab"`` it is renormalised over the vocabulary unless it was prepared so already.
    Never densifies the matrix. ``species``: "auto" maps genes named like mouse symbols (Gapdh) to
    human ones by upper-casing, with a warning; "mouse" always does, "human" never does. Problems
    that are corrected are logged as warnings and listed in ``report.warnings``; problems that
    cannot be raise InputError.
    """
    if species not in SPECIES:
        raise InputError(f"species must be one of {SPECIES}, got {species!r}")
    if library_size not in LIBRARY_SIZES:
        raise InputError(f"library_size must be one of {LIBRARY_SIZES}, got {library_size!r}")
    if library_size == "vocab" and n_top_genes is not None and genes is None:
        raise InputError("library sizes over the vocabulary need a vocabulary: give --vocab, or use --library-size all with --n-top-genes")
    rep = PrepReport(n_cells_in=adata.n_obs, n_genes_in=adata.n_vars, library_size=library_size, min_genes=min_genes or None)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{what} holds {adata.n_obs} cells x {adata.n_vars} genes: nothing to work on")
    X = sparse.csr_matrix(adata.X, dtype=np.float32)
    check_values(X, what)
    _check_names(adata, rep, what)
    obs = adata.obs.copy()
    if library_size == "all":
        X, obs = _min_genes_filter(X, obs, min_genes, what)
    state = detect_state(X, input_log_base(adata.uns))  # over all input genes, whatever the library size: aligning first would hide the per-cell totals
    prepared = PREP_KEY in adata.uns
    if prepared:
        state = _prepared_state(adata, X, state, rep, what, target_sum)
    if library_size == "all":
        X, rep.normalisation = normalize_log2(X, state, target_sum)
        if state.kind == "log" and state.row_sum is None:
            rep.warn(rep.normalisation)

    X, names = _revised_genes(X, list(adata.var_names), genes, species, rep, what)
    X, var_names = _on_vocabulary(X, names, genes, rep, list(adata.var_names), what)
    if library_size == "vocab":
        X, obs = _min_genes_filter(X, obs, min_genes, what, "vocabulary genes")
        done_before = prepared and _prepared_library_size(adata) == "vocab" and list(adata.var_names) == var_names
        if done_before and state.kind == "log" and state.log_base == LOG_BASE:
            rep.normalisation = f"already log2-normalised at {target_sum:g} per cell over these {len(var_names)} genes: used as is"
        else:
            X, rep.normalisation = normalize_log2(X, state, target_sum, over=f"the {len(var_names)} vocabulary genes")
            if state.kind == "log" and state.log_base is None:
                rep.warn(rep.normalisation)
    elif genes is None and n_top_genes is not None and n_top_genes < len(var_names):
        X, var_names = _highly_variable(X, var_names, n_top_genes, what)
        rep.n_top_genes = n_top_genes

    out = ad.AnnData(X=sparse.csr_matrix(X, dtype=np.float32), obs=obs)
    out.var_names = var_names
    rep.n_cells_out, rep.n_genes_out = out.n_obs, out.n_vars
    out.uns[PREP_KEY] = json.dumps(rep.to_dict(), default=str)
    return out, rep


def _prepared_library_size(adata: ad.AnnData) -> str:
    """The library_size an earlier ``prepare`` recorded in ``uns[PREP_KEY]`` ("all" before the setting existed)."""
    try:
        return str(json.loads(adata.uns[PREP_KEY]).get("library_size", "all"))
    except (TypeError, ValueError, AttributeError):
        return "all"


def _highly_variable(X: sparse.csr_matrix, var_names: list[str], n_top_genes: int, what: str) -> tuple[sparse.csr_matrix, list[str]]:
    """The ``n_top_genes`` most variable genes (scanpy's seurat flavour on log2 data), in input order."""
    if X.nnz == 0:
        raise InputError(f"every value of {what} is zero: no gene is expressed, so none can be ranked by --n-top-genes")
    if X.shape[0] < 2:
        raise InputError(f"--n-top-genes ranks genes by their variability across cells, but {what} has {X.shape[0]} cell "
                         f"after filtering; use more cells or drop --n-top-genes")
    # scanpy's dispersion statistics assume natural-log data.
    tmp = ad.AnnData(X=X * np.float32(math.log(2.0)))
    import scanpy as sc  # imported on use: it takes seconds

    try:
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat")
    except (IndexError, ValueError) as e:  # scanpy fails on degenerate data (e.g. no variable gene)
        raise InputError(f"could not rank the genes of {what} by variability ({type(e).__name__}: {e}); "
                         f"drop --n-top-genes or use more cells") from None
    # Rank by normalised dispersion ourselves: scanpy may return more than n_top_genes on ties.
    disp = np.nan_to_num(tmp.var["dispersions_norm"].to_numpy(dtype=np.float64), nan=-np.inf)
    hv = np.sort(np.argsort(-disp, kind="stable")[:n_top_genes])
    return X[:, hv], [var_names[j] for j in hv]


def recorded_library_size(paths: Sequence[str | Path]) -> str | None:
    """The ``library_size`` preprocess.py recorded in these .h5ad files; None when none records one
    (raw counts, other formats). Files that disagree are refused."""
    found = {}
    for path in paths:
        if str(path).lower().endswith(".h5ad") and Path(path).is_file():
            try:
                uns = ad.read_h5ad(path, backed="r").uns
            except Exception:  # noqa: BLE001 - unreadable files are reported by the reader itself
                continue
            if PREP_KEY in uns:
                found[str(path)] = _prepared_library_size(ad.AnnData(uns={PREP_KEY: uns[PREP_KEY]}))
    if len(set(found.values())) > 1:
        raise InputError(f"these files were normalised with different library sizes ({found}): preprocess them the same way "
                         f"(preprocess.py --library-size)")
    return next(iter(found.values()), None)


def read_prepared(paths: Sequence[str | Path], genes: Sequence[str] | None = None, min_genes: int | None = MIN_GENES,
                  species: str = "auto", library_size: str = "all", source: CellSource | None = None) -> tuple[ad.AnnData, list[str]]:
    """Read one or more files and preprocess them onto one vocabulary: ``genes``, or else the
    first file's genes (several files: their cells stacked, ``obs['source_file']`` naming each
    cell's file). Files already written by preprocess.py are not normalised again (with
    ``library_size="vocab"`` they are renormalised over the vocabulary unless prepared so).
    ``source``: which matrix of each file (X, a layer, .raw) and which gene names (:class:`data.io.CellSource`)."""
    from data.io import DEFAULT_SOURCE, read_cells

    parts: list[ad.AnnData] = []
    for path in paths:
        raw = read_cells(path, source=source or DEFAULT_SOURCE)
        adata, rep = prepare(raw, genes=genes, min_genes=None if PREP_KEY in raw.uns else min_genes, what=str(path), species=species,
                             library_size=library_size)
        for line in rep.lines(with_warnings=False):
            log.info("%s: %s", Path(path).name, line)
        if genes is None:
            genes = list(adata.var_names)
        parts.append(adata)
    assert genes is not None
    if len(parts) == 1:
        return parts[0], list(genes)
    return stack_cells(parts, paths, genes), list(genes)


def stack_cells(parts: Sequence[ad.AnnData], paths: Sequence[str | Path], genes: Sequence[str]) -> ad.AnnData:
    """The cells of ``parts`` (one per file of ``paths``, all on ``genes``) stacked into one AnnData,
    ``obs['source_file']`` naming each cell's file (cell names made unique with it)."""
    X = sparse.vstack([p.X for p in parts], format="csr")
    obs = ad.concat([ad.AnnData(obs=p.obs) for p in parts], join="outer", label="source_file",
                    keys=[Path(p).name for p in paths], index_unique="-").obs
    out = ad.AnnData(X=X, obs=obs)
    out.var_names = list(genes)
    return out
