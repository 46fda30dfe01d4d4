"""The central BD3 property: one bd3_train forward over concat(x_t, x_0) equals the per-block loop.

For block b, the x_t-half logits of the vectorized forward must equal the logits of block b when the
model runs on [x_0 blocks < b, x_t block b] alone with ``block_causal`` attention (what the paper's
reference implementation and the KV-cached sampler compute). Positions: both halves use 0..L-1.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.model.masks import AttentionMask
from tests.pipeline.model.helpers import noised, random_doc_ids, random_tokens, same_weights, tiny_model

ATOL = 1e-5
# (L, L', lookahead): L'=1 (AR), L'=L (MDLM), in between, and annealed in-block attention.
SIZES = [(16, 1, None), (16, 4, None), (24, 8, None), (16, 16, None), (16, 4, 0), (24, 8, 2)]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11)


def _vectorized(model, x0, xt, bs, lookahead=None, doc_ids=None):
    L = x0.shape[1]
    with torch.no_grad():
        out = model(
            torch.cat([xt, x0], dim=1), attn=AttentionMask("bd3_train", bs, lookahead), doc_ids=doc_ids
        )
    return out[:, :L], out[:, L:]


def _per_block_loop(model, x0, xt, bs, lookahead=None, doc_ids=None):
    """Block b's logits from a forward over [x_0 blocks < b, x_t block b] (length (b+1)L')."""
    L = x0.shape[1]
    mask = AttentionMask("block_causal", bs, lookahead)
    blocks = []
    for b in range(L // bs):
        end = (b + 1) * bs
        ids = torch.cat([x0[:, : b * bs], xt[:, b * bs : end]], dim=1)
        docs = None if doc_ids is None else doc_ids[:, :end]
        with torch.no_grad():
            blocks.append(model(ids, attn=mask, doc_ids=docs)[:, -bs:])
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize("L,bs,lookahead", SIZES)
def test_noisy_half_equals_per_block_loop(model, L, bs, lookahead):
    x0 = random_tokens(2, L, seed=L + bs)
    xt = noised(x0, p=0.5, seed=bs)
    noisy, _ = _vectorized(model, x0, xt, bs, lookahead)
    torch.testing.assert_close(noisy, _per_block_loop(model, x0, xt, bs, lookahead), rtol=0, atol=ATOL)


@pytest.mark.parametrize("L,bs,lookahead", SIZES)
def test_clean_half_equals_block_causal_over_x0(model, L, bs, lookahead):
    x0 = random_tokens(2, L, seed=L * bs)
    _, clean = _vectorized(model, x0, noised(x0), bs, lookahead)
    with torch.no_grad():
        ref = model(x0, attn=AttentionMask("block_causal", bs, lookahead))
    torch.testing.assert_close(clean, ref, rtol=0, atol=ATOL)


def test_block_size_one_clean_half_is_the_ar_model(model):
    x0 = random_tokens(2, 16, seed=21)
    _, clean = _vectorized(model, x0, noised(x0), 1)
    with torch.no_grad():
        torch.testing.assert_close(clean, model(x0), rtol=0, atol=ATOL)


def test_noise_in_a_block_does_not_leak_elsewhere(model):
    # Changing x_t in block b changes only block b's noisy logits: no block sees another's noise.
    L, bs, b = 16, 4, 2
    x0 = random_tokens(2, L, seed=31)
    xt = noised(x0, 0.5, seed=32)
    xt2 = xt.clone()
    xt2[:, b * bs : (b + 1) * bs] = noised(x0[:, b * bs : (b + 1) * bs], 0.9, seed=33)
    assert not torch.equal(xt, xt2)
    n1, c1 = _vectorized(model, x0, xt, bs)
    n2, c2 = _vectorized(model, x0, xt2, bs)
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)
    changed = (n1 - n2).abs().amax(dim=(0, 2)) > 1e-4
    assert changed[b * bs : (b + 1) * bs].all() and changed.sum() == bs


@pytest.mark.parametrize("L,bs", [(24, 4), (16, 1), (16, 16)])
def test_per_document_noisy_half_equals_per_block_loop(model, L, bs):
    x0 = random_tokens(2, L, seed=41)
    xt = noised(x0, 0.5, seed=42)
    doc_ids = random_doc_ids(2, L, p=0.2, seed=43)
    noisy, clean = _vectorized(model, x0, xt, bs, doc_ids=doc_ids)
    torch.testing.assert_close(noisy, _per_block_loop(model, x0, xt, bs, doc_ids=doc_ids), rtol=0, atol=ATOL)
    with torch.no_grad():
        ref = model(x0, attn=AttentionMask("block_causal", bs), doc_ids=doc_ids)
    torch.testing.assert_close(clean, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_per_document_equals_each_document_alone(model, backend):
    # With block-aligned document starts, each document of a packed row is scored as if it were
    # alone (same absolute rotary positions, passed explicitly).
    model = same_weights(model, attn_backend=backend).eval()
    L, bs = 32, 4
    x0 = random_tokens(1, L, seed=51)
    xt = noised(x0, 0.5, seed=52)
    doc_ids = random_doc_ids(1, L, p=0.3, seed=53, aligned_to=bs)
    assert doc_ids.max() >= 1
    noisy, _ = _vectorized(model, x0, xt, bs, doc_ids=doc_ids)
    for d in doc_ids.unique():
        pos = (doc_ids[0] == d).nonzero().flatten()
        s, e = int(pos[0]), int(pos[-1]) + 1
        with torch.no_grad():
            alone = model(
                torch.cat([xt[:, s:e], x0[:, s:e]], dim=1),
                attn=AttentionMask("bd3_train", bs),
                positions=torch.arange(s, e).repeat(2),
            )
        torch.testing.assert_close(noisy[:, s:e], alone[:, : e - s], rtol=0, atol=ATOL)


def test_flex_vectorized_equals_per_block_loop(model):
    flex = same_weights(model, attn_backend="flex").eval()
    x0 = random_tokens(2, 16, seed=61)
    xt = noised(x0, 0.5, seed=62)
    noisy, _ = _vectorized(flex, x0, xt, 4)
    torch.testing.assert_close(noisy, _per_block_loop(model, x0, xt, 4), rtol=0, atol=ATOL)
