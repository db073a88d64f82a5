"""Self-describing checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, strings and numbers::

    format, format_version, config (ScBERTConfig as dict), genes (ordered vocabulary),
    classes (class names in logit order, or None), state_dict, preprocessing (how inputs were
    normalised and binned), train_args, metrics
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.config import ScBERTConfig
from model.scbert import ScBERT

FORMAT = "scbert-pytorch"
FORMAT_VERSION = 1

DEFAULT_PREPROCESSING = {"target_sum": 1e4, "log_base": 2.0, "min_genes": 200}


class CheckpointError(ValueError):
    """A file that cannot be used as an scBERT checkpoint; the message says why and what to do."""


@dataclass
class Checkpoint:
    config: ScBERTConfig
    genes: list[str]
    state_dict: dict[str, torch.Tensor]
    classes: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))
    train_args: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def build_model(self) -> ScBERT:
        """The network with these weights, in eval mode."""
        try:
            model = ScBERT(self.config)
            model.load_state_dict(self.state_dict)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{self.source or 'the checkpoint'} is damaged: its weights do not fit the model it describes "
                f"({' '.join(str(e).split())[:300] or type(e).__name__}). Use the model.pt of a finished run"
            ) from None
        return model.eval()


def _plain(obj: Any) -> Any:
    """Reduce to what ``weights_only`` loading accepts: dicts, lists, str, numbers, bool, None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return _plain(obj.item())
    return str(obj)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path,
    model: ScBERT,
    genes: list[str],
    classes: list[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
    train_args: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Save ``model`` with everything needed to use it later."""
    if len(genes) != model.config.n_genes:
        raise ValueError(f"{len(genes)} gene names for a {model.config.n_genes}-gene model")
    if model.config.head == "classifier" and (classes is None or len(classes) != model.config.n_classes):
        raise ValueError("a classifier checkpoint needs one class name per output")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "genes": list(map(str, genes)),
        "classes": None if classes is None else list(map(str, classes)),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "preprocessing": _plain(preprocessing or DEFAULT_PREPROCESSING),
        "train_args": _plain(train_args or {}),
        "metrics": _plain(metrics or {}),
    }
    atomic_torch_save(payload, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return line if isinstance(e, (RuntimeError, OSError, pickle.UnpicklingError)) and line else f"{type(e).__name__}: {line}".rstrip(": ")


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} contains Python objects that are not allowed to be loaded (only tensors, numbers and "
            f"text are). It is not an scBERT checkpoint, or it was saved with arbitrary objects inside: "
            f"refusing to execute it. ({_first_line(e)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError, IndexError, TypeError) as e:
        # torch's reader fails in many ways on files that are not (whole) checkpoints, e.g. KeyError on text.
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint: it may be truncated (an interrupted copy "
            f"or download) or not a checkpoint at all. Copy it again. ({_first_line(e)})"
        ) from None


def load_checkpoint(path: str | Path, genes: list[str] | None = None, classes: list[str] | None = None) -> Checkpoint:
    """Load one of our checkpoints, or one saved by the published scBERT code (which carries no
    gene or class names: pass ``genes``, and ``classes`` for a fine-tuned one). Refuses anything
    else, with a reason."""
    from model import published

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is a folder): give the path to a model.pt file")
    try:
        obj = _torch_load(path)
    except CheckpointError as refusal:
        # A published file may hold numpy scalars that weights_only refuses; its safe reader
        # rebuilds only those and never runs code. Anything else keeps the original refusal.
        try:
            obj = published.read_published(path)
        except CheckpointError:
            raise refusal from None
        if not published.is_published_checkpoint(obj):
            raise refusal from None
    if published.is_published_checkpoint(obj):
        if genes is None:
            raise CheckpointError(
                f"{path} is a checkpoint of the published scBERT code, which stores no gene names. Give the ordered "
                f"gene list it was trained on (the var_names of the published panglao_10000.h5ad) with --genes GENES.txt, "
                f"or convert it once: python -m model.convert {path} --genes GENES.txt [--classes CLASSES.txt] --out model.pt"
            )
        return published.published_to_checkpoint(obj, genes, classes, source=str(path))
    if genes is not None or classes is not None:
        raise CheckpointError(f"{path} is already self-describing (it carries its genes and classes): drop --genes/--classes")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not an scBERT checkpoint (it holds a {type(obj).__name__}, not a dict)")
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an scBERT checkpoint (keys: {sorted(map(str, obj))[:8]})")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this package (format {obj['format_version']}); upgrade")
    try:
        config = ScBERTConfig.from_dict(obj["config"])
        ckpt = Checkpoint(
            config=config,
            genes=list(obj["genes"]),
            state_dict=obj["state_dict"],
            classes=obj.get("classes"),
            preprocessing={**DEFAULT_PREPROCESSING, **(obj.get("preprocessing") or {})},
            train_args=obj.get("train_args") or {},
            metrics=obj.get("metrics") or {},
            source=str(path),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is a damaged scBERT checkpoint: {e}") from None
    if len(ckpt.genes) != config.n_genes:
        raise CheckpointError(f"{path} is damaged: {len(ckpt.genes)} gene names for a {config.n_genes}-gene model")
    if len(set(ckpt.genes)) != len(ckpt.genes):
        raise CheckpointError(f"{path} is damaged: its gene vocabulary has duplicated names")
    return ckpt
