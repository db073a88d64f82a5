"""Marker tables and gene-set collections, and over-representation tests against a vocabulary.

Readers return plain dicts (name -> genes). Supported marker formats (:func:`read_markers`):

* PanglaoDB export (TSV, optionally gzipped; columns ``species``, ``official gene symbol``,
  ``cell type``): rows whose species field lists ``Hs`` (human) by default;
* the pegasus immune-marker JSON (``cell_types`` with ``markers`` lists of ``GENE+`` / ``GENE-``
  and nested ``subtypes``): positive markers of every named type and subtype;
* a GMT file whose set names are cell types;
* any table with a cell-type column (``cell_type``, ``celltype`` or ``cell type``) and a gene
  column (``gene``, ``symbol``, ``gene_symbol`` or ``official gene symbol``).

Tests are one-sided hypergeometric tests of the overlap between chosen genes (e.g. a cell type's
top-attended genes) and a gene set, with the model's vocabulary as the population, because only
vocabulary genes can ever be chosen. Benjamini-Hochberg adjusts p-values within one family.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from scipy.stats import hypergeom

from data.io import InputError

GENESET_DIR = Path(__file__).parent / "genesets"
DEFAULT_MARKERS = GENESET_DIR / "panglaodb_markers_2020-03-27.tsv.gz"
IMMUNE_MARKERS = GENESET_DIR / "human_immune_cell_markers.json"
DEFAULT_GMT = GENESET_DIR / "msigdb_hallmark_v7.5.1.gmt.gz"
C2_GMT = GENESET_DIR / "msigdb_c2_canonical_pathways_v7.5.1.gmt.gz"
DEFAULT_CELLTYPE_MAP = GENESET_DIR / "celltype_aliases.json"

CELLTYPE_COLUMNS = ("cell_type", "celltype", "cell type")
GENE_COLUMNS = ("gene", "symbol", "gene_symbol", "official gene symbol")


def _open_text(path: str | Path) -> TextIO:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"gene-set file {path} does not exist")
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Gene sets of a GMT file (``.gmt`` or ``.gmt.gz``): name -> genes in file order.

    Each line is ``name<TAB>description<TAB>gene<TAB>gene...``. A name seen twice gets the union
    of its genes.
    """
    sets: dict[str, list[str]] = {}
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                fields = line.split("\t")
                if len(fields) < 3:
                    raise InputError(
                        f"{path} line {lineno} is not GMT: expected set name, description and genes separated by tabs, "
                        f"got {line[:80]!r}"
                    )
                name = fields[0].strip()
                genes = [g.strip() for g in fields[2:] if g.strip()]
                known = sets.setdefault(name, [])
                known += [g for g in genes if g not in known]
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"could not read {path} as a GMT file: {e}") from None
    if not sets:
        raise InputError(f"{path} holds no gene sets")
    return sets


def _read_table(path: str | Path) -> pd.DataFrame:
    name = Path(path).name.lower()
    sep = "," if ".csv" in name else "\t"
    try:
        with _open_text(path) as f:
            return pd.read_csv(f, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"could not read {path} as a table: {e}") from None


def _column(df: pd.DataFrame, candidates: Sequence[str]) -> str | None:
    lower = {c.strip().lower(): c for c in df.columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def read_panglao(path: str | Path, species: str | None = "Hs", canonical_only: bool = False) -> dict[str, set[str]]:
    """Markers of a PanglaoDB export (or any cell type / gene table): cell type -> gene symbols.

    ``species``: keep rows whose ``species`` column lists it (``"Hs"``, ``"Mm"``; rows with a
    missing species are dropped); ``None`` keeps every row. ``canonical_only``: only rows with
    ``canonical marker`` = 1.
    """
    df = _read_table(path)
    ct_col, gene_col = _column(df, CELLTYPE_COLUMNS), _column(df, GENE_COLUMNS)
    if ct_col is None or gene_col is None:
        raise InputError(
            f"{path} is not a marker table: it needs a cell-type column ({' / '.join(CELLTYPE_COLUMNS)}) and a gene column "
            f"({' / '.join(GENE_COLUMNS)}); its columns are {list(df.columns)[:10]}"
        )
    sp_col = _column(df, ("species",))
    if species is not None and sp_col is not None:
        df = df[df[sp_col].str.split().apply(lambda s: species in s)]
        if df.empty:
            raise InputError(f"{path} has no marker for species {species!r} (its species column holds e.g. {sorted(set(_read_table(path)[sp_col]))[:5]})")
    if canonical_only:
        can = _column(df, ("canonical marker",))
        if can is None:
            raise InputError(f"{path} has no 'canonical marker' column to select canonical markers by")
        df = df[df[can].str.strip() == "1"]
    out: dict[str, set[str]] = {}
    for ct, gene in zip(df[ct_col].str.strip(), df[gene_col].str.strip()):
        if ct and gene:
            out.setdefault(ct, set()).add(gene)
    if not out:
        raise InputError(f"{path} holds no (cell type, gene) rows")
    return out


def read_marker_json(path: str | Path, negative: bool = False) -> dict[str, set[str]]:
    """Markers of a pegasus-style JSON file: cell type -> positive (``GENE+``) marker genes.

    Subtypes (``subtypes.cell_types``) are entries of their own; they do not add their markers to
    the parent type. ``negative=True`` returns the negative (``GENE-``) markers instead.
    """
    try:
        with _open_text(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cell_types"), list):
        raise InputError(f"{path} is not a marker JSON file: expected an object with a 'cell_types' list (pegasus format)")
    want = "-" if negative else "+"
    out: dict[str, set[str]] = {}

    def walk(types: list[Any], where: str) -> None:
        for t in types:
            if not isinstance(t, dict) or "name" not in t:
                raise InputError(f"{path}: every entry of {where} needs a 'name' and a 'markers' list")
            genes = out.setdefault(str(t["name"]).strip(), set())
            for block in t.get("markers", []):
                for g in block.get("genes", []):
                    g = str(g).strip()
                    if g.endswith(("+", "-")):
                        if g[-1] == want:
                            genes.add(g[:-1])
                    elif not negative:
                        genes.add(g)
            sub = t.get("subtypes")
            if isinstance(sub, dict) and isinstance(sub.get("cell_types"), list):
                walk(sub["cell_types"], f"subtypes of {t['name']}")

    walk(doc["cell_types"], "cell_types")
    return {k: v for k, v in out.items() if v}


def read_markers(path: str | Path, species: str | None = "Hs") -> dict[str, set[str]]:
    """Marker genes per cell type from any supported file, chosen by its name (see module docstring)."""
    name = Path(path).name.lower()
    if name.endswith((".gmt", ".gmt.gz")):
        return {k: set(v) for k, v in read_gmt(path).items()}
    if name.endswith((".json", ".json.gz")):
        return read_marker_json(path)
    if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz", ".csv", ".csv.gz")):
        return read_panglao(path, species=species)
    raise InputError(f"cannot tell the format of marker file {path}: use .tsv[.gz]/.csv (PanglaoDB-style table), .json (pegasus) or .gmt[.gz]")


def align_gene_sets(sets: Mapping[str, Iterable[str]], vocab: Sequence[str]) -> dict[str, set[str]]:
    """Each set restricted to ``vocab``, after renaming outdated symbols and aliases to the
    vocabulary's names (``data.genes.revise_symbols``) and matching case-insensitively."""
    from data.genes import revise_symbols

    vocab_set = set(vocab)
    upper = {}
    for g in vocab:
        upper.setdefault(g.upper(), g)
    names = sorted({g for genes in sets.values() for g in genes})
    rename: dict[str, str] = {}
    todo = []
    for g in names:
        if g in vocab_set:
            rename[g] = g
        elif g.upper() in upper:
            rename[g] = upper[g.upper()]
        else:
            todo.append(g)
    if todo:
        revised, _ = revise_symbols(todo, vocab=vocab_set)
        rename.update({g: r for g, r in zip(todo, revised) if r is not None and r in vocab_set})
    return {k: {rename[g] for g in genes if g in rename} for k, genes in sets.items()}


def _norm_name(name: str) -> str:
    s = re.sub(r"[\s_\-]+", " ", name.strip().lower())
    s = re.sub(r" cells?$", "", s)
    return s[:-1] if s.endswith("s") and len(s) > 3 else s


def read_celltype_map(path: str | Path) -> dict[str, list[str]]:
    """A JSON object: our label -> marker-table type name or list of names (keys starting with
    ``_`` are comments). An empty list means: no markers for that label."""
    try:
        with _open_text(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"cell-type map {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InputError(f"cell-type map {path} must be a JSON object: {{\"our label\": [\"marker table type\", ...]}}")
    out = {}
    for k, v in doc.items():
        if k.startswith("_"):
            continue
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise InputError(f"cell-type map {path}: the value of {k!r} must be a name or a list of names")
        out[k] = v
    return out


def match_celltypes(labels: Iterable[str], marker_types: Iterable[str], mapping: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """For each label, the marker-table types it stands for.

    A label in ``mapping`` takes the mapped names that exist in the table (compared
    case-insensitively); any other label is matched by name, ignoring case, plurals and a
    trailing "cell(s)" (``Platelet`` = ``Platelets``, ``NK`` = ``NK cells``, ``alpha`` =
    ``Alpha cells``). Labels without a match get an empty list.
    """
    types = list(marker_types)
    by_lower = {t.lower(): t for t in types}
    by_norm: dict[str, list[str]] = {}
    for t in types:
        by_norm.setdefault(_norm_name(t), []).append(t)
    mapping = mapping or {}
    out = {}
    for label in labels:
        if label in mapping:
            out[label] = [by_lower[n.lower()] for n in mapping[label] if n.lower() in by_lower]
        else:
            out[label] = list(by_norm.get(_norm_name(label), []))
    return out


@dataclass
class Overlap:
    """A hypergeometric over-representation test of ``selected`` genes in a gene set."""

    population: int  # genes that could be drawn (the vocabulary)
    set_size: int  # genes of the set in the population
    drawn: int  # selected genes
    overlap: int
    expected: float
    fold_enrichment: float
    pvalue: float
    genes: list[str] = field(default_factory=list)  # the overlapping genes, in selection order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hypergeom_overlap(selected: Sequence[str], gene_set: Iterable[str], population: Iterable[str]) -> Overlap:
    """P(X >= overlap) for X ~ Hypergeometric(population, set ∩ population, len(selected)).

    ``selected`` must lie within ``population``.
    """
    pop = population if isinstance(population, (set, frozenset)) else set(population)
    sel = list(dict.fromkeys(selected))
    outside = [g for g in sel if g not in pop]
    if outside:
        raise ValueError(f"{len(outside)} selected genes are not in the population, e.g. {outside[:3]}")
    in_set = set(gene_set) & pop
    hits = [g for g in sel if g in in_set]
    M, n, N, x = len(pop), len(in_set), len(sel), len(hits)
    expected = N * n / M if M else 0.0
    p = float(hypergeom.sf(x - 1, M, n, N)) if n and N else 1.0
    fold = x / expected if expected > 0 else float("nan")
    return Overlap(M, n, N, x, expected, fold, min(max(p, 0.0), 1.0), hits)


def bh_adjust(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR q-values), in input order; NaNs stay NaN and
    are not counted as tests."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return out


def enrich(selected: Sequence[str], gene_sets: Mapping[str, Iterable[str]], population: Iterable[str],
           min_size: int = 5, max_size: int | None = 500) -> pd.DataFrame:
    """Over-representation of ``selected`` genes in every gene set, BH-adjusted across the sets tested.

    Sets are intersected with ``population`` first; those with fewer than ``min_size`` or more
    than ``max_size`` genes left are not tested. Columns: gene_set, set_size, overlap, expected,
    fold_enrichment, pvalue, fdr, overlap_genes (``;``-separated); sorted by p-value.
    """
    pop = set(population)
    rows = []
    for name, genes in gene_sets.items():
        o = hypergeom_overlap(selected, genes, pop)
        if o.set_size < min_size or (max_size is not None and o.set_size > max_size):
            continue
        rows.append((name, o.set_size, o.overlap, o.expected, o.fold_enrichment, o.pvalue, ";".join(o.genes)))
    df = pd.DataFrame(rows, columns=["gene_set", "set_size", "overlap", "expected", "fold_enrichment", "pvalue", "overlap_genes"])
    df.insert(6, "fdr", bh_adjust(df["pvalue"].to_numpy()))
    return df.sort_values(["pvalue", "gene_set"], kind="stable").reset_index(drop=True)


def marker_overlap(top: Mapping[str, Sequence[str]], markers: Mapping[str, Iterable[str]], population: Sequence[str],
                   mapping: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """For each cell type, how many of its ``top`` genes are known markers of that type.

    ``markers``: marker-table type -> genes (already aligned to ``population``, see
    :func:`align_gene_sets`); labels are matched to table types by :func:`match_celltypes`
    (a label standing for several types gets the union of their markers). Columns: cell_type,
    marker_types, n_markers (in the population), top_k, overlap, expected, fold_enrichment,
    pvalue, fdr (BH across the cell types tested), overlap_genes.
    """
    pop = set(population)
    matched = match_celltypes(top.keys(), markers.keys(), mapping)
    rows = []
    for label, genes in top.items():
        types = matched[label]
        if not types:
            rows.append((label, "", 0, len(genes), 0, np.nan, np.nan, np.nan, ""))
            continue
        union = set().union(*(set(markers[t]) for t in types))
        o = hypergeom_overlap(genes, union, pop)
        rows.append((label, ";".join(types), o.set_size, o.drawn, o.overlap, o.expected, o.fold_enrichment, o.pvalue, ";".join(o.genes)))
    df = pd.DataFrame(rows, columns=["cell_type", "marker_types", "n_markers", "top_k", "overlap", "expected",
                                     "fold_enrichment", "pvalue", "overlap_genes"])
    df.insert(8, "fdr", bh_adjust(df["pvalue"].to_numpy()))
    return df
