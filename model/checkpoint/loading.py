"""Loading any checkpoint a user may hold: ours, or one saved by the published scBERT code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from data.io import InputError
from data.paths import MODEL_FILE, model_file
from data.preprocess import LIBRARY_SIZES, PUBLISHED_VOCAB_SIZE, recorded_library_size
from data.vocab import read_vocab_file
from model.checkpoint import published
from model.checkpoint.format import Checkpoint, CheckpointError, from_payload, read_file

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def load_checkpoint(path: str | Path, genes: list[str] | None = None, classes: list[str] | None = None) -> Checkpoint:
    """Load one of our checkpoints, or one saved by the published scBERT code (which carries no
    gene or class names: pass ``genes``, and ``classes`` for a fine-tuned one). Refuses anything
    else, with a reason; never runs code stored in the file."""
    try:
        path = model_file(path)  # a run folder means its model.pt; a file of cells is refused before torch reads it
    except InputError as e:
        raise CheckpointError(str(e)) from None
    try:
        obj = read_file(path)
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
    return from_payload(obj, path)


def load_vocab(source: str | Path) -> list[str]:
    """The ordered vocabulary of a gene list (.txt/.tsv/.csv), an .h5ad (its var_names, e.g. the
    output of preprocess.py), one of our checkpoints or a run folder holding one."""
    path = Path(source)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        path = path / MODEL_FILE  # a run folder: its model's genes
    if path.is_file() and path.name.lower().endswith(CHECKPOINT_SUFFIXES):
        try:
            return list(load_checkpoint(path).genes)
        except CheckpointError as e:
            raise InputError(f"vocabulary: {e}") from None
    return read_vocab_file(path)


def choose_library_size(requested: str = "auto", pretrained: Checkpoint | None = None, data: Sequence[str | Path] = (),
                        vocab: str | Path | None = None, genes: Sequence[str] | None = None) -> tuple[str, str]:
    """Where library sizes are taken (``"all"`` or ``"vocab"``, see :mod:`data.preprocess`) and why.

    ``requested`` other than ``"auto"`` wins. Otherwise, in order: the ``pretrained`` model's
    setting; the one preprocess.py recorded in the ``data`` files; the setting of a checkpoint given
    as ``vocab``; ``"vocab"`` for a gene list of the published vocabulary's size (16,906 genes,
    the published preprocessing); else ``"all"``.
    """
    if requested != "auto":
        if requested not in LIBRARY_SIZES:
            raise InputError(f"--library-size must be auto or one of {LIBRARY_SIZES}, got {requested!r}")
        return requested, "as asked"
    if pretrained is not None:
        return pretrained.preprocessing["library_size"], f"as {pretrained.source or 'the pretrained model'} was trained"
    recorded = recorded_library_size(list(data))
    if recorded is not None:
        return recorded, "as preprocess.py recorded in the input"
    if vocab is not None and Path(vocab).is_dir() and (Path(vocab) / MODEL_FILE).is_file():
        vocab = Path(vocab) / MODEL_FILE
    if vocab is not None and Path(vocab).name.lower().endswith(CHECKPOINT_SUFFIXES):
        ckpt = load_checkpoint(vocab)
        return ckpt.preprocessing["library_size"], f"as {vocab} was trained"
    if genes is not None and len(genes) == PUBLISHED_VOCAB_SIZE:
        return "vocab", f"the vocabulary has the published {PUBLISHED_VOCAB_SIZE} genes: the published preprocessing"
    return "all", "the default"
