"""Attention masks against element-wise references written from DESIGN.md section 2 with plain loops.

Annealing (``lookahead``) restricts every same-block pair, in both halves: key k of q's own block is
visible iff pos(k) - pos(q) <= lookahead. That is what makes the vectorized bd3_train forward equal
the per-block loop run with ``block_causal`` and the same lookahead, and the decoder's cache writes.
"""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.model.masks import (
    AttentionMask,
    check_block_size,
    dense_mask,
    document_ids,
    mask_predicate,
)

# (L, L') pairs: L'=1 (AR), L'=L (MDLM), and in between.
SIZES = [(8, 1), (8, 2), (12, 4), (16, 4), (16, 8), (8, 8), (1, 1)]


def _in_block(qpos: int, kpos: int, lookahead: int | None) -> bool:
    return lookahead is None or kpos - qpos <= lookahead


def ref_bd3_train(L: int, bs: int, lookahead: int | None = None) -> torch.Tensor:
    """The OR of block-diagonal, offset block-causal and block-causal over concat(x_t, x_0)."""
    out = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_clean, k_clean = q >= L, k >= L
            qpos, kpos = q % L, k % L
            qb, kb = qpos // bs, kpos // bs
            block_diagonal = q_clean == k_clean and qb == kb and _in_block(qpos, kpos, lookahead)
            offset_block_causal = not q_clean and k_clean and kb < qb
            block_causal = (
                q_clean and k_clean and (kb < qb or (kb == qb and _in_block(qpos, kpos, lookahead)))
            )
            out[q, k] = block_diagonal or offset_block_causal or block_causal
    return out


def ref_block_causal(L: int, bs: int, lookahead: int | None = None) -> torch.Tensor:
    out = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            out[q, k] = k // bs < q // bs or (k // bs == q // bs and _in_block(q, k, lookahead))
    return out


def ref_causal(n_queries: int, cache_len: int = 0) -> torch.Tensor:
    out = torch.zeros(n_queries, cache_len + n_queries, dtype=torch.bool)
    for q in range(n_queries):
        for k in range(cache_len + n_queries):
            out[q, k] = k <= cache_len + q
    return out


def ref_bd3_decode(n_queries: int, cache_len: int, lookahead: int | None = None) -> torch.Tensor:
    out = torch.zeros(n_queries, cache_len + n_queries, dtype=torch.bool)
    for q in range(n_queries):
        for k in range(cache_len + n_queries):
            out[q, k] = k < cache_len or _in_block(q, k - cache_len, lookahead)
    return out


def _dense(kind, L, bs=1, lookahead=None, cache_len=0, n_queries=None):
    mask = AttentionMask(kind, bs, lookahead, cache_len)
    n_q = n_queries if n_queries is not None else (2 * L if kind == "bd3_train" else L)
    n_k = cache_len + n_q
    return dense_mask(mask, n_q, n_k, L)


@pytest.mark.parametrize("L,bs", SIZES)
def test_bd3_train_matches_definition(L, bs):
    assert torch.equal(_dense("bd3_train", L, bs), ref_bd3_train(L, bs))


@pytest.mark.parametrize("L,bs", SIZES)
def test_bd3_train_clean_half_never_sees_noisy_half(L, bs):
    m = _dense("bd3_train", L, bs)
    assert not m[L:, :L].any()
    # ... and a noisy block never sees its own clean block or later ones.
    for q in range(L):
        for k in range(L):
            if k // bs >= q // bs:
                assert not m[q, L + k]


@pytest.mark.parametrize("L", [1, 4, 8, 12])
def test_bd3_train_block_size_one_clean_half_is_causal(L):
    m = _dense("bd3_train", L, 1)
    assert torch.equal(m[L:, L:], ref_causal(L))
    # x_t token l sees itself and x_0 tokens < l: exactly the AR conditioning.
    expected = torch.zeros(L, L, dtype=torch.bool).fill_diagonal_(True)
    assert torch.equal(m[:L, :L], expected)
    assert torch.equal(m[:L, L:], torch.ones(L, L, dtype=torch.bool).tril(-1))


@pytest.mark.parametrize("L", [4, 8])
def test_bd3_train_block_size_L_is_mdlm_plus_clean_copy(L):
    m = _dense("bd3_train", L, L)
    assert m[:L, :L].all() and m[L:, L:].all()
    assert not m[:L, L:].any() and not m[L:, :L].any()


@pytest.mark.parametrize("L,bs", [(8, 2), (12, 4), (16, 8), (8, 8)])
@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_bd3_train_annealing_matches_definition(L, bs, lookahead):
    assert torch.equal(_dense("bd3_train", L, bs, lookahead), ref_bd3_train(L, bs, lookahead))


@pytest.mark.parametrize("L,bs", [(8, 2), (12, 4), (16, 8), (8, 8)])
def test_annealing_endpoints(L, bs):
    # lookahead 0: causal inside every block, so the clean half is exactly the AR mask ...
    causal = _dense("bd3_train", L, bs, lookahead=0)
    assert torch.equal(causal[L:, L:], ref_causal(L))
    assert torch.equal(_dense("block_causal", L, bs, lookahead=0), ref_causal(L))
    # ... lookahead L'-1 (or more): the fully bidirectional block, same as no annealing.
    for kind in ("bd3_train", "block_causal"):
        full = _dense(kind, L, bs)
        assert torch.equal(_dense(kind, L, bs, lookahead=bs - 1), full)
        assert torch.equal(_dense(kind, L, bs, lookahead=bs + 3), full)
    assert AttentionMask("bd3_train", bs, bs - 1).bidirectional_in_block
    assert not AttentionMask("bd3_train", bs, bs - 2).bidirectional_in_block


@pytest.mark.parametrize("L,bs", SIZES)
@pytest.mark.parametrize("lookahead", [None, 0, 1])
def test_block_causal_matches_definition(L, bs, lookahead):
    assert torch.equal(_dense("block_causal", L, bs, lookahead), ref_block_causal(L, bs, lookahead))


@pytest.mark.parametrize("L", [1, 5, 16])
def test_ar_is_causal(L):
    assert torch.equal(_dense("ar", L), ref_causal(L))


@pytest.mark.parametrize("n_queries,cache_len", [(1, 0), (1, 7), (4, 9), (3, 3)])
def test_ar_with_cache_sees_whole_cache(n_queries, cache_len):
    m = _dense("ar", n_queries, cache_len=cache_len, n_queries=n_queries)
    assert torch.equal(m, ref_causal(n_queries, cache_len))


@pytest.mark.parametrize("L", [1, 6, 16])
@pytest.mark.parametrize("lookahead", [None, 0, 2])
def test_mdlm_is_one_block_of_length_L(L, lookahead):
    m = _dense("mdlm", L, lookahead=lookahead)
    if lookahead is None:
        assert m.all()
    assert torch.equal(m, ref_block_causal(L, L, lookahead))


@pytest.mark.parametrize("n_queries,cache_len", [(1, 0), (4, 0), (4, 8), (8, 5)])
@pytest.mark.parametrize("lookahead", [None, 0, 1])
def test_bd3_decode_matches_definition(n_queries, cache_len, lookahead):
    m = _dense("bd3_decode", n_queries, n_queries, lookahead, cache_len, n_queries)
    assert torch.equal(m, ref_bd3_decode(n_queries, cache_len, lookahead))


@pytest.mark.parametrize("L,bs", [(8, 2), (12, 4), (16, 8)])
def test_bd3_decode_rows_equal_last_block_of_block_causal(L, bs):
    # Decoding the last block against a cache of the L - L' earlier tokens is the no-cache reference's
    # last block rows.
    ref = _dense("block_causal", L, bs)[-bs:]
    assert torch.equal(_dense("bd3_decode", bs, bs, cache_len=L - bs, n_queries=bs), ref)


def test_predicate_on_scalar_indices_matches_dense():
    # FlexAttention calls the predicate with 0-dim index tensors (its mask_mod).
    L, bs = 8, 2
    cases = [
        (AttentionMask("bd3_train", bs), 2 * L, 2 * L),
        (AttentionMask("block_causal", bs, 0), L, L),
        (AttentionMask("bd3_decode", bs, 1, cache_len=6), bs, 6 + bs),
    ]
    for mask, n_q, n_k in cases:
        pred = mask_predicate(mask, L)
        dense = dense_mask(mask, n_q, n_k, L)
        for q in range(n_q):
            for k in range(n_k):
                assert bool(pred(torch.tensor(q), torch.tensor(k))) == bool(dense[q, k])


def test_attention_mask_validates():
    with pytest.raises(ValueError, match="kind"):
        AttentionMask("causal")
    with pytest.raises(ValueError, match="block_size"):
        AttentionMask("bd3_train", 0)
    with pytest.raises(ValueError, match="lookahead"):
        AttentionMask("bd3_train", 4, -1)
    assert hash(AttentionMask("bd3_train", 4)) == hash(AttentionMask("bd3_train", 4))


def test_document_ids_from_starts():
    starts = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 1, 1, 1, 1, 1, 2]])
    assert torch.equal(document_ids(starts), expected)
    assert starts[0, 0]  # the input is not modified in place


@pytest.mark.parametrize("L,bs", [(64, 1), (64, 16), (64, 64), (96, 32), (6, 3)])
def test_check_block_size_accepts_divisors(L, bs):
    check_block_size(L, bs)


@pytest.mark.parametrize("L,bs", [(64, 5), (96, 64), (100, 8), (16, 0)])
def test_check_block_size_names_key_and_suggests_divisors(L, bs):
    with pytest.raises(ValueError, match=rf"block_size={bs}\b") as err:
        check_block_size(L, bs)
    msg = str(err.value)
    assert str(L) in msg
    suggested = [int(s) for s in re.findall(r"\d+", msg[msg.index("[") :])]
    assert suggested and all(L % d == 0 for d in suggested)
    with pytest.raises(ValueError, match=r"data\.block_size=3"):
        check_block_size(8, 3, key="data.block_size")
