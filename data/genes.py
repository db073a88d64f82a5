"""Gene-symbol revision against the bundled NCBI human gene table.

Datasets name genes with whatever symbol set was current when they were
processed (e.g. ``SEPT1`` before the 2020 rename to ``SEPTIN1``), or with
Ensembl ids. :func:`revise_symbols` maps such names onto current NCBI symbols
(or onto a target vocabulary) so that fewer genes are lost when a dataset is
aligned to a model's gene vocabulary.

The table (``gene_table.tsv.gz`` next to this module) is built by
``scripts/build_gene_table.py`` from NCBI Gene as packaged in Bioconductor
``org.Hs.eg.db`` 3.16 (Artistic-2.0, NCBI date 2022-09-12).
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TABLE_PATH = Path(__file__).parent / "gene_table.tsv.gz"

_TABLE_COLUMNS = ("symbol", "gene_type", "ensembl_ids", "aliases")
_ENSEMBL_GENE = re.compile(r"(ENSG\d+)(?:\.\d+)?")
_MOUSE_STYLE = re.compile(r"[A-Z][a-z0-9]+(?:[-.][A-Za-z0-9]+)*")  # Gapdh, Cd3e, Hist1h2bc: one capital, then lower case

STATUS_MATCHED = "matched"
STATUS_REVISED = "revised"
STATUS_ENSEMBL = "ensembl"
STATUS_UNMATCHED = "unmatched"
STATUS_DUPLICATE = "duplicate"


@dataclass(frozen=True, eq=False)
class GeneTable:
    """Look-up tables derived from the NCBI human gene list.

    Attributes:
        symbols: current official gene symbols.
        alias_to_symbols: alias or previous symbol -> the current symbols it may
            denote (sorted). Names that are themselves current symbols are never
            keys: a current symbol always takes precedence over an alias.
        ensembl_to_symbol: Ensembl gene id (no version) -> symbol, only for ids
            that map to exactly one symbol.
        gene_types: symbol -> NCBI gene type (e.g. ``protein-coding``).
        source: description of the source data (the table's header comment).
    """

    symbols: frozenset[str]
    alias_to_symbols: dict[str, tuple[str, ...]]
    ensembl_to_symbol: dict[str, str]
    gene_types: dict[str, str] = field(default_factory=dict)
    source: str = ""


def _read_table(path: Path) -> GeneTable:
    """Parse a gene table file written by ``scripts/build_gene_table.py``."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    source = ""
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        source = source or lines[start].lstrip("#").strip()
        start += 1
    if start >= len(lines) or tuple(lines[start].split("\t")) != _TABLE_COLUMNS:
        raise ValueError(
            f"{path}: not a gene table (expected columns {_TABLE_COLUMNS})"
        )

    rows = [line.split("\t") for line in lines[start + 1 :] if line]
    gene_types: dict[str, str] = {}
    for symbol, gene_type, _, _ in rows:
        gene_types.setdefault(symbol, gene_type)
    symbols = frozenset(gene_types)

    alias_lists: dict[str, list[str]] = {}
    ensembl_lists: dict[str, list[str]] = {}
    for symbol, _, ensembl_ids, aliases in rows:
        if aliases:
            for alias in aliases.split("|"):
                if alias and alias not in symbols:
                    alias_lists.setdefault(alias, []).append(symbol)
        if ensembl_ids:
            for ensembl_id in ensembl_ids.split("|"):
                if ensembl_id:
                    ensembl_lists.setdefault(ensembl_id, []).append(symbol)

    alias_to_symbols = {
        alias: (targets[0],) if len(targets) == 1 else tuple(sorted(set(targets)))
        for alias, targets in alias_lists.items()
    }
    ensembl_to_symbol = {
        ensembl_id: targets[0]
        for ensembl_id, targets in ensembl_lists.items()
        if len(targets) == 1 or len(set(targets)) == 1
    }
    return GeneTable(
        symbols=symbols,
        alias_to_symbols=alias_to_symbols,
        ensembl_to_symbol=ensembl_to_symbol,
        gene_types=gene_types,
        source=source,
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scbert"


@functools.lru_cache(maxsize=1)
def _load_default_table() -> GeneTable:
    """Load (once) the table bundled next to this module. The parsed table is kept in the user's
    cache folder (``$XDG_CACHE_HOME/scbert``, or ``~/.cache/scbert``), keyed by the file's size and
    time stamp: loading it takes a fifth of the time of parsing the file, which every query paid."""
    st = DEFAULT_TABLE_PATH.stat()
    cached = _cache_dir() / f"gene_table-{st.st_size}-{st.st_mtime_ns}.pkl"
    try:
        with open(cached, "rb") as f:
            table = pickle.load(f)
        if isinstance(table, GeneTable):
            return table
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError):
        pass
    table = _read_table(DEFAULT_TABLE_PATH)
    try:  # a cache that cannot be written (read-only home) only costs the parse next time
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(table, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
    except OSError:
        pass
    return table


def load_gene_table(path: str | Path | None = None) -> GeneTable:
    """Load a gene table; ``None`` gives the bundled table (cached)."""
    if path is None:
        return _load_default_table()
    return _read_table(Path(path))


@dataclass
class RevisionReport:
    """Outcome of :func:`revise_symbols`.

    ``n_matched + n_revised + n_ensembl == n_kept`` and
    ``n_kept + n_unmatched + n_duplicate == n_input``. ``n_matched`` counts
    names kept unchanged (current symbols, or names already in the vocabulary).
    ``revised`` maps every renamed, kept input (alias or Ensembl id) to its new
    name; ``unmatched`` and ``duplicates`` list the dropped input names;
    ``merged_into`` maps each duplicate's input position to the position of
    the kept input of the same gene (whose column it fills, see
    :func:`data.preprocess.merge_duplicate_columns`).
    """

    n_input: int = 0
    n_matched: int = 0
    n_revised: int = 0
    n_ensembl: int = 0
    n_unmatched: int = 0
    n_duplicate: int = 0
    n_kept: int = 0
    revised: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    merged_into: dict[int, int] = field(default_factory=dict)
    used_vocab: bool = False

    def summary(self) -> str:
        """One-paragraph human-readable summary."""
        matched_what = (
            "current NCBI symbols or the vocabulary"
            if self.used_vocab
            else "current NCBI symbols"
        )
        return (
            f"{self.n_input} input genes: {self.n_matched} matched {matched_what}, "
            f"{self.n_revised} revised from aliases/previous symbols, "
            f"{self.n_ensembl} Ensembl ids mapped, "
            f"{self.n_unmatched} unmatched genes dropped, {self.n_duplicate} duplicated genes merged into their gene's column; "
            f"{self.n_kept} kept."
        )

    def to_dict(self, max_examples: int = 50) -> dict[str, Any]:
        """JSON-serialisable dict: full counts, lists capped at ``max_examples``."""
        revised_items = list(self.revised.items())[:max_examples]
        return {
            "n_input": self.n_input,
            "n_matched": self.n_matched,
            "n_revised": self.n_revised,
            "n_ensembl": self.n_ensembl,
            "n_unmatched": self.n_unmatched,
            "n_duplicate": self.n_duplicate,
            "n_kept": self.n_kept,
            "used_vocab": self.used_vocab,
            "revised": dict(revised_items),
            "unmatched": list(self.unmatched[:max_examples]),
            "duplicates": list(self.duplicates[:max_examples]),
            "summary": self.summary(),
        }


def _as_set(vocab: Collection[str] | None) -> Collection[str] | None:
    return vocab if vocab is None or isinstance(vocab, (set, frozenset, dict)) else set(vocab)


def _all_in(names: Sequence[str], vocab_set: Collection[str] | None) -> bool:
    """Whether ``vocab_set`` is given and holds every one of ``names``."""
    return vocab_set is not None and all(isinstance(n, str) and n in vocab_set for n in names)


def revise_symbols(
    names: Sequence[str],
    vocab: Collection[str] | None = None,
    table: GeneTable | None = None,
) -> tuple[list[str | None], RevisionReport]:
    """Map gene names to current NCBI symbols (or to ``vocab``).

    Returns one entry per input: the name to use, or ``None`` to drop the gene.
    Rules, first that applies: a name already in ``vocab`` is kept unchanged;
    a current symbol is kept; an Ensembl gene id (version optional) is mapped
    to its symbol; an alias/previous symbol is renamed when it denotes exactly
    one current symbol (with ``vocab``: exactly one in ``vocab``, if any of its
    candidates is there); anything else is dropped. Afterwards names that
    collide keep one gene only: the one whose name was unchanged, else the
    first. Matching is case-sensitive; no ortholog mapping is done.
    """
    vocab_set = _as_set(vocab)
    if table is None and not _all_in(names, vocab_set):  # names all in the vocabulary need no table (~1 s to read)
        table = load_gene_table()
    symbols = table.symbols if table is not None else frozenset()
    aliases = table.alias_to_symbols if table is not None else {}
    ensembl = table.ensembl_to_symbol if table is not None else {}
    ensembl_match = _ENSEMBL_GENE.fullmatch

    targets: list[str | None] = [None] * len(names)
    statuses: list[str] = [STATUS_UNMATCHED] * len(names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if (vocab_set is not None and name in vocab_set) or name in symbols:
            targets[i] = name
            statuses[i] = STATUS_MATCHED
            continue
        if name.startswith("ENSG"):
            match = ensembl_match(name)
            symbol = ensembl.get(match.group(1)) if match else None
            if symbol is not None:
                targets[i] = symbol
                statuses[i] = STATUS_ENSEMBL
                continue
        candidates = aliases.get(name)
        if candidates:
            if vocab_set is not None and len(candidates) > 1:
                in_vocab = tuple(c for c in candidates if c in vocab_set)
                if in_vocab:
                    candidates = in_vocab
            if len(candidates) == 1:
                targets[i] = candidates[0]
                statuses[i] = STATUS_REVISED

    # Resolve collisions: an unchanged name beats a renamed one, else first wins.
    owner: dict[str, int] = {}
    for i, target in enumerate(targets):
        if target is None:
            continue
        current = owner.get(target)
        if current is None or (names[current] != target and names[i] == target):
            owner[target] = i

    report = RevisionReport(n_input=len(names), used_vocab=vocab is not None)
    for i, target in enumerate(targets):
        name = names[i]
        if target is None:
            report.unmatched.append(str(name))
            continue
        if owner[target] != i:
            targets[i] = None
            statuses[i] = STATUS_DUPLICATE
            report.duplicates.append(name)
            report.merged_into[i] = owner[target]
            continue
        if statuses[i] != STATUS_MATCHED:
            report.revised[name] = target
    for status in statuses:
        if status == STATUS_MATCHED:
            report.n_matched += 1
        elif status == STATUS_REVISED:
            report.n_revised += 1
        elif status == STATUS_ENSEMBL:
            report.n_ensembl += 1
        elif status == STATUS_DUPLICATE:
            report.n_duplicate += 1
        else:
            report.n_unmatched += 1
    report.n_kept = report.n_matched + report.n_revised + report.n_ensembl
    return targets, report


@dataclass
class SpeciesCheck:
    """Do gene names look like mouse symbols (``Gapdh``) rather than human ones (``GAPDH``)?"""

    n_names: int = 0
    n_mouse_style: int = 0  # capitalised like mouse symbols
    n_as_is: int = 0  # names found as they are (human symbols or the vocabulary)
    n_upper: int = 0  # names found only once upper-cased
    examples: list[str] = field(default_factory=list)

    @property
    def looks_mouse(self) -> bool:
        return (
            self.n_names > 0
            and self.n_mouse_style >= 0.5 * self.n_names
            and self.n_upper >= max(1, 2 * self.n_as_is)
        )


def check_species(names: Sequence[str], vocab: Collection[str] | None = None, table: GeneTable | None = None) -> SpeciesCheck:
    """Count mouse-style names and how many match the human table (or ``vocab``) as they are or upper-cased."""
    if table is None and _all_in(names, _as_set(vocab)):
        return SpeciesCheck(n_names=len(names), n_mouse_style=sum(bool(_MOUSE_STYLE.fullmatch(n)) for n in names), n_as_is=len(names))
    if table is None:
        table = load_gene_table()
    known: Collection[str] = table.symbols if vocab is None else set(vocab) | table.symbols
    res = SpeciesCheck(n_names=len(names))
    for name in names:
        if not isinstance(name, str):
            continue
        if _MOUSE_STYLE.fullmatch(name):
            res.n_mouse_style += 1
        if name in known or name in table.alias_to_symbols:
            res.n_as_is += 1
        elif name.upper() in known or name.upper() in table.alias_to_symbols:
            res.n_upper += 1
            if len(res.examples) < 5:
                res.examples.append(name)
    return res


def mouse_to_human(names: Sequence[str]) -> list[str]:
    """Approximate mouse-to-human orthology by upper-casing symbols (Cd3e -> CD3E, Gapdh -> GAPDH).

    Right for most one-to-one orthologs, which share the symbol; genes without a same-named human
    ortholog are then dropped as unmatched by :func:`revise_symbols`.
    """
    return [n.upper() if isinstance(n, str) else n for n in names]
