"""KV-cached decoding equals recomputing the prefix; the sliding window keeps what it should.

Cache semantics tested here: a clean block's keys/values are computed once, when the block is written,
with the context the cache held at that moment, and never recomputed. Hence after eviction the
queries attend to kept keys that (from layer 2 on) still carry information from evicted tokens: the
result is NOT a plain forward over the kept tokens, except for a 1-layer model, whose keys depend only
on the token and its position. The exact multi-layer reference is a full forward over every token
ever written, where each block sees the window the cache held when that block was computed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.masks import AttentionMask
from pipeline.model.transformer import apply_rope
from tests.pipeline.model.helpers import noised, random_tokens, tiny_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=21)


@pytest.mark.parametrize("bs,lookahead", [(4, None), (1, None), (8, None), (4, 1)])
def test_block_decoding_with_cache_equals_recomputing_prefix(model, bs, lookahead):
    n_blocks, B = 4, 2
    x0 = random_tokens(B, n_blocks * bs, seed=1)
    decode = AttentionMask("bd3_decode", bs, lookahead)
    reference = AttentionMask("block_causal", bs, lookahead)
    cache = model.new_kv_cache(B, n_blocks * bs)
    for b in range(n_blocks):
        s, e = b * bs, (b + 1) * bs
        xt = noised(x0[:, s:e], 0.6, seed=b)
        with torch.no_grad():
            cached = model(xt, attn=decode, kv_cache=cache)
            recomputed = model(torch.cat([x0[:, :s], xt], dim=1), attn=reference)[:, s:]
        torch.testing.assert_close(cached, recomputed, rtol=0, atol=ATOL)
        assert cache.length == s and cache.next_position == s  # write_cache=False leaves it as is

        with torch.no_grad():
            written = model(x0[:, s:e], attn=decode, kv_cache=cache, write_cache=True)
            clean_ref = model(x0[:, :e], attn=reference)[:, s:]
        torch.testing.assert_close(written, clean_ref, rtol=0, atol=ATOL)
        assert cache.length == e and cache.next_position == e


def test_peeking_does_not_modify_the_cache(model):
    cache = model.new_kv_cache(1, 16)
    decode = AttentionMask("bd3_decode", 4)
    with torch.no_grad():
        model(random_tokens(1, 4, seed=2), attn=decode, kv_cache=cache, write_cache=True)
        k, v = cache.get(0)
        k, v = k.clone(), v.clone()
        before = model(random_tokens(1, 4, seed=5), attn=decode, kv_cache=cache)
        model(random_tokens(1, 4, seed=3), attn=decode, kv_cache=cache)
        after = model(random_tokens(1, 4, seed=5), attn=decode, kv_cache=cache)
    assert cache.length == 4 and cache.next_position == 4
    assert torch.equal(cache.get(0)[0], k) and torch.equal(cache.get(0)[1], v)
    assert torch.equal(before, after)


def test_ar_decoding_with_cache_equals_causal_forward(model):
    B, L, prompt = 2, 20, 5
    ids = random_tokens(B, L, seed=4)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(B, L)
        steps = [model(ids[:, :prompt], kv_cache=cache, write_cache=True)]
        steps.append(model(ids[:, prompt : prompt + 3], kv_cache=cache, write_cache=True))  # a chunk
        for t in range(prompt + 3, L):
            steps.append(model(ids[:, t : t + 1], kv_cache=cache, write_cache=True))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=ATOL)
    assert cache.length == L == cache.next_position


def test_cache_rejects_what_it_cannot_do(model):
    cache = model.new_kv_cache(1, 8)
    with pytest.raises(ValueError, match="KV cache"):
        model(random_tokens(1, 4), attn=AttentionMask("block_causal", 4), kv_cache=cache)
    with torch.no_grad():
        model(random_tokens(1, 8), attn=AttentionMask("bd3_decode", 4), kv_cache=cache, write_cache=True)
    with pytest.raises(ValueError, match="make_room"):
        model(random_tokens(1, 4), attn=AttentionMask("bd3_decode", 4), kv_cache=cache, write_cache=True)
    assert cache.length == 8  # the failed write staged nothing
    with pytest.raises(ValueError, match="capacity"):
        cache.make_room(9)


def reference_forward(model, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor):
    """The model's layers with an arbitrary (T, T) boolean attention mask; logits (B, T, V)."""
    c = model.config
    B, T = ids.shape
    cos, sin = model.rope(positions[None].expand(B, -1))
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + a.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


def _sliding_decode(model, x0, xt, bs, capacity):
    """Write the clean blocks of x0 into a window of ``capacity`` tokens; after each write, peek at the
    noisy next block. Returns the peeks and, per step, the absolute index range the cache held."""
    cache = model.new_kv_cache(x0.shape[0], capacity)
    decode = AttentionMask("bd3_decode", bs)
    peeks, windows = [], []
    for b in range(x0.shape[1] // bs):
        cache.make_room(bs)
        start = cache.next_position - cache.length
        assert cache.evicted == start  # evicted tokens are exactly the oldest ones
        with torch.no_grad():
            peeks.append(model(xt[:, b * bs : (b + 1) * bs], attn=decode, kv_cache=cache))
            model(x0[:, b * bs : (b + 1) * bs], attn=decode, kv_cache=cache, write_cache=True)
        windows.append((start, b * bs))
        assert cache.next_position == (b + 1) * bs  # positions keep increasing past the capacity
        assert cache.length == min((b + 1) * bs, capacity)
    return peeks, windows


@pytest.mark.parametrize("capacity", [8, 10])
def test_sliding_window_one_layer_equals_forward_over_kept_tokens(capacity):
    # One layer: cached keys depend only on (token, position), so after eviction the noisy block
    # sees exactly a forward over the kept tokens at their absolute positions.
    model = tiny_model(seed=22, num_hidden_layers=1)
    bs, n_blocks = 4, 6
    x0 = random_tokens(2, bs * n_blocks, seed=5)
    xt = noised(x0, 0.5, seed=6)
    peeks, windows = _sliding_decode(model, x0, xt, bs, capacity)
    mask = AttentionMask("block_causal", bs)
    for b, (peek, (start, end)) in enumerate(zip(peeks, windows)):
        ids = torch.cat([x0[:, start:end], xt[:, b * bs : (b + 1) * bs]], dim=1)
        positions = torch.arange(start, end + bs)
        if (end - start) % bs:
            # The window starts mid-block: the kept partial block is still context, not a block.
            n = end - start
            allowed = torch.ones(n + bs, n + bs, dtype=torch.bool)
            allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            allowed[:n, n:] = False
            with torch.no_grad():
                ref = reference_forward(model, ids, positions, allowed)[:, -bs:]
        else:
            with torch.no_grad():
                ref = model(ids, attn=mask, positions=positions)[:, -bs:]
        torch.testing.assert_close(peek, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("capacity", [8, 10])
def test_sliding_window_equals_windowed_history_reference(model, capacity):
    bs, n_blocks = 4, 6
    L = bs * n_blocks
    x0 = random_tokens(2, L, seed=7)
    xt = noised(x0, 0.5, seed=8)
    peeks, windows = _sliding_decode(model, x0, xt, bs, capacity)

    # Every clean block b saw the window (start_b, b*bs) plus itself when it was written.
    clean_allowed = torch.zeros(L, L, dtype=torch.bool)
    for start, end in windows:
        clean_allowed[end : end + bs, start : end + bs] = True
    for b, (peek, (start, end)) in enumerate(zip(peeks, windows)):
        T = end + bs  # history of clean tokens, then the noisy block
        allowed = torch.zeros(T, T, dtype=torch.bool)
        allowed[:end, :end] = clean_allowed[:end, :end]
        allowed[end:, start:] = True
        ids = torch.cat([x0[:, :end], xt[:, end:T]], dim=1)
        with torch.no_grad():
            ref = reference_forward(model, ids, torch.arange(T), allowed)[:, end:]
        torch.testing.assert_close(peek, ref, rtol=0, atol=ATOL)
        if start > 0 and b == len(windows) - 1:
            # ... which is not a plain forward over the kept tokens: their keys remember evicted ones.
            with torch.no_grad():
                naive = model(
                    ids[:, start:], attn=AttentionMask("block_causal", bs), positions=torch.arange(start, T)
                )[:, -bs:]
            assert (naive - peek).abs().max() > 1e-3


def test_reference_forward_is_the_model(model):
    # Guards the reference used above: with the block-causal mask it reproduces the model.
    ids = random_tokens(2, 12, seed=9)
    from pipeline.model.masks import dense_mask

    allowed = dense_mask(AttentionMask("block_causal", 4), 12, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            reference_forward(model, ids, torch.arange(12), allowed),
            model(ids, attn=AttentionMask("block_causal", 4)),
            rtol=0,
            atol=ATOL,
        )


def test_ar_sliding_window_one_layer_equals_forward_over_kept_tokens():
    model = tiny_model(seed=23, num_hidden_layers=1)
    capacity, L = 6, 16
    ids = random_tokens(1, L, seed=10)
    cache = model.new_kv_cache(1, capacity)
    for t in range(L):
        cache.make_room(1)
        start = t - cache.length
        with torch.no_grad():
            step = model(ids[:, t : t + 1], kv_cache=cache, write_cache=True)
            ref = model(ids[:, start : t + 1], positions=torch.arange(start, t + 1))[:, -1:]
        torch.testing.assert_close(step, ref, rtol=0, atol=ATOL)
    assert cache.evicted == L - capacity and cache.next_position == L


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cached_decoding_under_bf16_autocast(backend):
    # Sampling inside a bf16 autocast region (e.g. an eval callback of a bf16 run) with the default cache.
    model = tiny_model(seed=24, attn_backend=backend)
    bs = 4
    x0 = random_tokens(1, 2 * bs, seed=11)
    xt = noised(random_tokens(1, bs, seed=12))
    decode = AttentionMask("bd3_decode", bs)
    cache = model.new_kv_cache(1, 4 * bs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in (0, bs):
            model(x0[:, i : i + bs], attn=decode, kv_cache=cache, write_cache=True)
        cached = model(xt, attn=decode, kv_cache=cache).float()
        ref = model(torch.cat([x0, xt], dim=1), attn=AttentionMask("block_causal", bs))[:, -bs:].float()
    torch.testing.assert_close(cached, ref, rtol=0.05, atol=0.3)
