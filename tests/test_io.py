"""Readers for the supported input formats, and their errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import io as spio
from scipy import sparse

from data.io import InputError, check_writable, read_cells

X = np.array([[1, 0, 3], [0, 5, 6]], dtype=np.float32)
GENES = ["CD3E", "LYZ", "MS4A1"]
CELLS = ["AAAC-1", "AAAG-1"]


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "cells.csv"
    pd.DataFrame(X, index=CELLS, columns=GENES).to_csv(path)
    a = read_cells(path)
    assert list(a.var_names) == GENES and list(a.obs_names) == CELLS
    assert sparse.issparse(a.X) and a.X.toarray().tolist() == X.tolist()
    t = tmp_path / "genes_by_cells.csv"
    pd.DataFrame(X.T, index=GENES, columns=CELLS).to_csv(t)
    assert read_cells(t, transpose=True).X.toarray().tolist() == X.tolist()


def test_10x_matrix_folder(tmp_path: Path) -> None:
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    spio.mmwrite(str(folder / "matrix.mtx"), sparse.coo_matrix(X.T))
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        f.write((folder / "matrix.mtx").read_bytes())
    (folder / "matrix.mtx").unlink()
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        f.writelines(f"ENSG{i:011d}\t{g}\tGene Expression\n" for i, g in enumerate(GENES))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.writelines(f"{c}\n" for c in CELLS)
    a = read_cells(folder)
    assert list(a.var_names) == GENES and a.X.toarray().tolist() == X.tolist()


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_cells(tmp_path / "nope.h5ad")
    empty = tmp_path / "empty.h5ad"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_cells(empty)
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(InputError, match="could not read"):
        read_cells(junk)
    odd = tmp_path / "cells.xlsx"
    odd.write_bytes(b"x")
    with pytest.raises(InputError, match="cannot tell the format"):
        read_cells(odd)
    with pytest.raises(InputError, match="no matrix.mtx"):
        read_cells(tmp_path)


def test_check_writable(tmp_path: Path) -> None:
    out = tmp_path / "x.h5ad"
    assert check_writable(out) == out
    out.write_text("")
    with pytest.raises(InputError, match="--overwrite"):
        check_writable(out)
    assert check_writable(out, overwrite=True) == out
