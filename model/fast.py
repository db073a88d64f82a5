"""A faster, numerically equivalent FAVOR+ attention for the pip ``performer_pytorch`` modules.

``performer_pytorch.FastAttention`` builds its softmax-kernel features by repeating the projection
matrix to (batch, heads, features, dim_head), then makes several full passes over the
(batch, heads, seq_len, features) feature tensor (subtract, subtract, exp, add eps, multiply) and
finishes with a three-operand einsum. On a CPU those elementwise passes over ~18 MB per head and
cell cost more than the matrix products. :class:`FastFavorAttention` computes the same function:

* the data normaliser is folded into the (features, dim_head) projection, which is multiplied
  without repeating it;
* the diagonal term, the stabilising maximum and the ``ratio`` factor are folded into one
  per-row shift, so the features are ``exp(x - shift)`` from one in-place subtract and one
  in-place exp;
* the ``+ eps`` is never added to the big tensors: its contribution to the key sum, the context
  and the normaliser is added as a rank-one correction on small tensors;
* the work runs one slice of (batch x heads) at a time, so temporaries stay cache-sized and the
  memory is linear in genes and batch size (no genes x genes matrix exists anywhere).

The class swap keeps every parameter and buffer, so state dicts and checkpoints are unchanged,
and ``isinstance(m, FastAttention)`` still holds (feature redraws keep working).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from performer_pytorch.performer_pytorch import FastAttention

# Elements of one (seq_len x features) slice group processed at once: ~16 MB of float32.
SLICE_ELEMENTS = 1 << 22


def _features(x: Tensor, proj_t: Tensor, diag_scale: float, log_ratio: float, is_query: bool) -> Tensor:
    """``exp(x @ proj_t - |x|^2 * diag_scale - max + log_ratio)`` for (slices, n, d) ``x``.

    Queries are stabilised by their row maximum, keys by the maximum over the whole slice,
    both treated as constants for the gradient, as in ``performer_pytorch.softmax_kernel``.
    """
    dash = torch.matmul(x, proj_t)
    if is_query:
        top = dash.detach().amax(dim=-1, keepdim=True)
    else:
        top = dash.detach().amax(dim=(-1, -2), keepdim=True)
    shift = (x * x).sum(dim=-1, keepdim=True) * diag_scale + top - log_ratio
    # In place even under autograd: the product's backward needs only its inputs, and exp_'s
    # backward uses its own result, which is what stays saved.
    return dash.sub_(shift).exp_()


def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, eps: float = 1e-4) -> Tensor:
    """Non-causal FAVOR+ softmax-kernel attention of (batch, heads, n, d) ``q, k, v``.

    Same result as ``FastAttention.forward`` with its defaults (softmax kernel, non-causal).
    """
    b, h, n, d = q.shape
    e = v.shape[-1]
    m = projection.shape[0]
    normaliser = d ** -0.25
    proj_t = (projection.to(q.dtype) * normaliser).t()
    diag_scale = normaliser**2 / 2.0
    ratio = m**-0.5
    log_ratio = math.log(ratio)
    ce = ratio * eps  # what ``ratio * (exp(.) + eps)`` adds to every feature
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    if n * m >= SLICE_ELEMENTS // 2:
        # Big slices: one (batch, head) at a time, the output (without autograd) written straight
        # into the (batch, n, heads, e) layout the caller flattens next.
        # unbind (not indexing): its backward is one stack, where each index's backward would
        # allocate and fill a full-size zero gradient.
        qs, ks, vs = (t.reshape(b * h, n, t.shape[-1]).unbind(0) for t in (q, k, v))
        heads = [_attend(qq, kk, vv, proj_t, diag_scale, log_ratio, ce) for qq, kk, vv in zip(qs, ks, vs)]
        return torch.stack(heads).view(b, h, n, e) if needs_grad else _gather(heads, b, h, n, e)
    qs, ks, vs = (t.reshape(b * h, n, t.shape[-1]) for t in (q, k, v))
    step = max(1, SLICE_ELEMENTS // max(1, n * m))
    outs = [
        _attend(qs[s : s + step], ks[s : s + step], vs[s : s + step], proj_t, diag_scale, log_ratio, ce)
        for s in range(0, b * h, step)
    ]
    return torch.cat(outs).view(b, h, n, e)


def _gather(heads: list[Tensor], b: int, h: int, n: int, e: int) -> Tensor:
    """Per-(batch, head) (n, e) outputs as a (b, h, n, e) view of a (b, n, h, e) tensor."""
    out = heads[0].new_empty(b, n, h, e)
    for idx, o in enumerate(heads):
        out[idx // h, :, idx % h] = o
    return out.permute(0, 2, 1, 3)


def _attend(
    qq: Tensor, kk: Tensor, vv: Tensor, proj_t: Tensor, diag_scale: float, log_ratio: float, ce: float
) -> Tensor:
    """Attention of one group of (..., n, d) query/key/value slices; see :func:`favor_attention`."""
    n = kk.shape[-2]
    kf = _features(kk, proj_t, diag_scale, log_ratio, False)  # (..., n, m), eps left out
    k_sum = kf.sum(dim=-2) + n * ce  # (..., m)
    context = torch.matmul(kf.transpose(-1, -2), vv) + ce * vv.sum(dim=-2, keepdim=True)  # (..., m, e)
    del kf
    # One product gives numerator and normaliser: the key sum rides along as an extra column.
    context = torch.cat([context, k_sum.unsqueeze(-1)], dim=-1)  # (..., m, e + 1)
    qf = _features(qq, proj_t, diag_scale, log_ratio, True)
    num = torch.matmul(qf, context) + ce * context.sum(dim=-2, keepdim=True)  # (..., n, e + 1)
    del qf
    return num[..., :-1] / num[..., -1:]


class FastFavorAttention(FastAttention):
    """``FastAttention`` with :func:`favor_attention` as its forward (other modes unchanged)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        if self.causal or self.no_projection or self.generalized_attention:
            return super().forward(q, k, v)
        return favor_attention(q, k, v, self.projection_matrix)


def enable_fast_attention(model: nn.Module) -> nn.Module:
    """Switch every performer ``FastAttention`` in ``model`` to :class:`FastFavorAttention`, in place."""
    for module in model.modules():
        if type(module) is FastAttention:
            module.__class__ = FastFavorAttention
    return model


def disable_fast_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fast_attention`, in place."""
    for module in model.modules():
        if type(module) is FastFavorAttention:
            module.__class__ = FastAttention
    return model


def fast_attention_enabled(model: nn.Module) -> bool:
    """Whether any attention module of ``model`` runs the fast path."""
    return any(type(module) is FastFavorAttention for module in model.modules())
