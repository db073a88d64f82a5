"""Reading checkpoints written by the published scBERT code (Yang et al. 2022).

The published training scripts save ``{"epoch", "model_state_dict", "optimizer_state_dict",
"scheduler_state_dict", "losses"}``. The state dict matches :class:`model.nn.network.ScBERT` except
for one buffer name (``performer.calls_since_last_redraw``) and the gene embedding table, which
is stored as float64. Such files carry no hyperparameters, gene names or class names: the
hyperparameters are inferred from tensor shapes here, and the gene and class lists must be given.
"""

from __future__ import annotations

import importlib
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data.preprocess import PUBLISHED_PREPROCESSING
from model.checkpoint.format import Checkpoint, CheckpointError
from model.nn.config import ScBERTConfig
from model.nn.network import ScBERT

log = logging.getLogger("scbert")

_CALLS_PUBLISHED = "performer.calls_since_last_redraw"
_CALLS_OURS = "performer.proj_updater.calls_since_last_redraw"
_LAYER_RE = re.compile(r"^performer\.net\.layers\.(\d+)\.")
_GENES_HELP = (
    "published scBERT checkpoints carry no gene names: give the ordered gene list the model was trained on "
    "(the var_names of the published panglao_10000.h5ad, one gene per line) with --genes"
)
_CLASSES_HELP = (
    "published fine-tuned checkpoints carry no class names: give them with --classes (one per line, in the "
    "published label_dict order, i.e. the sorted unique cell-type labels of the fine-tuning data)"
)


def _is_state_dict(obj: Any) -> bool:
    """A mapping of string keys to tensors that has the scBERT token embedding and Performer layers."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return False
    keys = {_strip_module(k) for k in obj}
    return "token_emb.weight" in keys and any(_LAYER_RE.match(k) for k in keys)


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def is_published_checkpoint(obj: Any) -> bool:
    """True for what the published code saves (a dict whose ``model_state_dict`` is an scBERT
    state dict of tensors) or for such a bare state dict."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        return _is_state_dict(obj["model_state_dict"])
    return _is_state_dict(obj)


def _normalise_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a DistributedDataParallel ``module.`` prefix and rename the redraw counter."""
    keys = list(state_dict)
    strip = bool(keys) and all(k.startswith("module.") for k in keys)
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        k = _strip_module(k) if strip else k
        if k == _CALLS_PUBLISHED:
            k = _CALLS_OURS
        if k in out:
            raise CheckpointError(
                f"the state dict holds {k!r} twice (under two spellings); it is not a published scBERT checkpoint"
            )
        out[k] = v
    return out


def _shape(sd: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"the state dict has no {key!r}: it is not a (complete) scBERT checkpoint")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{key} has shape {shape}; an scBERT checkpoint has a {ndim}-dimensional tensor there")
    return shape


def _n_genes_from_shapes(sd: Mapping[str, Tensor]) -> int | None:
    """The vocabulary size the tensor shapes imply, or None when nothing records it."""
    if "pos_emb.emb.weight" in sd:
        return _shape(sd, "pos_emb.emb.weight", 2)[0] - 1
    if "to_out.fc1.weight" in sd:
        return _shape(sd, "to_out.fc1.weight", 2)[1] - 1
    return None


def infer_config(state_dict: Mapping[str, Tensor], n_genes: int | None = None) -> ScBERTConfig:
    """Hyperparameters of a published (or our) scBERT state dict, from its tensor shapes.

    ``n_genes`` is needed only for an MLM checkpoint without a gene embedding (nothing in it has
    one row per gene); when the shapes do record it, a different ``n_genes`` is an error.
    """
    sd = _normalise_keys(state_dict)
    n_tokens, dim = _shape(sd, "token_emb.weight", 2)
    if n_tokens < 3:
        raise CheckpointError(f"token_emb.weight has {n_tokens} rows; scBERT needs bin_num + 2 >= 3 tokens")
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))})
    if not layers:
        raise CheckpointError("the state dict has no performer.net.layers.*: it is not an scBERT checkpoint")
    if layers != list(range(len(layers))):
        raise CheckpointError(
            f"Performer layers are not numbered 0..{len(layers) - 1} (found {layers}); the checkpoint is damaged"
        )
    depth = len(layers)
    prefix = "performer.net.layers.0.0.fn."
    inner, q_dim = _shape(sd, prefix + "to_q.weight", 2)
    nb_features, dim_head = _shape(sd, prefix + "fast_attention.projection_matrix", 2)
    if q_dim != dim:
        raise CheckpointError(f"to_q.weight reads {q_dim} features but token_emb.weight has {dim}: inconsistent shapes")
    if dim_head < 1 or inner % dim_head:
        raise CheckpointError(
            f"to_q.weight has {inner} rows, not a multiple of the head size {dim_head} given by the projection matrix"
        )
    heads = inner // dim_head

    shape_genes = _n_genes_from_shapes(sd)
    if shape_genes is not None and n_genes is not None and shape_genes != n_genes:
        raise CheckpointError(f"the checkpoint is for {shape_genes} genes but {n_genes} were given")
    genes = shape_genes if shape_genes is not None else n_genes
    if genes is None:
        raise CheckpointError(
            "this checkpoint has neither a gene embedding (pos_emb) nor a classifier head, so its number of "
            "genes cannot be read from it; give the gene list it was trained on"
        )
    if genes < 1:
        raise CheckpointError(f"the tensor shapes imply {genes} genes; the checkpoint is damaged")

    kwargs: dict[str, Any] = {
        "n_genes": genes,
        "bin_num": n_tokens - 2,
        "dim": dim,
        "depth": depth,
        "heads": heads,
        "dim_head": dim_head,
        "nb_features": nb_features,
        "gene_embedding": "gene2vec" if "pos_emb.emb.weight" in sd else "none",
    }
    if "to_out.fc1.weight" in sd:
        hidden = _shape(sd, "to_out.fc2.weight", 2)[0]
        n_classes = _shape(sd, "to_out.fc3.weight", 2)[0]
        kwargs.update(head="classifier", n_classes=n_classes, classifier_hidden=hidden)
    elif "to_out.weight" in sd:
        kwargs["head"] = "mlm"
    else:
        raise CheckpointError("the state dict has no output head (to_out.*): it is not a complete scBERT checkpoint")
    try:
        return ScBERTConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"the tensor shapes give an impossible configuration: {e}") from None


def _number(name: str) -> float | None:
    try:
        value = float(name)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_label_dict_order(classes: Sequence[str]) -> None:
    """The published code numbers classes by ``np.unique(labels)``: sorted, and for numeric labels
    sorted as numbers (1, 2, 10). Class lists of numbers in another order (e.g. sorted as text: 1,
    10, 2) would mis-map every output: refused. Names in an order that is not sorted as text are
    allowed (they may name numeric labels), with a warning."""
    numbers = [_number(c) for c in classes]
    if all(v is not None for v in numbers):
        if numbers != sorted(numbers):
            expected = [c for _, c in sorted(zip(numbers, classes))]
            raise CheckpointError(
                f"the class names are numbers in the order {list(classes)}, but the published code numbers its classes by "
                f"np.unique of the labels, which sorts numbers numerically: give them in the order {expected}"
            )
        return
    if list(classes) != sorted(classes):
        log.warning("WARNING: the class names are not in sorted order; the published label_dict is np.unique of the training labels "
                    "(sorted). That is right only if these names stand, in order, for sorted labels (e.g. readable names of numeric labels)")


def _listing(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def convert_state_dict(
    state_dict: Mapping[str, Tensor], n_genes: int | None = None
) -> tuple[ScBERTConfig, dict[str, Tensor]]:
    """A published state dict as (config, our state dict): our key names, float32 weights.

    Verified by loading it strictly into ``ScBERT(config)``; any unknown or missing key or
    mismatched shape raises :class:`CheckpointError`. ``n_genes`` as in :func:`infer_config`.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"expected a state dict (a dict of tensors), got a {type(state_dict).__name__}")
    bad = [str(k) for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"the state dict holds entries that are not tensors: {_listing(bad)}")
    sd = _normalise_keys(state_dict)
    config = infer_config(sd, n_genes=n_genes)
    converted: dict[str, Tensor] = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(torch.float32)
        elif k == _CALLS_OURS:
            v = v.to(torch.int64)
        else:
            raise CheckpointError(f"{k} holds {v.dtype} values; every scBERT weight is a floating-point tensor")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{k} holds NaN or infinite values: the checkpoint is damaged or training diverged")
        converted[k] = v.contiguous()
    # The redraw counter is bookkeeping only (redraws happen in training mode); a state dict saved
    # without it is still complete.
    converted.setdefault(_CALLS_OURS, torch.tensor(0, dtype=torch.int64))

    model = ScBERT(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"unknown keys {_listing(unexpected)}")
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        raise CheckpointError(
            f"the state dict does not match an scBERT model with the inferred configuration "
            f"(dim {config.dim}, depth {config.depth}, heads {config.heads}, dim_head {config.dim_head}): "
            + "; ".join(parts)
        )
    wrong = [
        f"{k} {tuple(converted[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(converted[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"inconsistent tensor shapes in the checkpoint: {_listing(wrong, 3)}")
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the converted weights do not load into scBERT: {str(e).splitlines()[0]}") from None
    return config, converted


class _Opaque:
    """Stands in for any non-allowlisted object while reading a published checkpoint: it is
    created from, and ignores, whatever the file says, so no foreign code is ever run."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _numpy_global(name: str) -> Any:
    """The real numpy object for the few globals a numpy scalar needs (``scalar``, ``dtype``,
    ``dtypes.*DType``), which only rebuild a number from its bytes; None for anything else."""
    if name in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"):
        for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:
                return importlib.import_module(module).scalar
            except (ImportError, AttributeError):
                continue
        return None
    if name == "numpy.dtype":
        return np.dtype
    if name.startswith("numpy.dtypes.") and name.endswith("DType"):
        cls = getattr(getattr(np, "dtypes", None), name.rsplit(".", 1)[1], None)
        return cls if isinstance(cls, type) and issubclass(cls, np.dtype) else None
    return None


def _load_with_placeholders(path: Path) -> Any:
    """``weights_only`` loading that reads numpy scalars (e.g. in ``losses``) and replaces every
    other global the safe loader refuses (an optimizer's or scheduler's extra objects...) by an
    inert :class:`_Opaque`, so the weights can be read and nothing else is run.

    Globals from modules torch blocks outright (os, sys...) still make the load fail.
    """
    allowed: list[tuple[Any, str]] = []
    for i, name in enumerate(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))):
        real = _numpy_global(name)
        allowed.append((real if real is not None else type(f"_Opaque_{i}", (_Opaque,), {}), name))
        if name == "numpy.dtype":  # a dtype is rebuilt as an instance of its numpy.dtypes.*DType class
            dtypes = getattr(np, "dtypes", None)
            for attr in dir(dtypes) if dtypes is not None else []:
                cls = getattr(dtypes, attr)
                if isinstance(cls, type) and issubclass(cls, np.dtype) and cls is not np.dtype:
                    allowed.append((cls, f"numpy.dtypes.{attr}"))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _refused_global(e: BaseException) -> str:
    """The name of the global a weights-only load refused, from torch's (long) message."""
    found = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"got <class '([^']+)'>", str(e))
    return found.group(1) if found else "objects it cannot read safely"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_published(path: str | Path) -> Any:
    """The object stored in ``path``, read without executing anything it contains."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist (or is a folder): give the path to the published .pth file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint: it may be truncated (an interrupted copy or "
            f"download) or not a checkpoint at all. Copy it again. ({_first_line(e)})"
        ) from None
    try:
        return _load_with_placeholders(path)
    except Exception as e:  # any failure here means: refuse the file
        raise CheckpointError(
            f"{path} refers to Python code ({_refused_global(e)}) that a checkpoint must not contain; "
            f"refusing to load it (nothing in it was run). Only tensors, numbers and text are read."
        ) from None


def _loss_summary(losses: Any) -> float | None:
    """The last loss of a published ``losses`` entry (a number or a list of numbers)."""
    if isinstance(losses, Tensor) and losses.numel() >= 1:
        value = float(losses.reshape(-1)[-1])
    elif isinstance(losses, (list, tuple)) and losses:
        return _loss_summary(losses[-1])
    elif isinstance(losses, (int, float, np.integer, np.floating)) and not isinstance(losses, bool):
        value = float(losses)
    else:
        return None
    return value if math.isfinite(value) else None


def published_to_checkpoint(
    obj: Any,
    genes: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    source: str = "the checkpoint",
) -> Checkpoint:
    """A published checkpoint's content (read safely from ``source`` by :func:`read_published`) as
    our :class:`Checkpoint`. ``genes``: the ordered vocabulary the model was trained on (required:
    the file has no names). ``classes``: class names in logit order, required for a fine-tuned
    (classifier) checkpoint and refused for a pretrained one."""
    name = source
    if isinstance(obj, Mapping) and obj.get("format") == "scbert-pytorch":
        raise CheckpointError(f"{name} is already in this package's format: load it directly, no conversion needed")
    if not is_published_checkpoint(obj):
        if isinstance(obj, _Opaque):
            raise CheckpointError(
                f"{name} is not a published scBERT checkpoint: it holds a Python object of a kind that is not "
                f"allowed to be loaded (it was not run)"
            )
        if isinstance(obj, Mapping) and "model_state_dict" in obj:
            inner = obj["model_state_dict"]
            keys = [str(k) for k in list(inner)[:5]] if isinstance(inner, Mapping) else type(inner).__name__
            raise CheckpointError(
                f"{name} has a model_state_dict, but not of scBERT (no token_emb.weight and "
                f"performer.net.layers.* tensors; it holds {keys})"
            )
        if isinstance(obj, Mapping):
            keys = [str(k) for k in list(obj)[:8]]
            raise CheckpointError(
                f"{name} is not a published scBERT checkpoint: expected a dict with 'model_state_dict' holding "
                f"scBERT weights (token_emb, performer.net.layers...), found keys {keys}"
            )
        raise CheckpointError(
            f"{name} is not a published scBERT checkpoint (it holds a {type(obj).__name__}, not a dict)"
        )
    wrapped = "model_state_dict" in obj
    sd = _normalise_keys(obj["model_state_dict"] if wrapped else obj)

    shape_genes = _n_genes_from_shapes(sd)
    if genes is None:
        size = f"{shape_genes} genes" if shape_genes is not None else "its genes"
        raise CheckpointError(f"{name}: {_GENES_HELP} ({size}, in the order used for training)")
    genes = [str(g) for g in genes]
    if shape_genes is not None and len(genes) != shape_genes:
        raise CheckpointError(
            f"the gene list has {len(genes)} genes but {name} was trained on {shape_genes} "
            f"(its embedding has {shape_genes} + 1 rows): give the exact gene list used for training"
        )
    dup = len(genes) - len(set(genes))
    if dup:
        raise CheckpointError(f"the gene list has {dup} duplicated names; a vocabulary needs unique gene names")

    config, converted = convert_state_dict(sd, n_genes=len(genes))
    if config.head == "mlm":
        if classes is not None:
            raise CheckpointError(
                f"{name} is a pretrained (masked-expression) checkpoint without a classifier, so it takes no "
                f"classes: leave out --classes (fine-tune it to get a classifier)"
            )
        class_list = None
    else:
        if classes is None:
            raise CheckpointError(f"{name} is a fine-tuned classifier with {config.n_classes} classes: {_CLASSES_HELP}")
        class_list = [str(c) for c in classes]
        if len(class_list) != config.n_classes:
            raise CheckpointError(
                f"{len(class_list)} class names given but {name} has {config.n_classes} outputs: give exactly "
                f"{config.n_classes} names, in the published label_dict order"
            )
        if len(set(class_list)) != len(class_list):
            raise CheckpointError("the class list has duplicated names")
        check_label_dict_order(class_list)

    training: dict[str, Any] = {"stage": "converted", "source": "published scBERT code", "converted_from": source}
    metrics: dict[str, Any] = {}
    if wrapped:
        epoch = obj.get("epoch")
        if isinstance(epoch, (int, np.integer)) and not isinstance(epoch, bool):
            training["published_epoch"] = int(epoch)
        loss = _loss_summary(obj.get("losses"))
        if loss is not None:
            metrics["published_last_loss"] = loss
    return Checkpoint(
        config=config,
        genes=genes,
        state_dict=converted,
        classes=class_list,
        preprocessing=dict(PUBLISHED_PREPROCESSING),  # aligned first, then >= 200 genes, 1e4 over the vocabulary, log2(1 + x)
        training=training,
        metrics=metrics,
        source=source,
    )
