"""How a model to train starts: its gene embedding (gene2vec trained or read, learned, or none),
the classifier a fine-tuning run starts from (a pretrained encoder with the published freezing
policy, or a random encoder), and the head's start from the expression read-out."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse

from data.dataset import CellDataset
from data.gene2vec import embeddings_for_vocab, load_pretrained
from data.gene2vec_training import train_gene2vec
from data.io import InputError
from model.checkpoint import Checkpoint
from model.inference import InferenceOptions, run_batches
from model.nn.config import ExecutionOptions, ScBERTConfig
from model.nn.network import ScBERT

log = logging.getLogger("scbert")

GENE2VEC_MODES = ("train", "none", "learned")  # or a file
HEAD_INITS = ("expression", "random")


def gene_embedding(spec: str, genes_path: str | None, vocab: Sequence[str], X: sparse.csr_matrix | None, dim: int,
                   seed: int = 0, progress: bool = True) -> tuple[str, torch.Tensor | None, dict[str, Any]]:
    """Resolve ``--gene2vec``: the config's gene_embedding mode, the (n_genes, dim) vectors (or
    None) and a report. ``spec``: ``train`` (gene2vec on the cells ``X``), ``none``, ``learned``,
    or a file: word2vec text, or ``.npy`` with its gene list ``genes_path``."""
    if spec in ("none", "learned"):
        return spec, None, {"source": spec}
    if spec == "train":
        mat, rep = train_gene2vec(X, list(vocab), dim, seed=seed, progress=progress)
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--gene2vec {spec}: no such file (use train, none, learned, or a path)")
        if path.suffix == ".npy" and genes_path is None:
            raise InputError(f"--gene2vec {spec} is a .npy matrix without gene names: give its gene list with --gene2vec-genes")
        names, mat, source = load_pretrained(path, genes_path)
        if mat.shape[1] != dim:
            raise InputError(f"the gene2vec vectors in {path} have {mat.shape[1]} dimensions but the model has --dim {dim}; set --dim {mat.shape[1]}")
        mat, rep = embeddings_for_vocab(list(vocab), names, mat, source=source, seed=seed)
    return "gene2vec", torch.from_numpy(np.asarray(mat, dtype=np.float32)), rep.to_dict()


def new_classifier(
    config: ScBERTConfig,
    n_classes: int,
    dropout: float = 0.0,
    *,
    pretrained: Checkpoint | None = None,
    gene_vectors: torch.Tensor | None = None,
    train_all: bool = False,
    head_only: bool = False,
    options: ExecutionOptions | None = None,
    redraw_features: bool = True,
    members: int = 1,
) -> ScBERT:
    """The classifier a fine-tuning run starts from: ``config``'s encoder with a new head of
    ``n_classes`` outputs (``dropout`` in the head).

    With ``pretrained``: its encoder weights and the published freezing policy (only the final
    norm, the second-to-last layer and the head are trained; ``train_all``: everything;
    ``head_only``: only the head). Without: a random encoder (``gene_vectors`` as its frozen gene
    embedding), trained whole. ``redraw_features=False`` keeps the FAVOR+ random features fixed
    (the published code redraws them every 1,000 training calls, under a head fitted to the old draw).
    ``members`` > 1: an ensemble of that many heads (:class:`~model.nn.network.ClassifierEnsemble`).
    """
    if train_all and head_only:
        raise ValueError("train_all and head_only exclude each other")
    model = ScBERT(config.replace(head="classifier", n_classes=n_classes, classifier_dropout=dropout,
                                  classifier_members=members), gene_vectors, options)
    if pretrained is not None:
        model.load_encoder_state(pretrained.state_dict)
    elif head_only:
        raise InputError("--head-only needs a pretrained encoder (--pretrained): without one, only a random encoder would be kept")
    model.freeze_for_finetuning(train_all=train_all or pretrained is None, head_only=head_only)
    if not redraw_features:
        model.fix_random_features()
    return model


def freezing_policy(pretrained: bool, train_all: bool, head_only: bool) -> str:
    """The name of the layers a fine-tuning run trains, for its record."""
    if head_only:
        return "head only"
    return "all layers" if train_all or not pretrained else "published (final norm, second-to-last layer, head)"


@torch.no_grad()
def init_head_from_expression(model: ScBERT, ds: CellDataset, device: torch.device, n_cells: int = 64, max_tokens: int = 200_000,
                              seed: int = 0) -> float:
    """:meth:`~model.nn.network.CellClassifier.init_from_expression` from the first ``n_cells``
    cells of ``ds`` (encoded in eval mode; the model's mode is restored), on at most ``max_tokens``
    gene positions drawn evenly from them (memory stays small at 16,906 genes). Returns the R^2."""
    was_training = model.training
    rows = np.arange(min(n_cells, len(ds)))
    n_genes = model.config.n_genes
    per_cell = min(n_genes, math.ceil(max_tokens / max(1, len(rows))))
    gen = torch.Generator().manual_seed(seed)

    def sample(m: ScBERT, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        h = m.encode(tokens)
        pos = torch.stack([torch.randperm(n_genes, generator=gen)[:per_cell] for _ in range(len(tokens))]).to(h.device)
        return {"h": torch.gather(h.float(), 1, pos[..., None].expand(-1, -1, h.shape[-1])), "bins": torch.gather(tokens, 1, pos)}

    # one cell at a time: the same numbers whatever the batch size or process count
    parts = [out for _, out in run_batches(model, ds, sample, InferenceOptions(1, device, progress=False), rows=rows)]
    model.train(was_training)
    return model.to_out.init_from_expression(torch.cat([p["h"] for p in parts]), torch.cat([p["bins"] for p in parts]),
                                             max_tokens=max_tokens, seed=seed)
