"""Running a network on cells: the one batched inference loop (:func:`run_batches`) and what it
gives: class probabilities and the classifier's features (:func:`predict_outputs`, :func:`predict`,
:func:`predict_distributed`) and cell embeddings (:func:`embed_cells`). How cells become labels is
:mod:`model.annotation`; the float32 re-check after a bf16 pass is :mod:`model.recheck`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from data.dataset import CellDataset
from data.io import InputError
from model import distributed
from model.nn.config import ExecutionOptions
from model.nn.network import POOLINGS, ScBERT, pool_encodings


@dataclass(frozen=True)
class InferenceOptions:
    """How a network is run on cells: ``batch_size`` cells per forward pass on ``device`` with
    ``num_workers`` loader processes and a progress bar or not; for a model built from a checkpoint,
    its ``execution`` options (precision, speed switches); after a bf16/fp16 pass, the float32
    re-check margin of cells near a decision (``fp32_recheck``: a number, None or 0 for none,
    ``"auto"``: see :func:`model.recheck.resolve_recheck_margin`)."""

    batch_size: int = 16
    device: str | torch.device = "cpu"
    num_workers: int = 0
    progress: bool = True
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    fp32_recheck: float | str | None = "auto"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def replace(self, **changes: Any) -> InferenceOptions:
        return replace(self, **changes)


DEFAULT_INFERENCE = InferenceOptions()

BatchFn = Callable[[ScBERT, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@torch.inference_mode()
def run_batches(model: ScBERT, ds: CellDataset, fn: BatchFn, options: InferenceOptions, rows: np.ndarray | None = None,
                desc: str = "predict") -> Iterable[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """``fn(model, batch)`` on each batch of the cells of ``ds`` (all, or ``rows`` in that order;
    ``batch['tokens']`` on the device, ``batch['index']`` the cells' indices in ``ds``), in eval mode
    under the model's precision: yields (cell indices, ``fn``'s outputs on the CPU). The one
    inference loop of the package (annotation, embeddings, validation, attention scores)."""
    device = options.torch_device
    model.eval().to(device)
    n = len(ds) if rows is None else len(rows)
    bar = tqdm(total=n, desc=desc, unit="cell", disable=not options.progress, leave=False)
    try:
        for batch in ds.loader(options.batch_size, rows, options.num_workers):
            batch["tokens"] = batch["tokens"].to(device)
            with model.autocast():
                out = fn(model, batch)
            yield batch["index"].numpy(), {k: v.cpu() for k, v in out.items()}
            bar.update(len(batch["index"]))
    finally:
        bar.close()


def _probabilities(embed: bool, pooling: str, features: bool = False) -> BatchFn:
    def fn(model: ScBERT, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        h = model.encode(tokens)
        # the classifier's penultimate activations (float32) and class logits; with an ensemble of heads the
        # logits are their mean, and the features and head_logits those of the first head, which the novelty scores read
        feats, logits, own = model.to_out.outputs(h)
        out = {"probs": torch.softmax(logits, dim=-1), "logits": logits}
        if own is not logits:
            out.update(head_probs=torch.softmax(own, dim=-1), head_logits=own)
        if features:
            out["features"] = feats.float()
        if embed:
            out["embedding"] = pool_encodings(h, tokens, pooling)
        return out
    return fn


def predict_outputs(model: ScBERT, ds: CellDataset, options: InferenceOptions, embed: bool = False, features: bool = False,
                    pooling: str = "mean") -> dict[str, np.ndarray]:
    """Per cell, in dataset order, from one encoder pass per batch: ``probs`` and ``logits``
    (cells x classes), with ``features`` the classifier's penultimate activations (cells x hidden),
    with ``embed`` the cell embeddings (cells x dim)."""
    parts = [out for _, out in run_batches(model, ds, _probabilities(embed, pooling, features), options)]
    return {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]} if parts else {}


def predict(model: ScBERT, ds: CellDataset, options: InferenceOptions, embed: bool = False,
            pooling: str = "mean") -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (cells x classes) and, with ``embed``, cell embeddings (cells x dim),
    in dataset order, from one encoder pass per batch."""
    out = predict_outputs(model, ds, options, embed, pooling=pooling)
    return out["probs"], out.get("embedding")


def predict_distributed(model: ScBERT, ds: CellDataset, options: InferenceOptions, desc: str = "validation") -> np.ndarray:
    """:func:`predict`'s probabilities with the cells shared among the processes of a torchrun job
    (each scores a contiguous block; every rank gets all probabilities, in dataset order, each cell
    once). The progress bar (``desc``) shows on the main process only."""
    info = distributed.current()
    rows = distributed.shard(len(ds)) if info.enabled else None
    options = options.replace(progress=options.progress and info.is_main)
    parts = [out["probs"] for _, out in run_batches(model, ds, _probabilities(False, "mean"), options, rows=rows, desc=desc)]
    mine = torch.cat(parts).numpy() if parts else np.zeros((0, model.config.n_classes), dtype=np.float32)
    return np.concatenate(distributed.all_gather_objects(mine)) if info.enabled else mine


def embed_cells(model: ScBERT, ds: CellDataset, options: InferenceOptions, pooling: str = "mean") -> np.ndarray:
    """Cell embeddings (cells x dim, float32, in order) from the final encodings of any model,
    pretrained or fine-tuned: see :func:`model.nn.network.pool_encodings`."""
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")

    def fn(m: ScBERT, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"embedding": pool_encodings(m.encode(batch["tokens"]), batch["tokens"], pooling)}

    parts = [out["embedding"] for _, out in run_batches(model, ds, fn, options, desc="embed")]
    return torch.cat(parts).numpy()
