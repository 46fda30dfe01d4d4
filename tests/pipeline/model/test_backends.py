"""FlexAttention (eager on CPU) and SDPA give the same model outputs for every attention kind.

SDPA builds a dense boolean mask from the predicate; Flex builds a block mask from the same
predicate (and a closure over ``doc_ids``). A disagreement means one of the two paths applies the
mask, the document ids or the grouped-query heads differently.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.model.masks import AttentionMask
from tests.pipeline.model.helpers import noised, random_doc_ids, random_tokens, same_weights, tiny_model

L = 32
KINDS = [
    AttentionMask("ar"),
    AttentionMask("mdlm"),
    AttentionMask("mdlm", lookahead=3),
    AttentionMask("block_causal", 4),
    AttentionMask("block_causal", 8, lookahead=1),
    AttentionMask("bd3_train", 1),
    AttentionMask("bd3_train", 4),
    AttentionMask("bd3_train", 8, lookahead=0),
    AttentionMask("bd3_train", 32),
]


@pytest.fixture(scope="module")
def models():
    sdpa = tiny_model(seed=3)
    return sdpa, same_weights(sdpa, attn_backend="flex")


def _inputs(mask: AttentionMask, length: int = L):
    x0 = random_tokens(2, length, seed=4)
    if mask.kind == "bd3_train":
        return torch.cat([noised(x0), x0], dim=1)
    return x0


@pytest.mark.parametrize("per_document", [False, True], ids=["row", "per_document"])
@pytest.mark.parametrize("mask", KINDS, ids=str)
def test_flex_equals_sdpa(models, mask, per_document):
    sdpa, flex = models
    ids = _inputs(mask)
    doc_ids = random_doc_ids(2, L, seed=5) if per_document else None
    with torch.no_grad():
        a = sdpa(ids, attn=mask, doc_ids=doc_ids)
        b = flex(ids, attn=mask, doc_ids=doc_ids)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    if per_document:
        # The documents really are separated: per-document output differs from the whole-row one.
        with torch.no_grad():
            assert (sdpa(ids, attn=mask) - a).abs().max() > 1e-3


@pytest.mark.parametrize("per_document", [False, True], ids=["row", "per_document"])
def test_flex_equals_sdpa_across_flex_tiles(models, per_document):
    # 2L = 192 > 128 = FLEX_BLOCK_SIZE: several query/key tiles, some fully masked and skipped.
    sdpa, flex = models
    mask = AttentionMask("bd3_train", 16)
    ids = _inputs(mask, 96)
    doc_ids = random_doc_ids(2, 96, seed=6) if per_document else None
    with torch.no_grad():
        torch.testing.assert_close(
            flex(ids, attn=mask, doc_ids=doc_ids), sdpa(ids, attn=mask, doc_ids=doc_ids), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("lookahead", [None, 1])
def test_flex_equals_sdpa_decoding_with_cache(models, lookahead):
    sdpa, flex = models
    bs = 4
    x0 = random_tokens(2, 3 * bs, seed=7)
    xt = noised(random_tokens(2, bs, seed=8))
    mask = AttentionMask("bd3_decode", bs, lookahead)
    outs = []
    for model in (sdpa, flex):
        cache = model.new_kv_cache(2, 4 * bs)
        with torch.no_grad():
            written = [
                model(x0[:, i : i + bs], attn=mask, kv_cache=cache, write_cache=True) for i in (0, 4, 8)
            ]
            outs.append((torch.stack(written), model(xt, attn=mask, kv_cache=cache)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=1e-5)
