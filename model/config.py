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
        for name in ("dim", "depth", "heads", "dim_head"):
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
