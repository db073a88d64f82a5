"""An ``.h5ad`` too large for memory: its cells read a chunk at a time, and results written into a
copy of it a chunk at a time.

:class:`ChunkedH5ad` opens the file with h5py and reads rows ``start:stop`` of the matrix a
:class:`data.io.CellSource` names (``X``, a layer or ``.raw``; sparse by cell, or dense) as an
in-memory AnnData that :func:`data.preprocess.prepare` takes. Only the genes table is held in
memory. :class:`H5adCopy` writes an output that is the input file (copied as it is on disk) plus
new ``obs`` columns, ``obsm`` arrays filled a chunk at a time, and ``uns`` entries, in anndata's
on-disk format, so ``anndata.read_h5ad`` reads it like any other file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from data.io import DEFAULT_SOURCE, CellSource, InputError, gene_names, resolve_source
from data.preprocess import PREP_KEY

_io = getattr(ad, "io", None)
read_elem = getattr(_io, "read_elem", None) or ad.experimental.read_elem
write_elem = getattr(_io, "write_elem", None) or ad.experimental.write_elem
sparse_dataset = getattr(_io, "sparse_dataset", None) or ad.experimental.sparse_dataset



def _encoding(elem: Any) -> str:
    return str(elem.attrs.get("encoding-type", "array" if isinstance(elem, h5py.Dataset) else "group"))


def read_obs_column(path: str | Path, key: str, file: h5py.File | None = None) -> pd.Series:
    """One column of an ``.h5ad``'s ``obs`` for all cells, without reading the rest of the file
    (a categorical column as codes and categories)."""
    if file is None:
        try:
            file = h5py.File(path, "r")
        except OSError as e:
            raise InputError(f"could not read {path}: {e}. Is it a complete .h5ad file?") from None
        with file:
            return read_obs_column(path, key, file)
    obs = file["obs"]
    if key not in obs:
        cols = [str(c) for c in obs.attrs.get("column-order", [])]
        raise InputError(f"{key!r} is not a column of obs in {path}; available columns: {cols}")
    return pd.Series(read_elem(obs[key]), name=key)


class ChunkedH5ad:
    """Rows of one matrix of an ``.h5ad`` on disk, a chunk at a time (see the module docstring)."""

    def __init__(self, path: str | Path, source: CellSource = DEFAULT_SOURCE) -> None:
        self.path = Path(path)
        if not self.path.is_file() or self.path.suffix.lower() != ".h5ad":
            raise InputError(f"{path}: reading a chunk of cells at a time needs an .h5ad file; convert other formats with "
                             f"preprocess.py or anndata first, or read the file into memory (drop --backed)")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise InputError(f"could not read {path}: {e}. Is it a complete .h5ad file?") from None
        f = self.file
        obs = f["obs"]
        self._index = obs[obs.attrs.get("_index", "_index")]
        self.n_obs = int(self._index.shape[0])
        if self.n_obs == 0:
            raise InputError(f"{path} holds no cells")
        # what preparing a chunk reads of uns: preprocess.py's mark and the log base (scanpy's record, or the one given)
        kept = {key: read_elem(f["uns"][key]) for key in (PREP_KEY, "log1p") if "uns" in f and key in f["uns"]}
        self.source = resolve_source(self._sample(min(self.n_obs, 2000)), source, str(path))
        self.uns = self.source.uns(kept)
        self._matrix, var = self._element(self.source)
        self.var_names = gene_names(var, self.source.gene_symbols, str(path))
        enc = _encoding(self._matrix)
        if enc == "csc_matrix":
            raise InputError(f"{self._key(self.source)} of {path} is stored by gene (CSC), so each chunk of cells would read the whole "
                             f"matrix: rewrite it by cell (adata.X = adata.X.tocsr(); adata.write_h5ad(...)) or drop --backed")
        if enc not in ("csr_matrix", "array"):
            raise InputError(f"{self._key(self.source)} of {path} is stored as {enc!r}, which cannot be read a chunk at a time; "
                             f"drop --backed")
        self._rows = sparse_dataset(self._matrix) if enc == "csr_matrix" else self._matrix

    @staticmethod
    def _key(source: CellSource) -> str:
        return "raw/X" if source.use_raw else f"layers/{source.layer}" if source.layer is not None else "X"

    def _element(self, source: CellSource) -> tuple[Any, pd.DataFrame]:
        f, key = self.file, self._key(source)
        if key not in f:
            held = ["X" if "X" in f else None, *(f"layers[{k!r}]" for k in f.get("layers", {})), ".raw" if "raw" in f else None]
            raise InputError(f"{self.path} has no {source.describe().split(',')[0]}; it holds {', '.join(h for h in held if h)}")
        return f[key], read_elem(f["raw/var" if source.use_raw else "var"])

    @staticmethod
    def _read(elem: Any, start: int, stop: int) -> sparse.csr_matrix:
        M = sparse_dataset(elem)[start:stop] if _encoding(elem) in ("csr_matrix", "csc_matrix") else np.asarray(elem[start:stop])
        return sparse.csr_matrix(M, dtype=np.float32)

    def _sample(self, n: int) -> ad.AnnData:
        """The first ``n`` cells with every matrix the file holds, to tell which one to read."""
        f = self.file
        X = self._read(f["X"], 0, n) if "X" in f else None
        var = read_elem(f["var"])
        layers = {k: self._read(f["layers"][k], 0, n) for k in f.get("layers", {})}
        obs = pd.DataFrame(index=[str(i) for i in range(n)])
        a = ad.AnnData(X=X, var=var, layers=layers, obs=obs) if X is not None else ad.AnnData(var=var, layers=layers, obs=obs, shape=(n, len(var)))
        if "raw" in f:
            a.raw = ad.AnnData(X=self._read(f["raw/X"], 0, n), var=read_elem(f["raw/var"]), obs=a.obs)
        return a

    def obs_names(self, start: int, stop: int) -> list[str]:
        return [str(v) for v in self._index.asstr()[start:stop]] if self._index.dtype.kind == "O" else list(map(str, self._index[start:stop]))

    def obs_column(self, key: str) -> pd.Series:
        """One column of ``obs`` for all cells."""
        return read_obs_column(self.path, key, self.file)

    def chunk(self, start: int, stop: int) -> ad.AnnData:
        """Cells ``start:stop``: ``X`` the chosen matrix (CSR float32), their names, the genes."""
        rows = self._rows[start:stop]
        X = sparse.csr_matrix(rows if sparse.issparse(rows) else np.asarray(rows), dtype=np.float32)
        out = ad.AnnData(X=X, obs=pd.DataFrame(index=self.obs_names(start, stop)), uns=dict(self.uns))
        out.var_names = self.var_names
        return out

    def take(self, rows: np.ndarray) -> ad.AnnData:
        """The cells ``rows`` (sorted, any spacing), as :meth:`chunk` gives a range."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = [self._rows[int(r):int(r) + 1] for r in rows]  # row by row: h5py reads scattered rows no faster
        X = sparse.vstack([sparse.csr_matrix(p if sparse.issparse(p) else np.asarray(p), dtype=np.float32) for p in parts], format="csr")
        names = [self.obs_names(int(r), int(r) + 1)[0] for r in rows]
        out = ad.AnnData(X=X, obs=pd.DataFrame(index=names), uns=dict(self.uns))
        out.var_names = self.var_names
        return out

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ChunkedH5ad:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class H5adCopy:
    """An output ``.h5ad``: a copy of ``source`` plus ``obsm`` arrays written a chunk at a time
    (:meth:`write_rows`), then ``obs`` columns and ``uns`` entries (:meth:`finish`). Existing
    entries of the same names are replaced, as writing them into an AnnData would."""

    def __init__(self, source: str | Path, path: str | Path) -> None:
        shutil.copyfile(source, path)
        self.file = h5py.File(path, "r+")
        self.n_obs = int(self.file["obs"][self.file["obs"].attrs.get("_index", "_index")].shape[0])

    def _group(self, name: str) -> h5py.Group:
        if name not in self.file:
            write_elem(self.file, name, {})
        return self.file[name]

    def _replace(self, group: h5py.Group, key: str) -> None:
        if key in group:
            del group[key]

    def write_rows(self, key: str, start: int, values: np.ndarray) -> None:
        """Rows ``start:start+len(values)`` of ``obsm[key]`` (created, cells x columns, on first use)."""
        obsm = self._group("obsm")
        if key not in obsm or obsm[key].attrs.get("_scbert_new") is None:
            self._replace(obsm, key)
            ds = obsm.create_dataset(key, shape=(self.n_obs, values.shape[1]), dtype=values.dtype)
            ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0", "_scbert_new": 1})
        obsm[key][start:start + len(values)] = values

    def finish(self, obs: dict[str, Any], uns: dict[str, Any]) -> None:
        """Add the ``obs`` columns (one value per cell) and the ``uns`` entries, and close the file."""
        for key in self.file.get("obsm", {}):
            self.file["obsm"][key].attrs.pop("_scbert_new", None)
        group = self.file["obs"]
        order = [str(c) for c in group.attrs.get("column-order", [])]
        for key, values in obs.items():
            self._replace(group, key)
            write_elem(group, key, values)
            order = [c for c in order if c != key] + [key]
        group.attrs["column-order"] = np.array(order, dtype=h5py.string_dtype())
        group_uns = self._group("uns")
        for key, value in uns.items():
            self._replace(group_uns, key)
            write_elem(group_uns, key, value)
        self.file.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()
