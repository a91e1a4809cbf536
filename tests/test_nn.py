"""Invariants of the building blocks: SDPA equals eager, the KV cache equals no cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.nn import (
    MLP,
    Attention,
    Block,
    KVCache,
    RMSNorm,
    SplitLinear,
    column_major_,
    fbgemm_half,
    one_row_layout_,
    quick_gelu,
    split_linear,
)
from polymodal.nn.layout import is_packed_half

torch.manual_seed(0)


def naive_attention(att: Attention, x, context=None, causal=False, key_mask=None):
    """softmax(QK^T/sqrt(d))V per head with explicit loops, from the module's weights."""
    H, d = att.heads, att.head_dim
    if att.cross:
        q = att.q(x)
        k, v = att.kv(context).chunk(2, dim=-1)
    else:
        q, k, v = att.qkv(x).split([H * d, att.kv_heads * d, att.kv_heads * d], dim=-1)
    B, T, _ = q.shape
    S = k.shape[1]
    out = torch.zeros(B, T, H * d)
    group = H // att.kv_heads
    for b in range(B):
        for h in range(H):
            kh = h // group
            qh, khh, vh = q[b, :, h * d:(h + 1) * d], k[b, :, kh * d:(kh + 1) * d], v[b, :, kh * d:(kh + 1) * d]
            s = qh @ khh.T / math.sqrt(d)
            if causal:
                s = s.masked_fill(torch.ones(T, S).tril() == 0, float("-inf"))
            if key_mask is not None:
                s = s.masked_fill(~key_mask[b][None, :], float("-inf"))
            out[b, :, h * d:(h + 1) * d] = s.softmax(-1) @ vh
    return att.out(out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_self_attention_sdpa_eager_and_naive_agree(causal, kv_heads):
    att = Attention(32, 4, kv_heads=kv_heads)
    x = torch.randn(2, 7, 32)
    fast = att(x, causal=causal)
    eager = att(x, causal=causal, eager=True)
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, naive_attention(att, x, causal=causal), atol=1e-5, rtol=0)


def test_cross_attention_and_key_mask():
    att = Attention(32, 4, context_dim=24, cross=True)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    mask = keep[:, None, None, :]
    fast = att(x, ctx, mask=mask)
    torch.testing.assert_close(fast, att(x, ctx, mask=mask, eager=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, naive_attention(att, x, ctx, key_mask=keep), atol=1e-5, rtol=0)
    # masked keys really are ignored: changing them changes nothing
    ctx2 = ctx.clone()
    ctx2[1, 6:] = torch.randn(3, 24)
    torch.testing.assert_close(att(x, ctx2, mask=mask), fast, atol=1e-6, rtol=0)


def test_cross_attention_needs_context():
    att = Attention(16, 2, cross=True)
    with pytest.raises(ValueError, match="context"):
        att(torch.randn(1, 3, 16))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cache_equals_full_causal_pass(kv_heads):
    block = Block(32, 4, 64, act="swiglu", norm="rms", kv_heads=kv_heads)
    x = torch.randn(2, 10, 32)
    full = block(x, causal=True)
    cache = KVCache(layers=1, batch=2, kv_heads=kv_heads, max_len=16, head_dim=8)
    parts = [block(x[:, :4], causal=True, cache=cache)]  # a 4-token prompt, then one token at a time
    parts += [block(x[:, t:t + 1], causal=True, cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length(0) == 10
    # a chunk of several new tokens after a cached prefix (the mask must be offset)
    cache2 = KVCache(layers=1, batch=2, kv_heads=kv_heads, max_len=16, head_dim=8)
    chunked = torch.cat([block(x[:, :3], causal=True, cache=cache2), block(x[:, 3:], causal=True, cache=cache2)], 1)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)


def test_cached_decoder_with_cross_attention_projects_the_context_once():
    block = Block(32, 4, 64, act="gelu", norm="layer", cross_dim=24)
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 9, 24)
    full = block(x, ctx, causal=True)
    cache = KVCache(layers=1, batch=2, kv_heads=4, max_len=8, head_dim=8)
    calls = []
    block.xattn.kv.register_forward_hook(lambda *_: calls.append(1))
    parts = [block(x[:, :2], ctx, causal=True, cache=cache)]
    parts += [block(x[:, t:t + 1], ctx, causal=True, cache=cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert len(calls) == 1 and cache.length(0) == 6  # the context went in once; the self-attention cache grew
    k, v = cache.context[0][1:]
    assert k.shape == v.shape == (2, 4, 9, 8) and k.is_contiguous() and v.is_contiguous()
    other = torch.randn(2, 9, 24)  # another context tensor is projected anew, not mistaken for the first
    y = block(x[:, :1], other, causal=True, cache=KVCache(layers=1, batch=2, kv_heads=4, max_len=8, head_dim=8))
    assert len(calls) == 2
    torch.testing.assert_close(y, block(x[:, :1], other, causal=True), atol=1e-5, rtol=0)


def test_column_major_keeps_values_and_shapes():
    block = Block(32, 4, 64, act="gelu", norm="layer", cross_dim=24)
    head = torch.nn.Parameter(torch.randn(50, 32))
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    y = F.linear(block(x, ctx), head)
    assert column_major_(block, head) is block
    for name, w in block.state_dict().items():
        assert torch.equal(w, before[name]) and w.shape == before[name].shape, name
        if w.dim() == 2:
            assert w.t().is_contiguous() and not w.is_contiguous(), name
    assert head.t().is_contiguous()
    torch.testing.assert_close(F.linear(block(x, ctx), head), y, atol=1e-5, rtol=0)


def test_one_row_layout_splits_widening_linears_and_keeps_outputs():
    block = Block(32, 4, 64, act="gelu", norm="layer", cross_dim=24)
    head = torch.nn.Parameter(torch.randn(50, 32))
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    y, y1 = F.linear(block(x, ctx), head), F.linear(block(x[:, :1], ctx), head)  # y1: one token, as a decoder step
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # split_linear reads two blocks on two threads
    try:
        column_major_(block)  # laid out the older way first: the narrowing Linear goes back to row-major
        assert one_row_layout_(block, head) is block
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                widening = m.out_features >= m.in_features
                assert isinstance(m, SplitLinear) == widening and m.weight.t().is_contiguous() == widening
        assert type(block.mlp.down) is torch.nn.Linear and block.mlp.down.weight.is_contiguous()  # 64 -> 32 stays
        for name, w in block.state_dict().items():
            assert torch.equal(w, before[name]), name
        assert head.t().is_contiguous()
        with torch.no_grad():  # the split products (the views kept between calls)
            torch.testing.assert_close(F.linear(block(x, ctx), head), y, atol=1e-5, rtol=0)
            torch.testing.assert_close(F.linear(block(x[:, :1], ctx), head), y1, atol=1e-5, rtol=0)
        F.linear(block(x, ctx), head).sum().backward()  # with gradients: plain Linears, which train
        assert all(p.grad is not None for p in block.parameters())
        with torch.no_grad():
            torch.testing.assert_close(split_linear(x, head, 2), F.linear(x, head), atol=1e-5, rtol=0)
        odd = torch.randn(51, 32).t().contiguous().t()  # 51 columns do not split in two: one product
        torch.testing.assert_close(split_linear(x, odd, 2), F.linear(x, odd), atol=0, rtol=0)
    finally:
        torch.set_num_threads(threads)


def test_kv_cache_overflow_is_an_error():
    cache = KVCache(layers=1, batch=1, kv_heads=1, max_len=4, head_dim=2)
    cache.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="full"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_causal_attention_does_not_see_the_future():
    att = Attention(16, 2)
    x = torch.randn(1, 6, 16)
    y = att(x, causal=True)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(att(x2, causal=True)[:, :4], y[:, :4])
    assert not torch.allclose(att(x2, causal=True)[:, 4:], y[:, 4:])


@pytest.mark.parametrize("act,ref", [
    ("gelu", F.gelu), ("relu", F.relu), ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
])
def test_mlp_activations(act, ref):
    mlp = MLP(8, 16, act)
    x = torch.randn(3, 8)
    torch.testing.assert_close(mlp(x), mlp.down(ref(mlp.up(x))))


def test_swiglu_is_gated():
    mlp = MLP(8, 16, "swiglu")
    assert mlp.up.out_features == 32
    x = torch.randn(3, 8)
    gate, up = mlp.up(x).chunk(2, -1)
    torch.testing.assert_close(mlp(x), mlp.down(F.silu(gate) * up))
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(8, 16, "tanhh")


def test_quick_gelu_is_close_to_gelu():
    x = torch.linspace(-4, 4, 101)
    assert (quick_gelu(x) - F.gelu(x)).abs().max() < 0.03


def test_rmsnorm():
    n = RMSNorm(6, eps=1e-6)
    x = torch.randn(2, 6)
    torch.testing.assert_close(n(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_pre_and_post_norm_blocks_with_cross_attention():
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 3, 16)
    for pre in (True, False):
        b = Block(32, 4, 64, pre_norm=pre, cross_dim=16)
        y = b(x, ctx)
        assert y.shape == x.shape
        torch.testing.assert_close(y, b(x, ctx, eager=True), atol=1e-5, rtol=0)
        assert not torch.allclose(y, b(x)), "cross-attention must change the output"
    # post-norm ends in a LayerNorm: every token has zero mean, unit variance
    y = Block(32, 4, 64, pre_norm=False)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_float16_packs_only_for_float16_values_and_never_stale():
    if not fbgemm_half():
        pytest.skip("no FBGEMM in this torch build")
    torch.manual_seed(0)
    block = Block(32, 4, 64, act="gelu", norm="layer", cross_dim=24)
    with torch.no_grad():  # float16 values everywhere but the MLP's up-projection
        for name, p in block.named_parameters():
            p.copy_(p.half().float() if not name.startswith("mlp.up") else p)
    head = torch.nn.Parameter(torch.randn(50, 32).half().float())
    x, ctx = torch.randn(1, 1, 32), torch.randn(1, 9, 24)
    with torch.no_grad():
        y = F.linear(block(x, ctx), head)
        one_row_layout_(block, head, half=True)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert {n for n, m in linears.items() if is_packed_half(m.weight)} == set(linears) - {"mlp.up"}
        assert is_packed_half(head) and not is_packed_half(block.mlp.up.weight)
        torch.testing.assert_close(split_linear(block(x, ctx), head), y, atol=1e-5, rtol=0)
        block.mlp.down.weight.mul_(2)  # changed in place: the pack is stale, the new weight counts
        assert not is_packed_half(block.mlp.down.weight)
        down = block.mlp.down
        h = torch.randn(1, 1, 64)
        torch.testing.assert_close(down(h), F.linear(h, down.weight, down.bias), atol=1e-6, rtol=0)
    F.linear(block(x, ctx), head).sum().backward()  # with gradients: plain Linears, which train
    assert all(p.grad is not None for p in block.parameters())
