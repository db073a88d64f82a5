"""Gene vocabularies: the ordered list of genes a model reads, one token position each."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data.io import InputError


def read_gene_list(path: str | Path) -> list[str]:
    """A text file with one gene per line (blank lines and ``#`` comments ignored; a first
    column is taken when lines hold several tab/comma-separated fields)."""
    path = Path(path)
    genes: list[str] = []
    if not path.is_file():
        raise InputError(f"gene list {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            genes.append(line.replace(",", "\t").split("\t")[0].strip())
    if not genes:
        raise InputError(f"gene list {path} is empty")
    dup = len(genes) - len(set(genes))
    if dup:
        raise InputError(f"gene list {path} has {dup} duplicated gene names; a vocabulary needs unique names")
    return genes


def load_vocab(source: str | Path) -> list[str]:
    """The ordered vocabulary from a gene list (.txt/.tsv/.csv), one of our checkpoints, or an .h5ad
    (its var_names, e.g. the output of preprocess.py)."""
    path = Path(source)
    if not path.is_file():
        raise InputError(f"vocabulary {path} does not exist")
    suffix = path.name.lower()
    if suffix.endswith((".pt", ".pth", ".ckpt")):
        from model.checkpoint import CheckpointError, load_checkpoint

        try:
            return list(load_checkpoint(path).genes)
        except CheckpointError as e:
            raise InputError(f"vocabulary: {e}") from None
    if suffix.endswith(".h5ad"):

        from data.io import read_var_names

        genes = read_var_names(path)
        if len(set(genes)) != len(genes):
            raise InputError(f"{path} has duplicated gene names; run it through preprocess.py first")
        return genes
    return read_gene_list(path)


def write_gene_list(path: str | Path, genes: Sequence[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{g}\n" for g in genes))
    os.replace(tmp, path)
