"""Gene vocabularies (the ordered genes a model reads, one token position each) and name lists.

A vocabulary stored in a checkpoint is read by :func:`model.checkpoint.load_vocab`, which also
accepts every source this module reads.
"""

from __future__ import annotations

from pathlib import Path

from data.io import InputError, read_var_names

NAME_KINDS = ("genes", "classes")


def read_name_list(path: str | Path, kind: str = "genes") -> list[str]:
    """Names from a text file, one per line, in order; the one reader of gene and class lists.

    Surrounding spaces, blank lines and lines starting with ``#`` are ignored. For ``kind="genes"``
    only the first field of a line is kept when it holds several (tab- or comma-separated, as in
    a table of genes); class names are kept whole, commas included (``B cell, naive``). Names must
    be unique.
    """
    if kind not in NAME_KINDS:
        raise ValueError(f"kind must be one of {NAME_KINDS}, got {kind!r}")
    what = "gene list" if kind == "genes" else "class list"
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    names: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            names.append(line.replace(",", "\t").split("\t")[0].strip() if kind == "genes" else line)
    if not names:
        raise InputError(f"{what} {path} is empty")
    dup = len(names) - len(set(names))
    if dup:
        if kind == "genes":
            raise InputError(f"{what} {path} has {dup} duplicated gene names; a vocabulary needs unique names")
        raise InputError(f"{what} {path} has {dup} duplicated names; every class needs its own name")
    return names


def read_vocab_file(source: str | Path) -> list[str]:
    """The ordered vocabulary of a gene list (.txt/.tsv/.csv) or of an .h5ad (its var_names, e.g.
    the output of preprocess.py). Checkpoints: see :func:`model.checkpoint.load_vocab`."""
    path = Path(source)
    if not path.is_file():
        raise InputError(f"vocabulary {path} does not exist")
    if path.name.lower().endswith(".h5ad"):
        genes = read_var_names(path)
        if len(set(genes)) != len(genes):
            raise InputError(f"{path} has duplicated gene names; run it through preprocess.py first")
        return genes
    return read_name_list(path, "genes")
