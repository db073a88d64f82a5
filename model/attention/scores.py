"""How much attention each gene receives in scBERT's Performer, computed exactly in linear time.

FAVOR+ attention (``performer_pytorch``) replaces softmax(QK^T) by ``A = D^-1 Q' K'^T``, where
``Q' = phi_q(Q)`` and ``K' = phi_k(K)`` are (n x m) random-feature maps (``softmax_kernel``) and
``D = diag(Q' K'^T 1)`` normalises each row to sum to one. The attention that gene ``j`` receives
from all genes of a cell is the column sum of ``A``::

    c_j = sum_i q'_i . k'_j / D_i = k'_j . (sum_i q'_i / D_i)

which costs O(n m) per head instead of the O(n^2) of building ``A`` (16,907^2 numbers per head for
the published vocabulary). ``q'`` and ``k'`` are taken from the model itself: forward hooks on the
chosen layer's ``to_q`` / ``to_k`` capture the projections, and the package's own
``softmax_kernel`` is applied with that layer's ``projection_matrix``, so the scores are exactly
those of the attention the model computes. Scores are averaged over heads; with ``normalize`` they
are divided by the sequence length, i.e. they are the mean attention a gene receives per gene (all
scores of a cell then sum to 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch import Tensor, nn

from data.dataset import CellDataset
from model.inference import InferenceOptions, run_batches
from model.memory import cell_working_bytes
from model.nn.network import ScBERT

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from performer_pytorch.performer_pytorch import SelfAttention, softmax_kernel

Layer = int | str | Sequence[int]


def attention_modules(model: ScBERT) -> list[nn.Module]:
    """The Performer's self-attention modules, first layer first."""
    mods = [m for m in model.performer.modules() if isinstance(m, SelfAttention)]
    if not mods:
        raise ValueError("this model has no Performer self-attention layers")
    return mods


def resolve_layers(model: ScBERT, layer: Layer) -> list[int]:
    """``layer`` as a list of non-negative layer indices: an int (negative counts from the last
    layer), ``"all"``, or a sequence of ints."""
    depth = len(attention_modules(model))
    if isinstance(layer, str):
        if layer.strip().lower() == "all":
            return list(range(depth))
        try:
            layer = int(layer)
        except ValueError:
            raise ValueError(f"layer must be a layer number or 'all', got {layer!r}") from None
    wanted = [layer] if isinstance(layer, int) else list(layer)
    if not wanted:
        raise ValueError("no attention layer was chosen")
    out = []
    for i in wanted:
        if not -depth <= int(i) < depth:
            raise ValueError(f"layer {i} does not exist: the model has {depth} layers (0..{depth - 1}, or -1 for the last)")
        out.append(int(i) % depth)
    return sorted(set(out))


def _check_supported(attn: nn.Module) -> None:
    fa = attn.fast_attention
    if getattr(attn, "local_attn", None) is not None or attn.global_heads != attn.heads:
        raise ValueError("attention scores are only implemented for global (not local) attention heads")
    if fa.no_projection or fa.generalized_attention or fa.causal:
        raise ValueError("attention scores are only implemented for the non-causal softmax-kernel FAVOR+ attention scBERT uses")


def received_from_qk(q: Tensor, k: Tensor, projection_matrix: Tensor, heads: int) -> Tensor:
    """Attention received per position, averaged over heads, from the query and key projections.

    ``q``, ``k``: (batch, n, heads * dim_head) outputs of ``to_q`` / ``to_k``. Returns (batch, n)
    column sums of the row-normalised FAVOR+ attention matrix (not divided by n).

    One (cell, head) slice at a time: the (n x features) feature maps of a single slice are the
    largest tensors (18 MB at 16,907 genes), whatever the batch size. ``softmax_kernel`` takes the
    key maximum over a whole slice, so slice by slice is the same computation as all at once.
    """
    b, n, hd = q.shape
    if hd % heads:
        raise ValueError(f"projection width {hd} is not a multiple of {heads} heads")
    d = hd // heads
    proj = projection_matrix.float()
    out = torch.zeros(b, n, dtype=torch.float32, device=q.device)
    for i in range(b):
        for h in range(heads):
            qh = q[i, :, h * d : (h + 1) * d].float()[None, None]  # (1, 1, n, d): the kernel's layout
            kh = k[i, :, h * d : (h + 1) * d].float()[None, None]
            qp = softmax_kernel(qh, projection_matrix=proj, is_query=True)[0, 0]  # (n, m)
            kp = softmax_kernel(kh, projection_matrix=proj, is_query=False)[0, 0]
            row_norm = qp @ kp.sum(dim=0)  # D_i, (n,)
            w = (qp / row_norm[:, None]).sum(dim=0)  # sum_i q'_i / D_i, (m,)
            out[i] += kp @ w
            del qp, kp
    return out / heads


class _Done(Exception):
    """Raised from a hook once every wanted layer is scored, to skip the rest of the network."""


@torch.no_grad()
def attention_received_per_layer(model: ScBERT, tokens: Tensor, layers: Layer = -1, normalize: bool = True) -> Tensor:
    """Attention each position receives, per chosen layer: (batch, n_layers, seq_len), head mean.

    ``layers``: see :func:`resolve_layers`. Runs the encoder once (in the model's precision), up
    to the last chosen layer. With ``normalize`` the scores are divided by ``seq_len`` (mean
    attention received; each cell's scores then sum to 1 per layer).
    """
    chosen = resolve_layers(model, layers)
    mods = attention_modules(model)
    for i in chosen:
        _check_supported(mods[i])
    captured: dict[int, dict[str, Tensor]] = {i: {} for i in chosen}
    results: dict[int, Tensor] = {}

    def make_hook(i: int, which: str):  # noqa: ANN202 - a torch hook closure
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            slot = captured[i]
            slot[which] = output
            if "q" in slot and "k" in slot:
                attn = mods[i]
                with torch.autocast(device_type=output.device.type, enabled=False):
                    results[i] = received_from_qk(slot.pop("q"), slot.pop("k"), attn.fast_attention.projection_matrix, attn.heads)
                if len(results) == len(chosen):
                    raise _Done
        return hook

    handles = []
    try:
        for i in chosen:
            handles.append(mods[i].to_q.register_forward_hook(make_hook(i, "q")))
            handles.append(mods[i].to_k.register_forward_hook(make_hook(i, "k")))
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            with model.autocast():
                model.encode(tokens.to(device))
        except _Done:
            pass
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if len(results) != len(chosen):
        raise RuntimeError("the attention layers were not run: is this an scBERT model?")
    out = torch.stack([results[i] for i in chosen], dim=1)
    if normalize:
        out = out / out.shape[-1]
    return out


def attention_received(model: ScBERT, tokens: Tensor, layer: Layer = -1, normalize: bool = True) -> Tensor:
    """Attention each position (gene, plus the extra last position) receives: (batch, seq_len).

    Head mean of the column sums of the attention matrix of ``layer`` (default: the last one);
    ``layer="all"`` or a list of layers averages over those layers. See the module docstring.
    """
    return attention_received_per_layer(model, tokens, layer, normalize).mean(dim=1)


def _batches(model: ScBERT, X: sparse.csr_matrix, layer: Layer, batch_size: int, device: str | torch.device,
             normalize: bool, progress: bool, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(cell indices, (batch, n_genes) scores) per batch; the extra last position is dropped."""
    if X.shape[1] != model.config.n_genes:
        raise ValueError(f"the expression matrix has {X.shape[1]} genes, the model {model.config.n_genes}: align it to the model's genes first (data.preprocess.prepare)")

    def scores(m: ScBERT, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"scores": attention_received(m, batch["tokens"], layer, normalize)[:, :-1]}

    options = InferenceOptions(batch_size, device, progress=progress)
    for idx, out in run_batches(model, CellDataset(X, model.config.bin_num), scores, options, desc=desc):
        yield idx, out["scores"].numpy()


def fit_batch_size(config: Any, max_memory_gb: float | None, batch_size: int) -> int:
    """``batch_size``, lowered (to at least 1) so that a batch's working memory
    (:func:`cell_working_bytes`) stays within ``max_memory_gb`` (None: no bound)."""
    if max_memory_gb is None:
        return batch_size
    return max(1, min(batch_size, int(max_memory_gb * 2**30 // cell_working_bytes(config))))


def mean_attention_by_group(model: ScBERT, X: sparse.csr_matrix, groups: Sequence[str], layer: Layer = -1,
                            batch_size: int = 16, device: str | torch.device = "cpu", normalize: bool = True,
                            progress: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean attention received per gene over the cells of each group (e.g. cell type); ``X``: cells
    x model genes, log-normalised and aligned (output of ``prepare``).

    Returns the sorted group names, a (groups, n_genes) float64 matrix and the cells per group.
    Memory stays at one batch of per-cell scores.
    """
    groups = np.asarray(groups, dtype=str)
    if len(groups) != X.shape[0]:
        raise ValueError(f"{len(groups)} group labels for {X.shape[0]} cells")
    names, codes = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(names), model.config.n_genes), dtype=np.float64)
    for idx, scores in _batches(model, sparse.csr_matrix(X), layer, batch_size, device, normalize, progress, "attention"):
        np.add.at(sums, codes[idx], scores.astype(np.float64))
    counts = np.bincount(codes, minlength=len(names))
    return list(names), sums / counts[:, None], counts


def top_genes(scores: np.ndarray, groups: Sequence[str], genes: Sequence[str], k: int) -> pd.DataFrame:
    """The ``k`` highest-scoring genes per group: columns cell_type, rank (1 = most attended), gene, score."""
    k = min(k, scores.shape[1])
    rows = []
    for g, row in zip(groups, scores):
        order = np.argsort(-row, kind="stable")[:k]
        rows += [(g, r + 1, genes[j], float(row[j])) for r, j in enumerate(order)]
    return pd.DataFrame(rows, columns=["cell_type", "rank", "gene", "score"])
