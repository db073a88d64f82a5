"""The first encoder layer's work on unexpressed genes, done once per model instead of per cell."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from model.nn.favor import (
    FastFavorAttention,
    _Consts,
    _exp_from,
    _mm,
    _query_numerators,
    _query_tile,
    _row_scale,
    _shift,
    _weighted_values,
)


class FirstLayerCache:
    """The first encoder layer's work on unexpressed genes, done once per model instead of per cell.

    A cell enters the first layer as ``token_emb[bin] + gene_emb``, and most of its ~17k genes are
    in bin 0 (not expressed). For those rows the LayerNorm, the q/k/v projections, the query
    features and each key's term of the attention context are the same in every cell. The cache
    keeps them (for the model's current weights and product dtype; any change of a weight rebuilds
    it), and per cell only the expressed rows are computed: the key context is the cached sum minus
    the cached terms of the expressed genes plus their real ones (in float32, rescaled to the cell's
    key maximum), and the query features of the other rows are read from the cache. The output is
    the first layer's (attention and feed-forward blocks) to float rounding. Used in eval mode
    without gradients (annotation, embeddings, validation); memory: q, k, v and the query features
    of one cell (~160 MB at the published size in bf16). A cell with more than ``max_expressed`` of
    its genes expressed takes the ordinary path.
    """

    max_expressed = 0.5
    # When the expressed genes hold the cached keys' maximum and the cell's other keys lie this far
    # below it, the subtraction would cost precision: that head's context is then summed directly.
    max_rescale = 8.0

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.state: dict[str, Any] = {}

    @staticmethod
    def _blocks(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(pre-norm attention block, its attention module, feed-forward block) of layer 1."""
        attn_block, ff_block = model.performer.net.layers[0]
        return attn_block, attn_block.fn, ff_block

    def usable(self, model: nn.Module, tokens: Tensor) -> bool:
        """Whether this forward pass of ``model`` can use the cache."""
        if model.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        attn_block, attn, _ = self._blocks(model)
        if type(attn.fast_attention) is not FastFavorAttention or attn.local_attn is not None:
            return False
        # Hooks on these modules (e.g. the attention scores of model.attention) must see whole cells.
        watched = (attn_block, attn_block.norm, attn, attn.to_q, attn.to_k, attn.to_v, attn.to_out, attn.fast_attention)
        if any(m._forward_hooks or m._forward_pre_hooks for m in watched) or nn.modules.module._global_forward_hooks \
                or nn.modules.module._global_forward_pre_hooks:
            return False
        fa = attn.fast_attention
        if fa.causal or fa.no_projection or fa.generalized_attention:
            return False
        return bool(((tokens != 0).sum(dim=1) <= self.max_expressed * tokens.shape[1]).any())

    def _weights_key(self, model: nn.Module, low: torch.dtype) -> tuple[Any, ...]:
        attn_block, attn, _ = self._blocks(model)
        tensors = [model.token_emb.weight, attn_block.norm.weight, attn_block.norm.bias, attn.fast_attention.projection_matrix,
                   *(p for f in (attn.to_q, attn.to_k, attn.to_v) for p in (f.weight, f.bias) if p is not None)]
        if model.pos_emb is not None:
            tensors.append(model.pos_emb.emb.weight)
        return (low, *((t.data_ptr(), t._version) for t in tensors))

    def _qkv(self, model: nn.Module, x: Tensor, low: torch.dtype) -> list[Tensor]:
        """(rows, heads, dim_head) q, k, v in ``low`` of first-layer inputs ``x`` (rows, dim)."""
        attn_block, attn, _ = self._blocks(model)
        h = attn_block.norm(x)
        return [f(h).to(low).view(x.shape[0], attn.heads, f.out_features // attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v)]

    def _build(self, model: nn.Module, n: int, device: torch.device, low: torch.dtype) -> None:
        x = model.token_emb(torch.zeros(n, dtype=torch.long, device=device))
        if model.pos_emb is not None:
            x = x + model.pos_emb(n).to(x.dtype)
        attn = self._blocks(model)[1]
        fa = attn.fast_attention
        c = _Consts(fa.dim_heads, fa.nb_features, 1e-4, None if low == torch.float32 else low)
        proj = (fa.projection_matrix.float() * c.normaliser).t().contiguous()
        proj_low = proj.to(low)
        q, k, v = self._qkv(model, x, low)
        heads = []
        for hi in range(attn.heads):
            kd = torch.matmul(k[:, hi].float(), proj)
            row_max = kd.amax(dim=-1)
            top = row_max.max()
            heads.append({
                "context": torch.matmul(kd.sub_(top).exp_().t(), _weighted_values(k[:, hi], v[:, hi], c)),  # relative to ``top``
                "top": top, "row_max": row_max, "order": row_max.argsort(descending=True), "v_sum": v[:, hi].float().sum(dim=0),
                "query_exp": _query_tile(q[:, hi], proj_low), "query_scale": _row_scale(q[:, hi], c),
            })
        self.state = {"q": q, "k": k, "v": v, "proj": proj, "proj_low": proj_low, "consts": c, "heads": heads, "n": n}

    def first_layer(self, model: nn.Module, tokens: Tensor, x: Tensor) -> Tensor:
        """``x`` (the embedded ``tokens``, batch x genes x dim) after the first encoder layer."""
        attn_block, attn, ff_block = self._blocks(model)
        low = attn.fast_attention.compute_dtype  # the products' dtype the model was configured with
        key = self._weights_key(model, low)
        if key != self.key or self.state.get("n") != tokens.shape[1]:
            self.key, self.state = None, {}
            self._build(model, tokens.shape[1], x.device, low)
            self.key = key
        outs = []
        for b in range(tokens.shape[0]):
            expressed = (tokens[b] != 0).nonzero().squeeze(1)
            if expressed.numel() > self.max_expressed * tokens.shape[1]:
                outs.append(attn_block(x[b : b + 1])[0])
            else:
                outs.append(attn.dropout(attn.to_out(self._heads(model, x[b], expressed, low).flatten(1))))
        x = x + torch.stack(outs)
        return x + ff_block(x)

    def _heads(self, model: nn.Module, x: Tensor, expressed: Tensor, low: torch.dtype) -> Tensor:
        """The attention heads' output (genes, heads, dim_head) of one cell, in ``low``."""
        st = self.state
        c: _Consts = st["consts"]
        n, e = x.shape[0], st["v"].shape[-1]
        qs, ks, vs = self._qkv(model, x[expressed], low)
        with torch.autocast(device_type=x.device.type, enabled=False):
            unexpressed = torch.ones(n, dtype=torch.bool, device=x.device)
            unexpressed[expressed] = False
            out = torch.empty(n, len(st["heads"]), e, dtype=low, device=x.device)
            for hi, hd in enumerate(st["heads"]):
                context = self._key_context(hd, hi, ks[:, hi], vs[:, hi], expressed, unexpressed)
                correction = c.ce * context.sum(dim=-2, keepdim=True)
                cl = context.to(low)
                num = _mm(hd["query_exp"], cl, c).mul_(hd["query_scale"])
                if expressed.numel():
                    num[expressed] = _query_numerators(qs[:, hi], st["proj_low"], cl, c)
                num.add_(correction)
                torch.div(num[:, :e], num[:, e:], out=out[:, hi])
        return out

    def _key_context(self, hd: dict[str, Tensor], hi: int, ks: Tensor, vs: Tensor, expressed: Tensor, unexpressed: Tensor) -> Tensor:
        """The cell's key context (features, dim_head + 1) of head ``hi``, as :func:`_group_context`.

        Its products run in the model's product dtype, like the rest of the network: the cached
        float32 context of the all-unexpressed cell, minus the terms of the genes this cell expresses
        (recomputed from the cache's keys), plus their real terms."""
        st = self.state
        c: _Consts = st["consts"]
        proj = st["proj"] if c.mm_dtype is None else st["proj_low"]
        n, e = unexpressed.shape[0], vs.shape[-1]
        rest = hd["order"][unexpressed[hd["order"]]]  # unexpressed rows, largest key maximum first
        rest_top = hd["row_max"][rest[0]] if rest.numel() else hd["row_max"].new_tensor(-math.inf)
        kd = torch.matmul(ks.to(proj.dtype), proj)
        top = torch.maximum(rest_top, kd.max().float()) if ks.shape[0] else rest_top
        acc = self._terms(kd, ks, vs, top, c)
        k0, v0 = st["k"][:, hi], st["v"][:, hi]
        k0x, v0x = k0[expressed], v0[expressed]  # the cached (unexpressed) keys and values of the genes this cell expresses
        if rest.numel() and float(hd["top"] - rest_top) <= self.max_rescale:
            cached = hd["context"]
            if expressed.numel():
                cached = cached - self._terms(torch.matmul(k0x.to(proj.dtype), proj), k0x, v0x, hd["top"], c)
            acc += cached * torch.exp(hd["top"] - top)
        elif rest.numel():
            k0r = k0[rest]
            acc += self._terms(torch.matmul(k0r.to(proj.dtype), proj), k0r, v0[rest], top, c)
        v_sum = hd["v_sum"] + vs.float().sum(dim=0) - v0x.float().sum(dim=0)
        acc[:, :e] += c.ce * v_sum
        acc[:, e] += n * c.ce
        return acc

    @staticmethod
    def _terms(kd: Tensor, k: Tensor, v: Tensor, top: Tensor, c: _Consts) -> Tensor:
        """``sum_j exp(kd_j - top) [w_j v_j, w_j]`` (features, e + 1) in float32 for the products
        ``kd = k P'`` (in the product dtype, overwritten) of keys ``k`` and values ``v``. The exp is
        taken from a shift that the tile's dtype holds exactly (see :func:`_shift`) and the rest of
        ``top`` applied to the small float32 result, so a bf16 tile loses nothing to the subtraction."""
        ref = _shift(top).to(kd.dtype).float()
        terms = _mm(_exp_from(kd, ref).t(), _weighted_values(k, v, c, kd.dtype), c)
        return terms.mul_(torch.exp(ref - top))
