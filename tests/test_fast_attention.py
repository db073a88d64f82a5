"""The fast FAVOR+ path gives the plain path's outputs and gradients, with unchanged state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
from performer_pytorch.performer_pytorch import FastAttention

from model.nn import favor as fast_module
from model.nn.config import NAIVE, ExecutionOptions, ScBERTConfig
from model.nn.favor import FastFavorAttention, disable_fast_attention, enable_fast_attention, favor_attention
from model.nn.network import ScBERT

KERNEL_ONLY = ExecutionOptions(first_layer_cache=False)


def fast_attention_enabled(model: torch.nn.Module) -> bool:
    return any(type(module) is FastFavorAttention for module in model.modules())


def _pair(head: str = "classifier", n_genes: int = 40) -> tuple[ScBERT, ScBERT]:
    """The plain package model and the same weights with the fast kernel (no first-layer cache)."""
    torch.manual_seed(0)
    cfg = ScBERTConfig(n_genes=n_genes, dim=16, depth=2, heads=2, dim_head=8, head=head,
                       n_classes=3 if head == "classifier" else 0, gene_embedding="learned")
    plain = ScBERT(cfg, options=NAIVE)
    return plain, copy.deepcopy(plain).configure(KERNEL_ONLY)


def test_enable_is_a_class_swap_with_same_state() -> None:
    plain, fast = _pair()
    assert fast_attention_enabled(fast) and not fast_attention_enabled(plain)
    assert fast_attention_enabled(enable_fast_attention(copy.deepcopy(plain)))
    assert plain.state_dict().keys() == fast.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, fast.state_dict()[k])
    disable_fast_attention(fast)
    assert not fast_attention_enabled(fast)


# TILE_ELEMENTS for the three ways slices are computed (41 tokens x 16 features per slice):
# all (batch, head) slices in one group; groups of 3 (4 slices: a last group of 1, plain matrices);
# one slice at a time in row tiles (as at full size: the running key maximum is exercised).
LAYOUTS = {"one group": None, "groups of 3 and 1": 41 * 16 * 3, "row tiles": 16}


@pytest.mark.parametrize("head", ["classifier", "mlm"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_outputs(head: str, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if LAYOUTS[layout] is not None:
        monkeypatch.setattr(fast_module, "TILE_ELEMENTS", LAYOUTS[layout])
    n_genes = 40
    plain, fast = _pair(head, n_genes)
    plain.eval(), fast.eval()
    tokens = torch.randint(0, 7, (3, n_genes + 1))
    with torch.inference_mode():
        torch.testing.assert_close(fast(tokens), plain(tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_gradients(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if LAYOUTS[layout] is not None:
        monkeypatch.setattr(fast_module, "TILE_ELEMENTS", LAYOUTS[layout])
    plain, fast = _pair("mlm")
    plain.train(), fast.train()
    tokens = torch.randint(0, 7, (2, 41))  # 2 cells x 2 heads: 4 slices
    for m in (plain, fast):
        m.performer.proj_updater.feature_redraw_interval = None  # no random redraw between the two
        m(tokens).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_favor_attention_matches_module() -> None:
    torch.manual_seed(1)
    plain, _ = _pair()
    module = plain.performer.net.layers[0][0].fn.fast_attention
    q, k, v = (torch.randn(2, 3, 50, 8) for _ in range(3))
    expected = module(q, k, v)
    torch.testing.assert_close(favor_attention(q, k, v, module.projection_matrix), expected, rtol=1e-4, atol=1e-6)
    module.__class__ = FastFavorAttention
    torch.testing.assert_close(module(q, k, v), expected, rtol=1e-4, atol=1e-6)


def test_tiled_inference_matches_autograd_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 100, 8) for _ in range(3))
    k[0, 0, 90] *= 4  # a late key with a large maximum forces a rescale of what was accumulated
    projection = torch.randn(12, 8)
    with torch.no_grad():
        full = favor_attention(q, k, v, projection)
    monkeypatch.setattr(fast_module, "TILE_ELEMENTS", 16)
    with torch.no_grad():
        tiled = favor_attention(q, k, v, projection)
    q.requires_grad_(True)
    graph = favor_attention(q, k, v, projection)
    torch.testing.assert_close(tiled, graph.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, graph.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile", [None, 16])
def test_tiles_with_maxima_beyond_the_exp_range(tile: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature maxima beyond +-EXP_RANGE take the shifted exp: queries with row maxima near +44 and
    -44, a head whose keys all lie near -44, a head whose late key moves the running maximum by ~44
    (several tiles: the accumulated sum is rescaled); the result stays the package's."""
    torch.manual_seed(3)
    plain, _ = _pair()
    module = plain.performer.net.layers[0][0].fn.fast_attention
    projection = torch.randn(module.nb_features, 8)
    projection[:, 0] += 50.0  # every feature shares one large direction: dash ~ +-44 along it
    module.projection_matrix.copy_(projection)
    q, k, v = (0.3 * torch.randn(2, 2, 60, 8) for _ in range(3))
    q[:, :, ::3, 0] = 1.5
    q[:, :, 1::3, 0] = -1.5
    k[:, 0, :, 0] = -1.5
    k[:, 1, 50, 0] = 1.5
    expected = module(q, k, v)
    if tile:
        monkeypatch.setattr(fast_module, "TILE_ELEMENTS", tile)
    got = favor_attention(q, k, v, module.projection_matrix)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    low = favor_attention(q, k, v, module.projection_matrix, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(low, expected, rtol=0.05, atol=0.02)


def test_gradient_checkpointing_same_gradients() -> None:
    plain, _ = _pair("mlm")
    ckpt = copy.deepcopy(plain).configure(NAIVE.replace(grad_checkpointing=True))
    assert ckpt.gradient_checkpointing
    tokens = torch.randint(0, 7, (2, 41))
    for m in (plain, ckpt):
        m.train()
        m.performer.proj_updater.feature_redraw_interval = None
        torch.manual_seed(3)  # same dropout masks (the checkpoint replays the RNG state)
        m(tokens).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_encoder_same_outputs_and_state() -> None:
    plain, _ = _pair()
    compiled = copy.deepcopy(plain).configure(ExecutionOptions(compile=True))
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, 7, (3, 41))
    with torch.inference_mode():
        torch.testing.assert_close(compiled.eval()(tokens), plain.eval()(tokens), rtol=1e-4, atol=1e-5)


def test_hand_written_backward_matches_autograd_of_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_module, "TILE_ELEMENTS", 16)  # several tiles, with a running-maximum rescale
    torch.manual_seed(4)
    plain, _ = _pair()
    module = plain.performer.net.layers[0][0].fn.fast_attention
    base = [torch.randn(2, 3, 60, 8, dtype=torch.float64) for _ in range(3)]
    base[1][1, 2, 50] *= 4
    grads = []
    for fn in (lambda q, k, v: module(q, k, v), lambda q, k, v: favor_attention(q, k, v, module.projection_matrix)):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        weight = torch.linspace(-1, 1, 8, dtype=torch.float64)
        (fn(q, k, v).double() * weight).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("head", ["classifier", "mlm"])
def test_bf16_autocast_close_to_fp32(head: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the fast path runs (products of features in bf16) and stays close to fp32."""
    monkeypatch.setattr(fast_module, "TILE_ELEMENTS", 16)
    plain, fast = _pair(head)
    fast.configure(KERNEL_ONLY.replace(precision="bf16"))
    plain.eval(), fast.eval()
    tokens = torch.randint(0, 7, (3, 41))
    with torch.inference_mode():
        expected = plain(tokens)
        with _bf16():
            got = fast(tokens)
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_bf16_autocast_gradients_close_to_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_module, "TILE_ELEMENTS", 16)
    plain, fast = _pair("mlm")
    fast.configure(KERNEL_ONLY.replace(precision="bf16"))
    tokens = torch.randint(0, 7, (2, 41))
    for m, ctx in ((plain, None), (fast, _bf16())):
        m.train()
        m.performer.proj_updater.feature_redraw_interval = None
        if ctx is None:
            loss = m(tokens).float().square().mean()
        else:
            with ctx:
                loss = m(tokens).float().square().mean()
        loss.backward()
    compared = 0
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters(), strict=True):
        if a.grad is not None:
            assert b.grad is not None and b.grad.dtype == a.grad.dtype, name
            assert (b.grad - a.grad).norm() <= 0.1 * a.grad.norm() + 1e-6, name
            compared += a.grad.norm() > 0
    # the gradients reach the attention of every layer: a comparison of no gradients would pass too
    attention = [n for n, p in plain.named_parameters() if ".to_q." in n or ".to_k." in n or ".to_v." in n]
    assert len(attention) >= 3 * plain.config.depth
    assert all(dict(plain.named_parameters())[n].grad is not None for n in attention)
    assert compared >= len(attention)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_outputs_and_gradients_in_every_layout(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 kernel (bf16 projections and feature tiles) in every slice layout: outputs and
    gradients of q, k, v close to the float32 kernel's."""
    if LAYOUTS[layout] is not None:
        monkeypatch.setattr(fast_module, "TILE_ELEMENTS", LAYOUTS[layout])
    torch.manual_seed(5)
    projection = torch.randn(16, 8)
    base = [torch.randn(2, 2, 41, 8) for _ in range(3)]
    base[1][1, 0, 30] *= 3  # a late large key: the running maximum grows in the row-tile layout
    weight = torch.linspace(-1, 1, 8)
    results = []
    for ctx in (None, _bf16()):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        if ctx is None:
            out = favor_attention(q, k, v, projection)
        else:
            with ctx:
                out = favor_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), projection)
            assert out.dtype == torch.bfloat16
        (out.float() * weight).sum().backward()
        results.append((out.detach().float(), q.grad, k.grad, v.grad))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert (b - a).norm() <= 0.03 * a.norm(), name


def test_bf16_kernel_at_least_as_accurate_as_the_package_under_autocast() -> None:
    """At a realistic width (64-dim heads, 266 features), the bf16 kernel's error against float32
    is no larger than that of ``performer_pytorch``'s own attention under bf16 autocast."""
    torch.manual_seed(6)
    module = FastAttention(dim_heads=64, nb_features=266)
    q, k, v = (torch.randn(1, 2, 600, 64) for _ in range(3))
    exact = module(q, k, v)
    with _bf16():
        package = module(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
        ours = favor_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), module.projection_matrix).float()
    err_package, err_ours = (package - exact).norm() / exact.norm(), (ours - exact).norm() / exact.norm()
    assert err_ours <= 1.1 * err_package, (err_ours, err_package)
    assert err_ours < 0.02


def _sparse_tokens(n_cells: int, n_genes: int, seed: int = 7) -> torch.Tensor:
    """Tokens with ~70% of genes unexpressed; cell 1 has nothing expressed, cell 2 everything."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 7, (n_cells, n_genes + 1), generator=g)
    tokens[torch.rand(n_cells, n_genes + 1, generator=g) < 0.7] = 0
    tokens[1] = 0
    tokens[2] = torch.randint(1, 7, (n_genes + 1,), generator=g)
    return tokens


@pytest.mark.parametrize("path", ["rescaled", "direct sum"])
def test_first_layer_cache_same_outputs(path: str) -> None:
    """Inference with the cache of unexpressed genes equals the plain package model, in both ways
    of forming a cell's key context; the cache is rebuilt when a weight changes."""
    plain, _ = _pair("classifier", n_genes=60)
    fast = copy.deepcopy(plain).configure(ExecutionOptions())
    assert fast.first_layer_cache is not None
    if path == "direct sum":
        fast.first_layer_cache.max_rescale = -1.0
    plain.eval(), fast.eval()
    tokens = _sparse_tokens(4, 60)
    with torch.inference_mode():
        torch.testing.assert_close(fast(tokens), plain(tokens), rtol=1e-4, atol=1e-5)
        assert fast.first_layer_cache.key is not None
        key = fast.first_layer_cache.key
        for m in (plain, fast):
            m.performer.net.layers[0][0].fn.to_k.weight.mul_(1.5)
        torch.testing.assert_close(fast(tokens), plain(tokens), rtol=1e-4, atol=1e-5)
        assert fast.first_layer_cache.key != key
        fast.configure(fast.options.replace(precision="bf16"))
        with _bf16():
            got = fast(tokens).float()
    torch.testing.assert_close(got, plain(tokens).detach(), rtol=0.05, atol=0.05)


def test_first_layer_cache_not_used_in_training_or_with_gradients() -> None:
    _, fast = _pair("classifier", n_genes=60)
    fast.configure(ExecutionOptions())
    tokens = _sparse_tokens(3, 60)
    fast.train()
    fast(tokens).sum().backward()
    assert fast.first_layer_cache.key is None
    fast.eval()
    fast(tokens)  # gradients enabled
    assert fast.first_layer_cache.key is None
    with torch.no_grad():
        fast(tokens)
    assert fast.first_layer_cache.key is not None


def test_first_layer_cache_steps_aside_for_hooks() -> None:
    """Attention scores hook the q/k projections of a layer: with hooks on the first layer the
    cache is not used, so the hooks see whole cells and the scores are those of the plain model."""
    from model.attention.scores import attention_received

    plain, _ = _pair("classifier", n_genes=60)
    fast = copy.deepcopy(plain).configure(ExecutionOptions())
    plain.eval(), fast.eval()
    tokens = _sparse_tokens(4, 60)
    for layer, cache_used in ((0, False), (-1, True)):
        torch.testing.assert_close(attention_received(fast, tokens, layer=layer), attention_received(plain, tokens, layer=layer),
                                   rtol=1e-4, atol=1e-5)
        assert (fast.first_layer_cache.key is not None) == cache_used


def test_inference_batch_size_keeps_a_cpu_batch_in_the_caches() -> None:
    from model.runtime import inference_batch_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert inference_batch_size(4001, 200, cpu) == 2  # the published width at 4,000 genes: the fastest measured
    assert inference_batch_size(16907, 200, cpu) == 1
    assert inference_batch_size(201, 16, cpu) == 16  # small models: the old default
    assert inference_batch_size(16907, 200, gpu) == 16
