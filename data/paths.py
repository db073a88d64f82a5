"""The paths a user gives, checked before anything heavy is imported: a stage script reports a typo
in a path or a label column in a second, not after the model stack has loaded. Only the standard
library here (and h5py, on use, to list the columns of an ``.h5ad``)."""

from __future__ import annotations

from pathlib import Path

from data.errors import InputError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MODEL_FILE = "model.pt"


def is_hdf5(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file (``.h5ad``, 10x ``.h5``): its first bytes say so."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def model_file(path: str | Path) -> Path:
    """The checkpoint a user means by ``path``: the file, or ``model.pt`` of a run folder. A missing
    path, a folder without a model, or a file of cells (``.h5ad``) is refused with what to give instead."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        held = sorted(p.name for p in path.iterdir())[:6]
        hint = " (its training states are in checkpoints/: the run has not finished)" if (path / "checkpoints").is_dir() else ""
        raise InputError(f"{path} is a folder without a {MODEL_FILE}{hint}; it holds {held}: give a run folder of finetune.py or "
                         f"pretrain.py, or the model file itself")
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist: give the {MODEL_FILE} of a run (or the run folder)")
    if is_hdf5(path):
        raise InputError(f"{path} is a file of cells (HDF5, such as .h5ad), not a model: give the {MODEL_FILE} of a finetune.py "
                         f"run (or its run folder)")
    return path


def check_input(path: str | Path, flag: str = "--data") -> None:
    """An input path that must exist (a file, or a folder such as a 10x matrix or .zarr store)."""
    if not Path(path).exists():
        raise InputError(f"{flag} {path} does not exist; check the path (relative paths start from the folder you run in)")


def obs_columns(path: str | Path) -> list[str] | None:
    """The ``obs`` columns of an ``.h5ad`` file, read without loading it; None for other formats or
    a file h5py cannot read (the reader reports those)."""
    if not str(path).lower().endswith(".h5ad") or not is_hdf5(path):
        return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            obs = f["obs"]
            order = [str(c) for c in obs.attrs.get("column-order", [])]
            return order or [k for k in obs.keys() if k != obs.attrs.get("_index", "_index")]
    except (OSError, KeyError):
        return None


def check_label_key(path: str | Path, key: str) -> None:
    """``key`` is a column of ``obs`` in the ``.h5ad`` at ``path`` (other formats are checked once read)."""
    columns = obs_columns(path)
    if columns is not None and key not in columns:
        raise InputError(f"--label-key {key!r} is not a column of {path}; available columns: {columns}")
