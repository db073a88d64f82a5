"""A faster, numerically equivalent FAVOR+ attention for the pip ``performer_pytorch`` modules.

``performer_pytorch.FastAttention`` builds its softmax-kernel features by repeating the projection
matrix to (batch, heads, features, dim_head), makes several full passes over the
(batch, heads, seq_len, features) feature tensor (subtract, subtract, exp, add eps, multiply),
finishes with a three-operand einsum, and autograd keeps each of those big tensors for the
backward pass. On a CPU the elementwise passes over ~18 MB per head and cell cost more than the
matrix products. :func:`favor_attention` computes the same function:

* the data normaliser is folded into the (features, dim_head) projection, which is multiplied
  without repeating it;
* the per-row factor ``ratio * exp(-|x|^2 / (2 sqrt(d)))`` of each query and key is taken out of
  the big (genes x features) tiles: for keys it multiplies the values (``[w v, w]``), for queries
  the (genes x dim_head) numerators, so a tile is just ``exp(x P' - max)``, with its largest
  entries (the ones that count) exact to the tile's precision; and where the maximum lies within
  +-EXP_RANGE, a tile is ``exp(x P')`` itself (one in-place exp, no subtraction: same relative
  precision, no overflow or underflow) and ``exp(-max)`` goes into the small per-row factors or
  contexts;
* the ``+ eps`` is never added to the big tensors: its contribution to the key sum, the context
  and the normaliser is added as a rank-one correction on small tensors;
* the work runs one (batch, head) slice and one tile of rows at a time, so the feature tensor
  of a whole cell never exists at once; the key maximum (taken over the whole slice) is kept as a running maximum,
  rescaling what was accumulated whenever it grows, which gives exactly the one-pass result;
* for training, a hand-written backward (:class:`_Favor`) saves only q, k, v and the small
  (features x dim_head) contexts, and recomputes the feature tiles: the memory of attention is
  that of its inputs, and nothing of size genes x genes (or genes x features per head) is kept.

Gradients follow ``performer_pytorch``: the stabilising maxima are constants. With bf16 products
(``compute_dtype``, which the network passes from the precision it was built for) every product
(the feature projections included) takes bf16 operands and the feature tiles are bf16, which
halves their memory traffic (bf16 products run at ~3x the float32 rate on CPUs with AVX512-BF16
or AMX); maxima, per-row factors, normalisers, contexts and their gradients are accumulated in
float32, and q, k, v are kept for the backward pass in bf16.

The class swap keeps every parameter and buffer, so state dicts and checkpoints are unchanged,
and ``isinstance(m, FastAttention)`` still holds (feature redraws keep working).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from performer_pytorch.performer_pytorch import FastAttention

# Elements of one feature tile (4 MB of float32): smaller tiles fit a core's cache but pay more thread
# synchronisation and allocation on a busy machine; larger ones were slower too (BENCHMARKS.md, "Feature tile size").
TILE_ELEMENTS = 1 << 20


class _Consts:
    """The scalars of the softmax kernel for ``d``-dimensional heads and ``m`` features."""

    def __init__(self, d: int, m: int, eps: float, mm_dtype: torch.dtype | None = None) -> None:
        self.mm_dtype = mm_dtype  # bf16: the feature x context products run in bf16 (AMX / tensor cores)
        normaliser = d**-0.25
        self.normaliser = normaliser
        self.diag_scale = normaliser**2 / 2.0
        self.log_ratio = math.log(m**-0.5)
        self.ce = m**-0.5 * eps  # what ``ratio * (exp(.) + eps)`` adds to every feature


def _rows(n: int, m: int, tile: int) -> int:
    """Rows per tile: tiles of at most ~``tile`` features, of equal size."""
    tiles = max(1, math.ceil(n / max(16, tile // m)))
    return math.ceil(n / tiles)


def _grouping(slices: int, n: int, m: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(slices per group, rows per tile). Short sequences or few features: several whole
    (batch, head) slices are batched into one tile, so a small model runs a few batched products
    per layer instead of many tiny ones; long ones: one slice at a time, in row tiles. A tile holds
    the bytes of ``TILE_ELEMENTS`` float32 values (twice as many bf16 ones)."""
    tile = TILE_ELEMENTS * 4 // torch.empty((), dtype=dtype).element_size()
    if n * m * 2 <= tile:
        return max(1, min(slices, tile // (n * m))), n
    return 1, _rows(n, m, tile)


def _addmm_(acc: Tensor, a: Tensor, b: Tensor, c: _Consts) -> None:
    """``acc += a @ b`` in place, for matrices or (group, ., .) stacks (``b`` already in
    ``c.mm_dtype``): fused in float32."""
    if c.mm_dtype is None:
        acc.addmm_(a, b) if acc.dim() == 2 else acc.baddbmm_(a, b)
    else:
        acc += _mm(a, b, c)


def _mm(a: Tensor, b: Tensor, c: _Consts) -> Tensor:
    """``a @ b`` in float32, or from ``c.mm_dtype`` operands (``b`` already converted) with a float32 result."""
    if c.mm_dtype is None:
        return torch.matmul(a, b)
    return torch.matmul(a.to(c.mm_dtype), b).float()


def _row_scale(x: Tensor, c: _Consts) -> Tensor:
    """``ratio * exp(-|x|^2 * diag_scale)`` per row of ``x``, in float32 (..., rows, 1)."""
    sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_()
    return sq.mul_(-c.diag_scale).add_(c.log_ratio).exp_()


def _weighted_values(k: Tensor, v: Tensor, c: _Consts, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[w v, w]`` (rows x (e + 1), computed in float32, stored in ``dtype``) with each key's factor
    ``w = ratio * exp(-|k|^2 s)``."""
    w = _row_scale(k, c)
    out = v.new_empty(*v.shape[:-1], v.shape[-1] + 1, dtype=dtype)
    torch.mul(v, w, out=out[..., :-1])
    out[..., -1:] = w
    return out


# A tile's exp is taken relative to a reference shift ``r`` (0, or its maximum when that lies further
# out): exp(x - r) neither overflows (x - r <= EXP_RANGE) nor loses its largest entries to underflow
# (they stay above exp(-EXP_RANGE)), and is exact to the tile dtype's relative precision, like
# exp(x - max). The maximum the published kernel subtracts is then applied as a factor to the small
# per-row scales or contexts, which saves a pass over every tile (and keeps the result).
EXP_RANGE = 40.0


def _row_max(dash: Tensor) -> Tensor:
    """The float32 maximum of each row (..., rows, 1): on a CPU, converting first is ~2x faster than
    a bf16 row reduction, and the value is the same."""
    if dash.device.type == "cpu":
        return dash.float().amax(dim=-1, keepdim=True)
    return dash.amax(dim=-1, keepdim=True).float()


def _query_tile(x: Tensor, proj_t: Tensor) -> Tensor:
    """``exp(x P' - max)`` with each row's own maximum: the exp part of the query features."""
    dash = torch.matmul(x, proj_t)
    return dash.sub_(_row_max(dash)).exp_()


def _shift(top: Tensor) -> Tensor:
    """The reference shift of tiles with maxima ``top``: 0 where ``|top| <= EXP_RANGE``, else ``top``."""
    return torch.where(top.abs() <= EXP_RANGE, torch.zeros_like(top), top)


def _exp_from(dash: Tensor, shift: Tensor) -> Tensor:
    """``exp(dash - shift)`` in place (``shift`` broadcast to ``dash``); on a CPU no subtraction when
    ``shift`` is all 0 (on a GPU the check would stall the device for each tile, and a subtraction
    costs next to nothing there)."""
    if dash.device.type == "cpu" and not bool(shift.any()):
        return dash.exp_()
    return dash.sub_(shift).exp_()


def _group_context(kk: Tensor, vv: Tensor, proj_t: Tensor, c: _Consts, rows: int) -> tuple[Tensor, Tensor]:
    """``[sum_j phi(k_j) v_j, sum_j phi(k_j)]`` (features, e + 1) of one slice (n, .), or
    (group, features, e + 1) of a stack of slices (group, n, .), eps included, in float32, and the
    key maxima (one per slice) they were computed with.

    ``phi(k_j) = ratio * exp(-|k_j|^2 s) * exp(k_j P' - max)``: the per-key factor goes into the
    values (``[w v, w]``), so the big tile is only ``exp(k P' - r)`` (``r``: :func:`_shift`), in
    ``proj_t``'s dtype, with its largest entries (those that count) exact to that dtype's precision;
    the factor exp(r - max) is applied to the (features, e + 1) sum."""
    n, e, m = kk.shape[-2], vv.shape[-1], proj_t.shape[1]
    vw = _weighted_values(kk, vv, c, proj_t.dtype)
    acc = kk.new_zeros(*kk.shape[:-2], m, e + 1, dtype=torch.float32)
    top: Tensor | None = None
    ref: Tensor | None = None
    for s in range(0, n, rows):
        dash = torch.matmul(kk[..., s : s + rows, :], proj_t)
        # A whole-tensor max() is ~2x faster than amax over the two dimensions on CPUs (the same value).
        tile_top = (dash.max() if dash.dim() == 2 else dash.amax(dim=(-2, -1))).float()
        if top is None or ref is None:
            top, ref = tile_top, _shift(tile_top)
        else:  # a running maximum: when it outgrows the shift, rescale what was accumulated
            top = torch.maximum(top, tile_top)
            moved = torch.where(top - ref > EXP_RANGE, top, ref)
            acc.mul_(torch.exp(ref - moved)[..., None, None])  # a factor of exactly 1 where it did not move
            ref = moved
        _addmm_(acc, _exp_from(dash, ref[..., None, None]).transpose(-1, -2), vw[..., s : s + rows, :], c)
    assert top is not None and ref is not None
    acc.mul_(torch.exp(ref - top)[..., None, None])  # relative to the maximum, as published
    acc[..., :e] += c.ce * vv.sum(dim=-2, keepdim=True, dtype=torch.float32)
    acc[..., e] += n * c.ce
    return acc, top


def _query_numerators(qc: Tensor, proj_t: Tensor, context: Tensor, c: _Consts, correction: Tensor | None = None) -> Tensor:
    """``[phi(q_i) C, phi(q_i) z]`` (float32; the eps term ``correction`` added when given) for a
    tile of queries and a context from :func:`_group_context` (``context`` in ``proj_t``'s dtype).
    The tile is ``exp(q_i P' - r_i)`` (``r_i``: :func:`_shift` of the row maximum), its row factor
    ``ratio * exp(-|q_i|^2 s) * exp(r_i - max_i)``."""
    dash = torch.matmul(qc, proj_t)
    top = _row_max(dash)
    ref = _shift(top)
    scale = _row_scale(qc, c).mul_(torch.exp(ref - top))
    products = torch.matmul(_exp_from(dash, ref), context)  # float32 from float32 operands, else in the products' dtype
    if correction is None:
        return products.float().mul_(scale)
    return torch.addcmul(correction, products, scale)  # one pass, float32


def _group(g0: int, g1: int) -> int | slice:
    """Index of slices ``g0:g1`` of a flattened (b * h, ...) tensor: a single slice as an integer,
    so that it is computed with plain matrix products (as fast as the package's at full size)."""
    return g0 if g1 - g0 == 1 else slice(g0, g1)


def _flat(x: Tensor) -> Tensor:
    """(b, h, n, d) -> (b * h, n, d)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


class _Slices:
    """The (b, h, n, d) tensor ``x`` indexed like its (b * h, n, d) flattening, without the copy that
    flattening a permuted view makes: ``s[i]`` or ``s[i, rows]`` for slice number ``i = bi * h + hi``.
    The q, k, v of a layer are (b, n, h, d) projection outputs seen as (b, h, n, d), so a slice is a
    (n, d) matrix of row stride h * d, which the products take as it is (~4% of a forward pass saved
    at 4,000 genes)."""

    def __init__(self, x: Tensor) -> None:
        self.x, self.h = x, x.shape[1]

    def __getitem__(self, index: int | tuple[int, slice]) -> Tensor:
        i, rows = index if isinstance(index, tuple) else (index, slice(None))
        bi, hi = divmod(i, self.h)
        return self.x[bi, hi, rows]


def _forward(q: Tensor, k: Tensor, v: Tensor, proj_t: Tensor, c: _Consts) -> tuple[Tensor, Tensor, Tensor]:
    """Output (b, h, n, e) as a view of a (b, n, h, e) buffer in ``q``'s dtype, the contexts
    (b, h, m, e + 1) and the key maxima (b, h), both float32.

    ``q``, ``k``, ``v`` and ``proj_t`` are in the dtype of the products: float32, or bf16 (the
    feature tiles are then bf16 too, half the memory traffic)."""
    b, h, n, _ = q.shape
    e, m = v.shape[-1], proj_t.shape[1]
    size, rows = _grouping(b * h, n, m, proj_t.dtype)
    qf, kf, vf = (_Slices(x) if size == 1 else _flat(x) for x in (q, k, v))  # one slice at a time: read in place
    out = q.new_empty(b, n, h, e)
    contexts = q.new_empty(b * h, m, e + 1, dtype=torch.float32)
    tops = q.new_empty(b * h, dtype=torch.float32)
    for g0 in range(0, b * h, size):
        g1 = min(g0 + size, b * h)
        sl = _group(g0, g1)
        context, top = _group_context(kf[sl], vf[sl], proj_t, c, rows)
        contexts[sl], tops[sl] = context, top
        correction = c.ce * context.sum(dim=-2, keepdim=True)
        cl = context.to(proj_t.dtype)
        for s in range(0, n, rows):
            num = _query_numerators(qf[sl, s : s + rows], proj_t, cl, c, correction)
            num = num if num.dim() == 3 else num[None]
            for j in range(g1 - g0):
                bi, hi = divmod(g0 + j, h)
                torch.div(num[j, :, :e], num[j, :, e:], out=out[bi, s : s + rows, hi])
    return out.permute(0, 2, 1, 3), contexts.view(b, h, m, e + 1), tops.view(b, h)


class _Favor(torch.autograd.Function):
    """FAVOR+ attention whose backward recomputes the feature tiles instead of storing them.

    With features ``Qf = s E + ce`` (``s`` the per-row factor ``ratio * exp(-|x|^2 sigma)``, ``E``
    the exp tile of :func:`_group_context` / :func:`_query_numerators`), context
    ``C = Kf^T [V, 1]``, ``[num, den] = Qf C`` and ``out = num / den``, an upstream gradient ``G``
    gives ``[dnum, dden] = [G / den, -sum(G * out) / den]``, ``dQf = [dnum, dden] C^T``,
    ``dC = Qf^T [dnum, dden]``, ``dKf = [V, 1] dC^T``, ``dV = Kf dC[:, :e]``, and through
    ``s E = exp(x P' - |x|^2 sigma - max)``: ``dx = s ((dF * E) P'^T - 2 sigma x rowsum(dF * E))``.

    ``q``, ``k``, ``v`` are saved (and the tiles recomputed) in the dtype of the products: under
    bf16 autocast that halves what attention keeps for the backward pass.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, proj_t: Tensor, eps: float, mm_dtype: torch.dtype | None) -> Tensor:
        c = _Consts(q.shape[-1], proj_t.shape[1], eps, mm_dtype)
        proj_t = proj_t.to(q.dtype)
        out, contexts, tops = _forward(q, k, v, proj_t, c)
        ctx.save_for_backward(q, k, v, proj_t, contexts, tops)
        ctx.consts = c
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return _Favor._backward(ctx, grad_out.float())

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, proj_t, contexts, tops = ctx.saved_tensors
        c: _Consts = ctx.consts
        b, h, n, d = q.shape
        e, m = v.shape[-1], proj_t.shape[1]
        low, proj_back = proj_t.dtype, proj_t.t()
        size, rows = _grouping(b * h, n, m, low)
        qf, kf, vf, gf = _flat(q), _flat(k), _flat(v), _flat(grad_out)
        contexts, tops = contexts.reshape(b * h, m, e + 1), tops.reshape(b * h)
        dq, dk, dv = q.new_empty(b * h, n, d), k.new_empty(b * h, n, d), v.new_empty(b * h, n, e)
        for g0 in range(0, b * h, size):
            g1 = min(g0 + size, b * h)
            sl = _group(g0, g1)
            context = contexts[sl]
            correction = c.ce * context.sum(dim=-2, keepdim=True)
            cl, clt = context.to(low), context.transpose(-1, -2).to(low)
            dcontext = torch.zeros_like(context)
            for s in range(0, n, rows):
                qc = qf[sl, s : s + rows]
                ef = _query_tile(qc, proj_t)
                scale = _row_scale(qc, c)
                num = _mm(ef, cl, c).mul_(scale).add_(correction)
                den = num[..., e:]
                gd = torch.empty_like(num)
                gd[..., :e] = gf[sl, s : s + rows] / den
                gd[..., e:] = -(gd[..., :e] * num[..., :e]).sum(dim=-1, keepdim=True) / den
                _addmm_(dcontext, ef.transpose(-1, -2), (gd * scale).to(low), c)
                dcontext += c.ce * gd.sum(dim=-2, keepdim=True)
                dq[sl, s : s + rows] = _through_features(torch.matmul(gd.to(low), clt).mul_(ef), qc, proj_back, scale, c)
            kk, vv, top = kf[sl], vf[sl], tops[sl][..., None, None].to(low)
            dvs = dcontext[..., :e]
            dvl, dvlt = dvs.to(low), dvs.transpose(-1, -2).to(low)
            dv_eps = c.ce * dvs.sum(dim=-2, keepdim=True)
            dksum = dcontext[..., e].unsqueeze(-2).to(low)
            for s in range(0, n, rows):
                kc = kk[..., s : s + rows, :]
                dash = torch.matmul(kc, proj_t)
                ef = dash.sub_(top).exp_()
                scale = _row_scale(kc, c)
                dv[sl, s : s + rows] = _mm(ef, dvl, c).mul_(scale).add_(dv_eps)
                dkf = torch.matmul(vv[..., s : s + rows, :], dvlt).add_(dksum).mul_(ef)
                dk[sl, s : s + rows] = _through_features(dkf, kc, proj_back, scale, c)
        return dq.view(b, h, n, d), dk.view(b, h, n, d), dv.view(b, h, n, e), None, None, None


def _through_features(grad_e: Tensor, x: Tensor, proj_back: Tensor, scale: Tensor, c: _Consts) -> Tensor:
    """Gradient w.r.t. the tile ``x`` of ``F = scale * E``, ``scale * E = exp(x P' - |x|^2 sigma - const)``,
    given ``grad_e = dF * E`` (float32 result)."""
    rowsum = grad_e.sum(dim=-1, keepdim=True, dtype=torch.float32)
    back = torch.matmul(grad_e, proj_back).float()
    return back.sub_(x.float() * rowsum * (2.0 * c.diag_scale)).mul_(scale)


def _attend_graph(q: Tensor, k: Tensor, v: Tensor, proj_t: Tensor, c: _Consts) -> Tensor:
    """The same attention as plain tensor operations (for ``torch.compile``, which traces it)."""
    n, e = k.shape[-2], v.shape[-1]
    kd = torch.matmul(k, proj_t)
    kf = torch.exp(kd - (k * k).sum(-1, keepdim=True) * c.diag_scale - kd.detach().amax(dim=(-1, -2), keepdim=True) + c.log_ratio)
    context = torch.cat([torch.matmul(kf.transpose(-1, -2), v) + c.ce * v.sum(-2, keepdim=True),
                         (kf.sum(-2) + n * c.ce).unsqueeze(-1)], dim=-1)
    qd = torch.matmul(q, proj_t)
    qf = torch.exp(qd - (q * q).sum(-1, keepdim=True) * c.diag_scale - qd.detach().amax(dim=-1, keepdim=True) + c.log_ratio)
    num = torch.matmul(qf, context) + c.ce * context.sum(-2, keepdim=True)
    return num[..., :e] / num[..., e:]


def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, eps: float = 1e-4,
                    compute_dtype: torch.dtype | None = None) -> Tensor:
    """Non-causal FAVOR+ softmax-kernel attention of (batch, heads, n, d) ``q, k, v``.

    Same result as ``FastAttention.forward`` with its defaults (softmax kernel, non-causal),
    returned in ``q``'s dtype. ``compute_dtype``: ``torch.bfloat16`` for bf16 products (maxima,
    factors, sums and contexts still in float32) or ``torch.float32``; None: bf16 when ``q`` is
    bf16, else float32.
    """
    dtype, dev = q.dtype, q.device.type
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    if compute_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"compute_dtype must be torch.bfloat16 or torch.float32, got {compute_dtype}")
    mm_dtype = torch.bfloat16 if compute_dtype == torch.bfloat16 else None
    with torch.autocast(device_type=dev, enabled=False):
        c = _Consts(q.shape[-1], projection.shape[0], eps, mm_dtype)
        proj_t = (projection.float() * c.normaliser).t().contiguous()
        if torch.compiler.is_compiling():
            out = _attend_graph(q.float(), k.float(), v.float(), proj_t, c)
        elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out = _Favor.apply(q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), proj_t, eps, mm_dtype)
        else:
            out = _forward(q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype), proj_t.to(compute_dtype), c)[0]
    return out.to(dtype)


class FastFavorAttention(FastAttention):
    """``FastAttention`` with :func:`favor_attention` as its forward (other modes unchanged).
    ``compute_dtype`` is the dtype of its products (set by :meth:`model.nn.network.ScBERT.configure`)."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        if self.causal or self.no_projection or self.generalized_attention:
            return super().forward(q, k, v)
        return favor_attention(q, k, v, self.projection_matrix, compute_dtype=self.compute_dtype)


def enable_fast_attention(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Switch every performer ``FastAttention`` in ``model`` to :class:`FastFavorAttention` with
    products in ``compute_dtype``, in place (parameters and buffers unchanged)."""
    for module in model.modules():
        if type(module) in (FastAttention, FastFavorAttention):
            module.__class__ = FastFavorAttention
            module.compute_dtype = compute_dtype
    return model


def disable_fast_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fast_attention`, in place."""
    for module in model.modules():
        if type(module) is FastFavorAttention:
            module.__class__ = FastAttention
            module.__dict__.pop("compute_dtype", None)
    return model
