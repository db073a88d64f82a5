"""Arithmetic of one scBERT forward pass, for rooflines: how fast could it possibly run?

Counts the floating-point operations of the matrix products (2 per multiply-add) of one cell's
forward pass through the encoder, per component, from the model configuration alone. The
elementwise work (exp, LayerNorm, GELU, softmax-kernel shifts) is counted separately as
element passes: it is memory- and instruction-bound, not product-bound. A training step costs
about three forward passes (the backward pass computes two products per forward product), plus
the recomputation that :mod:`model.nn.favor` and gradient checkpointing trade for memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.nn.config import ScBERTConfig

FF_MULT = 4  # performer_pytorch's FeedForward: dim -> 4 dim -> dim


@dataclass
class ForwardCost:
    """Operations of one cell's forward pass (all layers)."""

    qkv: float  # query, key and value projections
    attn_out: float  # output projection of the heads
    feed_forward: float
    features: float  # FAVOR+: queries and keys times the random features
    context: float  # FAVOR+: key features x values, query features x context (and normalisers)
    head: float  # MLM reconstructor or classifier
    exp_elements: float  # elements passed through exp (query and key features)

    @property
    def encoder(self) -> float:
        return self.qkv + self.attn_out + self.feed_forward + self.features + self.context

    @property
    def total(self) -> float:
        return self.encoder + self.head

    def as_dict(self) -> dict[str, float]:
        return {"qkv": self.qkv, "attn_out": self.attn_out, "feed_forward": self.feed_forward, "features": self.features,
                "context": self.context, "head": self.head, "encoder": self.encoder, "total": self.total,
                "exp_elements": self.exp_elements}


def forward_cost(config: ScBERTConfig) -> ForwardCost:
    """FLOPs (2 per multiply-add) of one cell through ``config``'s model, per component."""
    n, dim, depth = config.seq_len, config.dim, config.depth
    inner = config.heads * config.dim_head
    m, d, h = config.n_features, config.dim_head, config.heads
    per_layer_qkv = 2.0 * n * dim * inner * 3
    per_layer_out = 2.0 * n * inner * dim
    per_layer_ff = 2.0 * n * dim * FF_MULT * dim * 2
    per_layer_features = 2.0 * n * d * m * h * 2  # q P' and k P'
    per_layer_context = 2.0 * n * m * (d + 1) * h * 2  # K'^T [V, 1] and Q' [C, k-sum]
    if config.head == "mlm":
        head = 2.0 * n * dim * config.num_tokens
    else:
        head = 2.0 * n * dim + 2.0 * n * 512 + 2.0 * 512 * config.classifier_hidden + 2.0 * config.classifier_hidden * config.n_classes
    return ForwardCost(
        qkv=depth * per_layer_qkv,
        attn_out=depth * per_layer_out,
        feed_forward=depth * per_layer_ff,
        features=depth * per_layer_features,
        context=depth * per_layer_context,
        head=head,
        exp_elements=depth * 2.0 * n * m * h,
    )
