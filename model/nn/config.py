"""The one configuration object of the scBERT network."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

GENE_EMBEDDINGS = ("gene2vec", "learned", "none")
HEADS = ("mlm", "classifier")


@dataclass
class ScBERTConfig:
    """Hyperparameters of scBERT; defaults are the published ones.

    ``n_genes`` is the vocabulary size; the model reads ``n_genes + 1`` tokens per cell
    (every vocabulary gene in order, then one extra position that always holds bin 0,
    as the published code appends it).
    """

    n_genes: int
    bin_num: int = 5
    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    nb_features: int | None = None  # FAVOR+ random features; None = int(dim_head * ln(dim_head))
    feature_redraw_interval: int | None = 1000
    gene_embedding: str = "gene2vec"  # "gene2vec" (frozen), "learned" or "none" (ablation)
    ff_dropout: float = 0.0
    attn_dropout: float = 0.0
    emb_dropout: float = 0.0
    head: str = "mlm"  # "mlm" (pretraining reconstructor) or "classifier"
    n_classes: int = 0
    classifier_hidden: int = 128
    classifier_dropout: float = 0.0
    classifier_members: int = 1  # >1: an ensemble of heads, their logits averaged (model.train.finetuning.finetune_heads)

    def __post_init__(self) -> None:
        if self.n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {self.n_genes}")
        if self.bin_num < 1:
            raise ValueError(f"bin_num must be >= 1, got {self.bin_num}")
        if self.gene_embedding not in GENE_EMBEDDINGS:
            raise ValueError(f"gene_embedding must be one of {GENE_EMBEDDINGS}, got {self.gene_embedding!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "classifier" and self.n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.n_classes}")
        for name in ("dim", "depth", "heads", "dim_head", "classifier_members"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_tokens(self) -> int:
        """Expression bins 0..bin_num plus one mask/pad token."""
        return self.bin_num + 2

    @property
    def mask_token(self) -> int:
        return self.bin_num + 1

    @property
    def seq_len(self) -> int:
        return self.n_genes + 1

    @property
    def n_features(self) -> int:
        if self.nb_features is not None:
            return self.nb_features
        return int(self.dim_head * math.log(self.dim_head))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScBERTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}: was this checkpoint written by a newer version?")
        return cls(**d)

    def replace(self, **changes: Any) -> ScBERTConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelSize:
    """The size of a model to build, before its vocabulary is known (defaults: the published size)."""

    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    bin_num: int = 5

    def config(self, n_genes: int, **fields: Any) -> ScBERTConfig:
        """The :class:`ScBERTConfig` of this size for ``n_genes`` genes (``fields``: the others)."""
        return ScBERTConfig(n_genes=n_genes, bin_num=self.bin_num, dim=self.dim, depth=self.depth, heads=self.heads,
                            dim_head=self.dim_head, **fields)


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ExecutionOptions:
    """How a built network computes; none of it changes the weights, the outputs (beyond float
    rounding) or the state dict. Applied in one place, :meth:`model.nn.network.ScBERT.configure`.

    ``precision``: fp32, bf16 or fp16 products (the network runs under autocast of that dtype and
    its FAVOR+ kernel is told the dtype; fp16 on GPUs only). ``fast_attention``: the
    :mod:`model.nn.favor` kernel instead of ``performer_pytorch``'s (same function, a fraction of
    the memory and time). ``first_layer_cache``: inference skips the first layer's per-cell work on
    unexpressed genes (:mod:`model.nn.first_layer_cache`; needs ``fast_attention``). ``compile``:
    ``torch.compile`` the encoder. ``grad_checkpointing``: recompute activations in the backward
    pass (training memory of one layer instead of all, ~1/3 more compute).
    """

    precision: str = "fp32"
    fast_attention: bool = True
    first_layer_cache: bool = True
    compile: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def replace(self, **changes: Any) -> ExecutionOptions:
        return dataclasses.replace(self, **changes)


NAIVE = ExecutionOptions(fast_attention=False, first_layer_cache=False)  # plain performer_pytorch, for comparisons
