"""Reading and writing single-cell matrices, with errors a biologist can act on."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import anndata as ad
import numpy as np
from scipy import sparse

READABLE = ".h5ad, 10x .h5, a 10x matrix folder (matrix.mtx[.gz] + genes/features + barcodes), .mtx, .csv/.tsv[.gz]"


class InputError(ValueError):
    """Bad user input; the message says what was wrong and what to do."""


def _scanpy() -> Any:
    """scanpy, imported on first use: it takes seconds, and ``.h5ad`` input needs only anndata."""
    import scanpy

    return scanpy


def read_cells(path: str | Path, transpose: bool = False) -> ad.AnnData:
    """Read cells x genes from any supported format into memory as CSR float32.

    ``transpose`` is for text/mtx files stored genes x cells.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    name = path.name.lower()
    try:
        if path.is_dir():
            if not any((path / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
                raise InputError(f"{path} is a folder but holds no matrix.mtx[.gz]: give a 10x matrix folder or a file ({READABLE})")
            adata = _scanpy().read_10x_mtx(path, var_names="gene_symbols", make_unique=False)
        elif path.stat().st_size == 0:
            raise InputError(f"{path} is empty (0 bytes): the file was not written completely; produce it again")
        elif name.endswith(".h5ad"):
            adata = ad.read_h5ad(path)
        elif name.endswith(".h5"):
            adata = _scanpy().read_10x_h5(path)
        elif name.endswith((".mtx", ".mtx.gz")):
            adata = _scanpy().read_mtx(path)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            delim = "," if ".csv" in name else "\t"
            adata = _scanpy().read_csv(path, delimiter=delim) if delim == "," else _scanpy().read_text(path, delimiter=delim)
        else:
            raise InputError(f"cannot tell the format of {path} from its name; supported: {READABLE}")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - readers raise many kinds; the user needs one message
        raise InputError(
            f"could not read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"Is it complete and in one of the supported formats ({READABLE})?"
        ) from None
    if transpose:
        adata = adata.T
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{path} holds {adata.n_obs} cells x {adata.n_vars} genes: nothing to work on")
    X = adata.X
    if X is None:
        raise InputError(f"{path} has no expression matrix in .X")
    if not sparse.issparse(X):
        X = sparse.csr_matrix(np.asarray(X, dtype=np.float32))
    adata.X = sparse.csr_matrix(X, dtype=np.float32)
    adata.var_names = adata.var_names.astype(str)
    adata.obs_names = adata.obs_names.astype(str)
    return adata


def read_var_names(path: str | Path) -> list[str]:
    """The gene names of an .h5ad without loading its matrix."""
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as e:  # noqa: BLE001 - h5py raises many kinds; the user needs one message
        raise InputError(f"could not read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                         f"Is it a complete .h5ad file?") from None
    try:
        return list(map(str, adata.var_names))
    finally:
        adata.file.close()


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse to clobber an existing output unless asked, and fail early if we cannot write there."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name (e.g. {path / 'annotated.h5ad'})")
    if path.exists() and not overwrite:
        raise InputError(f"output {path} already exists; pass --overwrite to replace it, or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {parent}: {e.strerror}; choose another output path") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}: choose an output folder you have write permission for")
    return path


def record_dir(out: str | Path) -> Path:
    """Where a stage that writes one file keeps its run record: next to it, ``<name>_run/``."""
    out = Path(out)
    return out.with_name(f"{out.name[:-5] if out.name.endswith('.h5ad') else out.name}_run")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; when the block ends without an error it
    replaces ``path`` (a crash or an error leaves no partial file, and the old file is kept)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", fsync: bool = False) -> Iterator[IO[Any]]:
    """An open file (text in UTF-8, or binary with ``mode="wb"``) whose content replaces ``path``
    atomically when the block ends without an error; see :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (values JSON does not know are written as text)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> None:
    """Write a gzip-compressed .h5ad atomically (a failure never leaves a half-written file)."""
    with atomic_path(path, suffix=".h5ad") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adata.write_h5ad(tmp, compression="gzip")
