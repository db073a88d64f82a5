"""Checkpoints: our self-describing format (:mod:`.format`), the published scBERT code's files
(:mod:`.published`), and loading either (:mod:`.loading`)."""

from model.checkpoint.format import Checkpoint, CheckpointError, atomic_torch_save, save_checkpoint
from model.checkpoint.loading import choose_library_size, load_checkpoint, load_vocab

__all__ = ["Checkpoint", "CheckpointError", "atomic_torch_save", "choose_library_size", "load_checkpoint", "load_vocab", "save_checkpoint"]
