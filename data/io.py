"""Reading and writing single-cell matrices, with errors a biologist can act on."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anndata as ad
import numpy as np
from scipy import sparse

from data.errors import InputError

log = logging.getLogger("scbert")

READABLE = ".h5ad, .zarr, .loom, 10x .h5, a 10x matrix folder (matrix.mtx[.gz] + genes/features + barcodes), .mtx, .csv/.tsv[.gz]"


def _scanpy() -> Any:
    """scanpy, imported on first use: it takes seconds, and ``.h5ad`` input needs only anndata."""
    import scanpy

    return scanpy


@dataclass(frozen=True)
class CellSource:
    """Where an AnnData holds the cells' expression and their gene names: ``X`` (default), a
    layer (``layers[layer]``, e.g. ``"counts"``) or ``.raw`` (``use_raw``); gene names from
    ``var_names`` or from the ``var`` column ``gene_symbols`` (scanpy's ``gene_symbols=``: symbols
    when ``var_names`` are Ensembl ids, or Ensembl ids when the symbols are outdated)."""

    layer: str | None = None
    use_raw: bool = False
    gene_symbols: str | None = None
    log_base: float | None = None  # the base of log-normalised values, when the file does not record it (uns['log1p'])

    def __post_init__(self) -> None:
        if self.layer is not None and self.use_raw:
            raise InputError("give either a layer (--layer) or .raw (--use-raw), not both")
        if self.log_base is not None and not self.log_base > 1:
            raise InputError(f"a log base must be above 1, got {self.log_base}")

    @property
    def is_default(self) -> bool:
        return self.layer is None and not self.use_raw and self.gene_symbols is None

    def uns(self, uns: Any) -> Any:
        """``uns`` of the cells read, with the log base given here recorded as scanpy records its
        own (``uns['log1p']['base']``), where :func:`data.preprocess.prepare` reads it."""
        if self.log_base is None:
            return uns
        return {**dict(uns), "log1p": {"base": float(self.log_base)}}

    def describe(self) -> str:
        where = f"layers[{self.layer!r}]" if self.layer is not None else ".raw" if self.use_raw else "X"
        return where + (f", genes from var[{self.gene_symbols!r}]" if self.gene_symbols else "")


DEFAULT_SOURCE = CellSource()


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and (path.suffix.lower() == ".zarr" or any((path / f).exists() for f in (".zattrs", ".zgroup", "zarr.json")))


def read_anndata(path: str | Path, transpose: bool = False) -> ad.AnnData:
    """Read a file of cells x genes as stored (X, layers and .raw untouched): .h5ad, .zarr,
    .loom, 10x .h5, a 10x folder, .mtx or text. ``transpose`` is for text/mtx files stored genes x cells."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    name = path.name.lower()
    try:
        if _is_zarr(path):
            adata = ad.read_zarr(path)
        elif path.is_dir():
            if not any((path / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
                raise InputError(f"{path} is a folder but holds no matrix.mtx[.gz] and is not a .zarr store: give a 10x matrix folder, "
                                 f"an AnnData .zarr or a file ({READABLE})")
            adata = _scanpy().read_10x_mtx(path, var_names="gene_symbols", make_unique=False)
        elif path.stat().st_size == 0:
            raise InputError(f"{path} is empty (0 bytes): the file was not written completely; produce it again")
        elif name.endswith(".h5ad"):
            adata = ad.read_h5ad(path)
        elif name.endswith(".loom"):
            adata = _read_loom(path)
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
    adata.var_names = adata.var_names.astype(str)
    adata.obs_names = adata.obs_names.astype(str)
    return adata


def _read_loom(path: Path) -> ad.AnnData:
    """A .loom file (loompy's layout: genes x cells; gene names in the row attribute ``Gene`` or
    ``var_names`` or ``index`` (as anndata writes them), cell names in ``CellID``, ``obs_names`` or ``index``; other layers
    become ``layers``)."""
    try:
        import loompy  # noqa: F401 - anndata reads .loom through it
    except ImportError:
        raise InputError("reading .loom files needs the loompy package: pip install loompy") from None
    import h5py

    with h5py.File(path, "r") as f:
        rows, cols = set(f.get("row_attrs", {})), set(f.get("col_attrs", {}))
    genes = next((k for k in ("Gene", "var_names", "index", "gene_symbols", "Symbol", "Accession") if k in rows), None)
    cells = next((k for k in ("CellID", "obs_names", "index", "CellId", "cell_names") if k in cols), None)
    if genes is None:
        raise InputError(f"{path} names no genes: its row attributes {sorted(rows)} hold none of Gene, var_names, index, gene_symbols, Symbol, "
                         f"Accession")
    read_loom = getattr(getattr(ad, "io", ad), "read_loom", None) or ad.read_loom
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about non-unique names, which prepare() reports itself
        return read_loom(path, sparse=True, var_names=genes, obs_names=cells or "CellID")


def _problem(M: Any) -> str | None:
    """Why a matrix cannot be scBERT input (None: it can): missing, non-finite or negative values."""
    if M is None:
        return "is missing"
    data = M.data if sparse.issparse(M) else np.asarray(M)
    if data.size == 0:
        return None
    if not np.issubdtype(data.dtype, np.number):
        return f"holds {data.dtype} values, not numbers"
    if not np.all(np.isfinite(data)):
        return "holds NaN or infinite values"
    low = float(data.min())
    return f"holds negative values (min {low:.3g}: scaled or batch-corrected)" if low < 0 else None


def _sources(adata: ad.AnnData) -> dict[str, CellSource]:
    """Every matrix of ``adata`` besides X, by the flag that selects it."""
    out = {f"--layer {name}": CellSource(layer=name) for name in adata.layers.keys()}
    if adata.raw is not None:
        out["--use-raw"] = CellSource(use_raw=True)
    return out


def _matrix(adata: ad.AnnData, source: CellSource, what: str) -> tuple[Any, Any]:
    """The matrix ``source`` names and the ``var`` table of its genes."""
    if source.use_raw:
        if adata.raw is None:
            raise InputError(f"{what} has no .raw; drop --use-raw" + _available(adata))
        return adata.raw.X, adata.raw.var
    if source.layer is not None:
        if source.layer not in adata.layers:
            raise InputError(f"{what} has no layer {source.layer!r}" + _available(adata))
        return adata.layers[source.layer], adata.var
    return adata.X, adata.var


def _available(adata: ad.AnnData) -> str:
    held = ["X", *(f"layers[{name!r}]" for name in adata.layers.keys()), *([".raw"] if adata.raw is not None else [])]
    return f"; it holds {', '.join(held)}" if len(held) > 1 else "; it holds X only (no layers, no .raw)"


def gene_names(var: Any, column: str | None, what: str) -> list[str]:
    """The gene names of ``var``: its index, or its column ``column`` (empty entries keep the index's name)."""
    names = [str(g) for g in var.index]
    if column is None:
        return names
    if column not in var.columns:
        raise InputError(f"--gene-symbols {column!r} is not a column of the genes (var) of {what}; its columns: {list(var.columns)}")
    values = var[column]
    missing = values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy()
    if missing.all():
        raise InputError(f"var[{column!r}] of {what} is empty for every gene: choose another --gene-symbols column ({list(var.columns)})")
    if missing.any():
        log.warning("var[%r] of %s is empty for %d of %d genes: those keep their var_names", column, what, int(missing.sum()), len(names))
    return [names[j] if missing[j] else str(v).strip() for j, v in enumerate(values.to_numpy())]


def resolve_source(adata: ad.AnnData, source: CellSource = DEFAULT_SOURCE, what: str = "the input") -> CellSource:
    """The matrix to read: ``source``; with the default source and an ``X`` that cannot be input
    (negative or non-finite values, or none) while exactly one layer or ``.raw`` can, that one,
    with a message. Refuses (saying why and what the input holds) a matrix that does not exist or
    cannot be input, and several usable alternatives to a bad ``X`` (naming their flags)."""
    if source.layer is None and not source.use_raw and _problem(adata.X) is not None:
        usable = {flag: s for flag, s in _sources(adata).items() if _problem(_matrix(adata, s, what)[0]) is None}
        if len(usable) == 1:
            flag, found = next(iter(usable.items()))
            log.warning("X of %s %s; using %s instead (the one usable matrix; give %s to say so)", what, _problem(adata.X),
                        found.describe(), flag)
            return CellSource(layer=found.layer, use_raw=found.use_raw, gene_symbols=source.gene_symbols, log_base=source.log_base)
        if usable:
            raise InputError(f"X of {what} {_problem(adata.X)}, and several other matrices could be used: choose one with "
                             f"{' or '.join(usable)}")
    problem = _problem(_matrix(adata, source, what)[0])
    if problem is not None:
        where = source.describe().split(",")[0]
        hint = "" if source.is_default and not _sources(adata) else "; choose the matrix with --layer NAME or --use-raw"
        raise InputError(f"{where} of {what} {problem}: scBERT needs raw counts or log-normalised values{_available(adata)}{hint}")
    return source


def select_cells(adata: ad.AnnData, source: CellSource = DEFAULT_SOURCE, what: str = "the input") -> ad.AnnData:
    """An AnnData of the same cells (``obs`` and ``uns`` shared) whose ``X`` is the expression
    ``source`` names (see :func:`resolve_source`), as CSR float32, with the gene names it names."""
    source = resolve_source(adata, source, what)
    M, var = _matrix(adata, source, what)
    if not sparse.issparse(M):
        M = sparse.csr_matrix(np.asarray(M, dtype=np.float32))
    out = ad.AnnData(X=sparse.csr_matrix(M, dtype=np.float32), obs=adata.obs, uns=source.uns(adata.uns))
    out.var_names = gene_names(var, source.gene_symbols, what)
    return out


def read_cells(path: str | Path, transpose: bool = False, source: CellSource = DEFAULT_SOURCE) -> ad.AnnData:
    """Read cells x genes from any supported format into memory: ``X`` the expression ``source``
    names (see :func:`select_cells`), as CSR float32. ``transpose`` is for text/mtx files stored genes x cells."""
    return select_cells(read_anndata(path, transpose), source, str(path))


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
