"""This package's checkpoint format: self-describing, written atomically, read with
``torch.load(weights_only=True)`` (no code is ever run).

A checkpoint is a plain dict of tensors, strings and numbers::

    format          "scbert-pytorch"
    format_version  2 (older versions are upgraded on load: model/checkpoint/upgrade.py)
    config          the ScBERTConfig, as a dict (model size, head, number of classes)
    genes           the ordered vocabulary: one name per token position
    classes         class names in logit order (fine-tuned models), or None
    state_dict      the weights
    preprocessing   how inputs were normalised: target_sum, log_base, min_genes, library_size
                    ("all": over all input genes; "vocab": over the vocabulary genes, as published)
    training        the training settings (see below)
    metrics         what the run measured (validation accuracy, masked accuracy, ...)
    novelty         fine-tuned models: what the novelty scores need (class statistics of the head's
                    features and embeddings, the expression PCA, the query-density reference), the
                    thresholds calibrated on validation cells with their scores, and the measured
                    bf16 error (model.novelty.record.NoveltyRecord.to_dict); absent when the model
                    has none (pretrained and converted models)
    provenance      the package version and git commit that wrote the file

``training`` is a plain dict of what produced the weights: ``stage`` (``pretrain``, ``finetune`` or
``converted``) and, for our runs, ``data`` (the input files), ``optimisation`` (epochs, batch
size, gradient accumulation, learning rate and schedule, clipping, weight decay, patience,
selection, label smoothing, seed), ``execution`` (precision, gradient checkpointing, compile),
``gene2vec`` (how the gene embedding was made), and per stage ``pretraining`` (mask and replace
probabilities, held-out fraction) or ``finetuning`` (label column, pretrained checkpoint, folds,
validation fraction, head dropout, class weights, freezing policy, head start); converted published
checkpoints record ``source``, ``converted_from`` and ``published_epoch``.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import torch

from data.io import atomic_write
from data.preprocess import DEFAULT_PREPROCESSING, PrepReport, prepare
from model.checkpoint.upgrade import upgrade
from model.nn.config import ExecutionOptions, ScBERTConfig
from model.nn.network import ScBERT
from model.novelty.record import NoveltyRecord

FORMAT = "scbert-pytorch"
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A file that cannot be used as an scBERT checkpoint; the message says why and what to do."""


@dataclass
class Checkpoint:
    config: ScBERTConfig
    genes: list[str]
    state_dict: dict[str, torch.Tensor]
    classes: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    novelty: NoveltyRecord | None = None  # training statistics, calibrated thresholds, measured bf16 error
    provenance: dict[str, Any] = field(default_factory=dict)  # package version and git commit that wrote it

    @property
    def is_classifier(self) -> bool:
        """Whether the model names cell types (a fine-tuned classifier with class names)."""
        return self.config.head == "classifier" and bool(self.classes)

    def build_model(self, options: ExecutionOptions | None = None) -> ScBERT:
        """The network with these weights, in eval mode, computing as ``options`` say."""
        try:
            model = ScBERT(self.config, options=options)
            model.load_state_dict(self.state_dict)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{self.source or 'the checkpoint'} is damaged: its weights do not fit the model it describes "
                f"({' '.join(str(e).split())[:300] or type(e).__name__}). Use the model.pt of a finished run"
            ) from None
        return model.eval()

    def prepare(self, adata: ad.AnnData, what: str = "the cells", species: str = "auto") -> tuple[ad.AnnData, PrepReport]:
        """``adata`` (raw counts or log-normalised; every cell kept, in order) preprocessed as this
        model's inputs were and aligned to its genes (genes it lacks count as not expressed)."""
        return prepare(adata, genes=self.genes, min_genes=None, target_sum=self.preprocessing["target_sum"], what=what, species=species,
                       library_size=self.preprocessing["library_size"])


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


def provenance() -> dict[str, Any]:
    """What wrote a checkpoint: this package's version and git commit (None when unknown)."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("scbert-pytorch")
    except PackageNotFoundError:
        pkg = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": "scbert-pytorch", "version": pkg, "git_commit": commit}


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, synced, then renamed: a crash leaves no partial file."""
    with atomic_write(path, "wb", fsync=True) as f:
        torch.save(obj, f)


def save_checkpoint(
    path: str | Path,
    model: ScBERT,
    genes: list[str],
    classes: list[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    novelty: NoveltyRecord | None = None,
) -> None:
    """Save ``model`` with everything needed to use it later; ``training``: the settings that
    produced it (see the module docstring)."""
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
        "training": _plain(training or {}),
        "metrics": _plain(metrics or {}),
    }
    if novelty is not None:
        payload["novelty"] = novelty.to_dict()
    payload["provenance"] = provenance()
    atomic_torch_save(payload, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return line if isinstance(e, (RuntimeError, OSError, pickle.UnpicklingError)) and line else f"{type(e).__name__}: {line}".rstrip(": ")


def read_file(path: Path) -> Any:
    """What ``path`` holds, read with ``weights_only`` (tensors, numbers, text only), or a
    CheckpointError saying why the file cannot be used."""
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


def is_ours(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def from_payload(obj: Any, path: Path) -> Checkpoint:
    """The :class:`Checkpoint` of a dict read from one of our files, checked for consistency."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not an scBERT checkpoint (it holds a {type(obj).__name__}, not a dict)")
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an scBERT checkpoint (keys: {sorted(map(str, obj))[:8]})")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this package (format {obj['format_version']}); upgrade")
    try:
        obj = upgrade(obj, FORMAT_VERSION)
        config = ScBERTConfig.from_dict(obj["config"])
        ckpt = Checkpoint(
            config=config,
            genes=list(obj["genes"]),
            state_dict=obj["state_dict"],
            classes=obj.get("classes"),
            preprocessing=dict(obj["preprocessing"]),
            training=obj["training"],
            metrics=obj.get("metrics") or {},
            source=str(path),
            novelty=NoveltyRecord.from_dict(obj["novelty"]) if obj.get("novelty") else None,
            provenance=obj.get("provenance") or {},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is a damaged scBERT checkpoint: {e}") from None
    if len(ckpt.genes) != config.n_genes:
        raise CheckpointError(f"{path} is damaged: {len(ckpt.genes)} gene names for a {config.n_genes}-gene model")
    if len(set(ckpt.genes)) != len(ckpt.genes):
        raise CheckpointError(f"{path} is damaged: its gene vocabulary has duplicated names")
    return ckpt
