"""The scBERT network: token + gene embeddings, a Performer encoder, and two heads.

Module names follow the published checkpoints (``token_emb``, ``pos_emb.emb``, ``performer``,
``norm``, ``to_out``) so their state dicts map onto this model with a single key rename.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.nn.config import ExecutionOptions, ScBERTConfig
from model.nn.favor import disable_fast_attention, enable_fast_attention
from model.nn.first_layer_cache import FirstLayerCache
from model.runtime import autocast

with warnings.catch_warnings():
    # performer_pytorch imports distutils and torch.cuda.amp.autocast, both deprecated.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from performer_pytorch import Performer

POOLINGS = ("mean", "expressed")


def pool_encodings(h: Tensor, tokens: Tensor, pooling: str = "mean") -> Tensor:
    """Average (batch, seq_len, dim) encodings over positions into one float32 vector per cell.

    ``mean``: over all ``n_genes`` gene positions (the extra last position excluded);
    ``expressed``: over the positions whose input bin is non-zero (all positions for a cell with
    nothing expressed).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    h, tokens = h[:, :-1].float(), tokens[:, :-1]
    if pooling == "mean":
        return h.mean(dim=1)
    w = (tokens > 0).float()
    w[w.sum(dim=1) == 0] = 1.0
    return (h * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True)


class GeneEmbedding(nn.Module):
    """One vector per token position, i.e. per vocabulary gene (+ the extra last position).

    Frozen when it holds gene2vec vectors; trainable for the ``learned`` variant.
    """

    def __init__(self, seq_len: int, dim: int, weights: Tensor | None = None, trainable: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(seq_len, dim)
        if weights is not None:
            if tuple(weights.shape) != (seq_len, dim):
                raise ValueError(f"gene embedding must be {(seq_len, dim)}, got {tuple(weights.shape)}")
            with torch.no_grad():
                self.emb.weight.copy_(weights.to(torch.float32))
        self.emb.weight.requires_grad_(trainable)

    def forward(self, n: int) -> Tensor:
        return self.emb.weight[:n]


class CellClassifier(nn.Module):
    """The published fine-tuning head.

    Conv2d(1, 1, (1, dim)) reduces each gene's representation to one number; then
    ReLU -> Linear(seq_len, 512) -> ReLU -> dropout -> Linear(512, hidden) -> ReLU -> dropout
    -> Linear(hidden, n_classes).
    """

    def __init__(self, seq_len: int, dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.fc1 = nn.Linear(seq_len, 512)
        self.fc2 = nn.Linear(512, hidden)
        self.fc3 = nn.Linear(hidden, n_classes)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def features(self, h: Tensor) -> Tensor:
        """(batch, seq_len, dim) encodings -> (batch, hidden) penultimate activations, in float32."""
        # Always float32, whatever the encoder's precision: the head is ~1% of a forward pass, yet
        # in bf16 it made nearly all of bf16's change to the probabilities (largest change 0.0032
        # on 32 real cells at 4,000 genes, against 0.0002 with this head in float32).
        with torch.autocast(h.device.type, enabled=False):
            # A (1, dim) convolution with one in/out channel is a dot product per position;
            # a matmul computes the same thing from the same parameters, much faster on CPU.
            w = self.conv1.weight.reshape(-1)
            x = self.act(h.to(w.dtype) @ w + self.conv1.bias)
            x = self.dropout(self.act(self.fc1(x)))
            return self.dropout(self.act(self.fc2(x)))

    def logits(self, features: Tensor) -> Tensor:
        """(batch, hidden) penultimate activations -> (batch, n_classes) logits, in float32."""
        with torch.autocast(features.device.type, enabled=False):
            return self.fc3(features.to(self.fc3.weight.dtype))

    def forward(self, h: Tensor) -> Tensor:
        return self.logits(self.features(h))

    def outputs(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(features, logits, logits): :meth:`ClassifierEnsemble.outputs` of a one-head model."""
        f = self.features(h)
        logits = self.logits(f)
        return f, logits, logits

    @torch.no_grad()
    def init_from_expression(self, h: Tensor, bins: Tensor, max_tokens: int = 200_000, seed: int = 0) -> float:
        """Set ``conv1`` to the (ridge) least-squares read-out of each position's expression bin from
        its encoding ``h`` (..., dim), ``bins`` (...) the input bins; returns the fit's R^2.

        The published head starts ``conv1`` at random, so its one number per gene begins as an
        arbitrary mix of expression, gene identity and cell context, and fine-tuning on a few
        thousand cells overfits before it finds the expression (measured on PBMC3k: 0.78-0.85
        accuracy vs 0.89-0.90 with this start). Started here, the head is an MLP over the
        encoder's denoised, context-aware expression level, which training then refines.
        """
        x = h.reshape(-1, h.shape[-1]).double()
        t = bins.reshape(-1).double()
        if x.shape[0] > max_tokens:
            keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
            x, t = x[keep], t[keep]
        if t.std() == 0:
            return 0.0  # nothing expressed (or all equal): keep the random start
        # Ridge, not plain least squares: LayerNorm outputs are nearly collinear with the intercept
        # (their coordinates sum to about the same number for every gene), and an unregularised
        # solution would swing with the last bits of the encodings.
        a = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        gram = a.T @ a
        ridge = 1e-3 * torch.diagonal(gram)[:-1].mean()
        gram[:-1, :-1] += ridge * torch.eye(gram.shape[0] - 1, dtype=gram.dtype)
        sol = torch.linalg.solve(gram, a.T @ t)
        resid = t - a @ sol
        self.conv1.weight.copy_(sol[:-1].reshape(self.conv1.weight.shape).to(self.conv1.weight))
        self.conv1.bias.fill_(float(sol[-1]))
        return float(1.0 - resid.var() / t.var())


class ClassifierEnsemble(nn.Module):
    """``n`` :class:`CellClassifier` heads on the same encodings, each trained alone on its own
    stopping split (:func:`model.train.finetuning.finetune_heads`); a cell's class scores are the
    mean of their logits. The first head is the one whose stopping split calibrates the novelty
    thresholds: its features (the cell embedding) and its logits are what the novelty scores read,
    so they are exactly those of a one-head model. A head costs ~1% of a forward pass.
    """

    def __init__(self, seq_len: int, dim: int, n_classes: int, n: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.members = nn.ModuleList(CellClassifier(seq_len, dim, n_classes, hidden, dropout) for _ in range(n))

    def features(self, h: Tensor) -> Tensor:
        """(batch, seq_len, dim) encodings -> (batch, hidden): the first head's penultimate features."""
        return self.members[0].features(h)

    def outputs(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(the first head's features, the mean of every head's logits, the first head's logits)."""
        first = self.members[0]
        f = first.features(h)
        own = first.logits(f)
        return f, torch.stack([own, *(m(h) for m in self.members[1:])]).mean(0), own

    def forward(self, h: Tensor) -> Tensor:
        return self.outputs(h)[1]


class ScBERT(nn.Module):
    """scBERT: ``tokens`` (batch, n_genes + 1) of expression bins -> per-gene logits or class logits."""

    def __init__(self, config: ScBERTConfig, gene_vectors: Tensor | None = None, options: ExecutionOptions | None = None) -> None:
        super().__init__()
        self.config = c = config
        self.token_emb = nn.Embedding(c.num_tokens, c.dim)
        if c.gene_embedding == "none":
            if gene_vectors is not None:
                raise ValueError("gene vectors were given but gene_embedding is 'none'")
            self.pos_emb = None
        else:
            if gene_vectors is not None and gene_vectors.shape[0] == c.n_genes:
                # The extra last position gets a zero vector, as published.
                gene_vectors = torch.cat([gene_vectors, gene_vectors.new_zeros(1, c.dim)])
            self.pos_emb = GeneEmbedding(c.seq_len, c.dim, gene_vectors, trainable=c.gene_embedding == "learned")
        self.dropout = nn.Dropout(c.emb_dropout)
        self.performer = Performer(
            dim=c.dim,
            depth=c.depth,
            heads=c.heads,
            dim_head=c.dim_head,
            nb_features=c.n_features,
            feature_redraw_interval=c.feature_redraw_interval,
            ff_dropout=c.ff_dropout,
            attn_dropout=c.attn_dropout,
            qkv_bias=False,
            attn_out_bias=True,
        )
        # The pip Performer registers its layers a second time under proj_updater.instance, which
        # would store every weight twice in a state dict; keep it as a plain reference instead.
        updater = self.performer.proj_updater
        object.__setattr__(updater, "instance", updater._modules.pop("instance"))
        self.norm = nn.LayerNorm(c.dim)
        self.frozen_encoder = False  # set by freeze_for_finetuning(head_only=True)
        if c.head == "mlm":
            self.to_out: nn.Module = nn.Linear(c.dim, c.num_tokens)
        elif c.classifier_members == 1:  # the published head, its state dict keys unchanged
            self.to_out = CellClassifier(c.seq_len, c.dim, c.n_classes, c.classifier_hidden, c.classifier_dropout)
        else:
            self.to_out = ClassifierEnsemble(c.seq_len, c.dim, c.n_classes, c.classifier_members, c.classifier_hidden, c.classifier_dropout)
        self.options = ExecutionOptions()
        self.gradient_checkpointing = False
        self.first_layer_cache: FirstLayerCache | None = None
        self.configure(options or ExecutionOptions())

    def configure(self, options: ExecutionOptions) -> ScBERT:
        """Apply ``options`` (precision, fast kernel, first-layer cache, compile, gradient
        checkpointing): the one place where a network's execution is set. Weights, state dict and
        outputs (to float rounding) stay as they are. Returns the network."""
        if options.fast_attention:
            enable_fast_attention(self, torch.bfloat16 if options.precision == "bf16" else torch.float32)
        else:
            disable_fast_attention(self)
        if not (options.fast_attention and options.first_layer_cache):
            self.first_layer_cache = None
        elif self.first_layer_cache is None:
            self.first_layer_cache = FirstLayerCache()
        # Recompute each sub-layer's activations in the backward pass instead of keeping them:
        # training memory then grows with one layer, not ``depth`` layers (at ~1/3 more compute).
        self.gradient_checkpointing = options.grad_checkpointing
        compiled = "encode" in self.__dict__
        if options.compile and not compiled:
            self.encode = torch.compile(self.encode)  # an instance attribute: parameters and keys stay as they are
        elif compiled and not options.compile:
            del self.encode
        self.options = options
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the network's precision, on the device of its weights: forward
        passes run inside it (the kernel's own dtype is set by :meth:`configure`)."""
        return autocast(self.token_emb.weight.device, self.options.precision)

    def encode(self, tokens: Tensor) -> Tensor:
        """(batch, seq_len) int tokens -> (batch, seq_len, dim) encodings after the final LayerNorm."""
        if tokens.dim() != 2 or tokens.shape[1] != self.config.seq_len:
            raise ValueError(
                f"expected tokens of shape (batch, {self.config.seq_len}) for a {self.config.n_genes}-gene model, "
                f"got {tuple(tokens.shape)}"
            )
        x = self.token_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(tokens.shape[1]).to(x.dtype)
        x = self.dropout(x)
        if self.first_layer_cache is not None and self.first_layer_cache.usable(self, tokens):
            x = self.first_layer_cache.first_layer(self, tokens, x)
            for attn, ff in self.performer.net.layers[1:]:
                x = x + attn(x)
                x = x + ff(x)
        elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            x = self._checkpointed_performer(x)
        else:
            x = self.performer(x)
        return self.norm(x)

    def _checkpointed_performer(self, x: Tensor) -> Tensor:
        """``self.performer(x)`` with each attention and feed-forward block checkpointed."""
        if self.performer.auto_check_redraw:
            self.performer.proj_updater.redraw_projections()
        for attn, ff in self.performer.net.layers:
            x = x + checkpoint(attn, x, use_reentrant=False)
            x = x + checkpoint(ff, x, use_reentrant=False)
        return x

    def forward(self, tokens: Tensor) -> Tensor:
        """MLM head: (batch, seq_len, num_tokens) logits; classifier head: (batch, n_classes) logits."""
        return self.to_out(self.encode(tokens))

    def embed(self, tokens: Tensor, pooling: str = "mean") -> Tensor:
        """One vector per cell from the final encodings; see :func:`pool_encodings`."""
        return pool_encodings(self.encode(tokens), tokens, pooling)

    def freeze_for_finetuning(self, train_all: bool = False, head_only: bool = False) -> None:
        """The published fine-tuning policy: train only the final norm, the second-to-last
        encoder layer and the head. ``train_all`` trains everything; ``head_only`` only the
        classifier head (the encoder is then a fixed feature extractor: no backward pass through
        it, and nothing in it can overfit a small training set). Gene2vec stays frozen."""
        if train_all and head_only:
            raise ValueError("train_all and head_only exclude each other")
        self.frozen_encoder = head_only
        self.train(self.training)
        for p in self.parameters():
            p.requires_grad_(train_all)
        if not train_all:
            trainable = [self.to_out] if head_only else [self.norm, self.to_out]
            if self.config.depth >= 2 and not head_only:
                trainable.append(self.performer.net.layers[-2])
            for module in trainable:
                for p in module.parameters():
                    p.requires_grad_(True)
        if self.pos_emb is not None:
            self.pos_emb.emb.weight.requires_grad_(self.config.gene_embedding == "learned" and train_all)

    def fix_random_features(self) -> None:
        """Keep the current FAVOR+ random features: no redraw during training (performer-pytorch
        redraws every ``feature_redraw_interval`` training calls, a count that a checkpoint carries
        over from pretraining; one redraw moves a small encoder's output far)."""
        self.performer.proj_updater.feature_redraw_interval = None

    def train(self, mode: bool = True) -> ScBERT:
        """As ``nn.Module.train``; a frozen encoder (head-only fine-tuning) stays in eval mode: no
        dropout, and no redraw of its random features, so the head always sees the same encoder."""
        super().train(mode)
        if mode and self.frozen_encoder:
            self.performer.eval()
            self.dropout.eval()
        return self

    def load_encoder_state(self, state_dict: dict[str, Tensor]) -> None:
        """Load everything but the head (``to_out.*``) from another scBERT state dict, strictly."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("to_out.")}
        incoming = {k: v for k, v in state_dict.items() if not k.startswith("to_out.")}
        missing = sorted(set(own) - set(incoming))
        unexpected = sorted(set(incoming) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"pretrained weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for k, v in incoming.items():
            if own[k].shape != v.shape:
                raise ValueError(f"pretrained weight {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
        self.load_state_dict(incoming, strict=False)

    def gene_vectors(self) -> Tensor | None:
        """The (n_genes, dim) gene embedding matrix (without the extra last position)."""
        if self.pos_emb is None:
            return None
        return self.pos_emb.emb.weight.detach()[:-1].clone()
