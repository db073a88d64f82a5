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
# Elements of one feature tile of the inference path: ~2 MB of float32, about an L2 cache.
TILE_ELEMENTS = 1 << 19


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

    if not needs_grad and not torch.compiler.is_compiling():
        return _attend_inference(q, k, v, proj_t, diag_scale, log_ratio, ce)
    if n * m >= SLICE_ELEMENTS // 2:
        # Big slices: one (batch, head) at a time. unbind (not indexing): its backward is one
        # stack, where each index's backward would allocate and fill a full-size zero gradient.
        qs, ks, vs = (t.reshape(b * h, n, t.shape[-1]).unbind(0) for t in (q, k, v))
        heads = [_attend(qq, kk, vv, proj_t, diag_scale, log_ratio, ce) for qq, kk, vv in zip(qs, ks, vs)]
        return torch.stack(heads).view(b, h, n, e)
    qs, ks, vs = (t.reshape(b * h, n, t.shape[-1]) for t in (q, k, v))
    step = max(1, SLICE_ELEMENTS // max(1, n * m))
    outs = [
        _attend(qs[s : s + step], ks[s : s + step], vs[s : s + step], proj_t, diag_scale, log_ratio, ce)
        for s in range(0, b * h, step)
    ]
    return torch.cat(outs).view(b, h, n, e)


def _attend_inference(q: Tensor, k: Tensor, v: Tensor, proj_t: Tensor, diag_scale: float, log_ratio: float, ce: float) -> Tensor:
    """No-autograd attention in cache-sized row tiles, written into a (b, n, h, e) buffer.

    Key features are consumed tile by tile into the context; their stabilising maximum (over the
    whole slice) is kept as a running maximum, rescaling what was accumulated when it grows, which
    gives exactly the one-pass result. Query rows are independent, so their tiles are too.
    """
    b, h, n, _ = q.shape
    e = v.shape[-1]
    m = proj_t.shape[1]
    rows = max(16, TILE_ELEMENTS // m)
    out = q.new_empty(b, n, h, e)
    for bi in range(b):
        for hi in range(h):
            qq, kk, vv = q[bi, hi], k[bi, hi], v[bi, hi]
            context = kk.new_zeros(m, e + 1)  # [sum_j phi(k_j) v_j, sum_j phi(k_j)], eps part excluded
            top = -math.inf
            for s in range(0, n, rows):
                kc = kk[s : s + rows]
                dash = torch.matmul(kc, proj_t)
                tile_top = float(dash.max())
                if tile_top > top:
                    if top != -math.inf:
                        context.mul_(math.exp(top - tile_top))
                    top = tile_top
                dash.sub_((kc * kc).sum(dim=-1, keepdim=True) * diag_scale + (top - log_ratio)).exp_()
                context[:, :e].addmm_(dash.t(), vv[s : s + rows])
                context[:, e] += dash.sum(dim=0)
            context[:, :e] += ce * vv.sum(dim=0)
            context[:, e] += n * ce
            correction = ce * context.sum(dim=0)
            for s in range(0, n, rows):
                qc = qq[s : s + rows]
                dash = torch.matmul(qc, proj_t)
                dash.sub_((qc * qc).sum(dim=-1, keepdim=True) * diag_scale + dash.amax(dim=-1, keepdim=True) - log_ratio).exp_()
                num = torch.addmm(correction, dash, context)
                out[bi, s : s + rows, hi] = num[:, :e] / num[:, e:]
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


def prepare_for_speed(model: nn.Module, fast: bool = True, compile_model: bool = False, grad_checkpointing: bool = False) -> nn.Module:
    """Apply the speed options of a run to ``model`` in place (state dict unchanged).

    ``fast``: :class:`FastFavorAttention`; ``compile_model``: ``torch.compile`` the encoder (the first
    batches are slow while it compiles); ``grad_checkpointing``: recompute activations in backward.
    """
    if fast:
        enable_fast_attention(model)
    if compile_model and not hasattr(model.encode, "_torchdynamo_orig_callable"):
        model.encode = torch.compile(model.encode)  # an instance attribute: parameters and keys stay as they are
    if grad_checkpointing:
        model.gradient_checkpointing = True
    return model


def fast_attention_enabled(model: nn.Module) -> bool:
    """Whether any attention module of ``model`` runs the fast path."""
    return any(type(module) is FastFavorAttention for module in model.modules())
