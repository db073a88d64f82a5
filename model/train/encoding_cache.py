"""Head-only fine-tuning on stored encodings: a frozen encoder (in eval mode, fixed random
features) gives every cell the same encodings in every epoch, so they are computed once and the
epochs train the classifier head alone on them (the encoder pass is nearly all of an epoch's time)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from data.dataset import CellDataset
from model import distributed
from model.inference import InferenceOptions, run_batches
from model.memory import available_memory, size_text
from model.nn.network import ScBERT

log = logging.getLogger("scbert")

MEMORY_SHARE = 0.3  # of the memory available when fine-tuning starts: above it, the encoder runs every epoch instead


class EncodedCells(Dataset):
    """Cells as their stored encodings (cells, seq_len, dim) and class ids: the batches of
    :func:`model.train.loop.fit` carry ``encodings`` in place of ``tokens``. With ``rows``, the cells
    are those rows of ``encodings`` (several heads share one store without copying it); ``labels``
    then follow ``rows``."""

    def __init__(self, encodings: torch.Tensor, labels: torch.Tensor | None, rows: np.ndarray | None = None) -> None:
        self.encodings = encodings
        self.labels = labels
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.encodings) if self.rows is None else len(self.rows)

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"index": idx, "encodings": self.encodings[idx if self.rows is None else self.rows[idx]]}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch


def encoding_bytes(model: ScBERT, n_cells: int) -> int:
    """Memory the encodings of ``n_cells`` cells take (float32: the final LayerNorm runs in float32
    under autocast too)."""
    return n_cells * model.config.seq_len * model.config.dim * 4


def can_store_encodings(model: ScBERT, n_cells: int) -> bool:
    """Whether head-only fine-tuning can train on stored encodings: a frozen encoder, one process
    (under torchrun the wrapped network must run every step), and the encodings within
    ``MEMORY_SHARE`` of the free memory. Says which way it goes, and why."""
    if not getattr(model, "frozen_encoder", False) or distributed.current().enabled:
        return False
    need, free = encoding_bytes(model, n_cells), available_memory(torch.device("cpu"))
    if free is None or need > MEMORY_SHARE * free:
        log.info("head-only fine-tuning: the encodings of %d cells need %s (%s free): the frozen encoder runs every epoch",
                 n_cells, size_text(need), "?" if free is None else size_text(free))
        return False
    log.info("head-only fine-tuning: the frozen encoder runs once, its encodings of %d cells (%s) are kept for every epoch",
             n_cells, size_text(need))
    return True


def encode_dataset(model: ScBERT, ds: CellDataset, options: InferenceOptions, desc: str = "encoding") -> EncodedCells:
    """The final encodings of every cell of ``ds`` (on the CPU, in order), with its labels. The loader
    has its own generator, so the global random state (dropout, shuffling) is left as it was; the
    model's train/eval mode is restored."""
    was_training = model.training
    parts = [out["h"] for _, out in run_batches(model, ds, lambda m, b: {"h": m.encode(b["tokens"])}, options,
                                                rows=np.arange(len(ds)), desc=desc)]
    model.train(was_training)
    c = model.config
    encodings = torch.cat(parts) if parts else torch.zeros((0, c.seq_len, c.dim))
    return EncodedCells(encodings, ds.labels)


@torch.inference_mode()
def head_probabilities(model: ScBERT, cells: EncodedCells, batch_size: int, device: torch.device) -> np.ndarray:
    """Class probabilities of stored encodings, in eval mode (as :func:`model.inference.predict`
    gives them for the same cells, leaving the global random state as it does); the model's mode is restored."""
    # the encoder pass this replaces draws one seed from the global generator (its DataLoader's base seed):
    # drawing it here keeps the random stream, so dropout masks and numbers are those of that pass
    torch.empty((), dtype=torch.int64).random_()
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(cells), batch_size):
        with model.autocast():
            enc = cells.collate(list(range(start, min(start + batch_size, len(cells)))))["encodings"]
            logits = model.to_out(enc.to(device))
        parts.append(torch.softmax(logits.float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.config.n_classes), dtype=np.float32)
