"""Training-time numerics: activation checkpointing changes nothing; bf16 autocast stays finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.masks import AttentionMask
from tests.pipeline.model.helpers import MASK_ID, noised, random_tokens, same_weights, tiny_model


def _bd3_loss(model, x0, xt, bs):
    """Cross-entropy of the x_t-half logits on the masked positions (enough to exercise backward)."""
    L = x0.shape[1]
    logits = model(torch.cat([xt, x0], dim=1), attn=AttentionMask("bd3_train", bs))[:, :L]
    masked = xt == MASK_ID
    return F.cross_entropy(logits[masked].float(), x0[masked])


def _grads(model, x0, xt, bs):
    model.zero_grad(set_to_none=True)
    loss = _bd3_loss(model, x0, xt, bs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_activation_checkpointing_gives_identical_gradients(backend):
    plain = tiny_model(seed=31, attn_backend=backend).train()
    ckpt = same_weights(plain, activation_checkpointing=True).train()
    x0 = random_tokens(2, 16, seed=1)
    xt = noised(x0, 0.5, seed=2)
    loss_a, grads_a = _grads(plain, x0, xt, 4)
    loss_b, grads_b = _grads(ckpt, x0, xt, 4)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name].abs().max() > 0, name  # every parameter is reached
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)


def test_activation_checkpointing_is_off_in_eval_and_no_grad():
    # Checkpointing only matters when gradients flow; eval forwards must not pay for it or differ.
    plain = tiny_model(seed=32)
    ckpt = same_weights(plain, activation_checkpointing=True)
    x = random_tokens(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(ckpt(x), plain(x))
