"""Edge cases of the BD3 objective: empty and full blocks, bf16 autocast, the complementary mask and
per-document masking of packed rows."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import objective
from pipeline.diffusion.noise import MIN_T, sample_masks
from pipeline.diffusion.objective import DiffusionConfig, compute_nelbo, draw_masks, protected_positions
from tests.pipeline.diffusion.reference import loop_reference, token_weights, tokens

L = 32


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# -- empty and full blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("complementary", [False, True], ids=["plain", "complementary"])
@pytest.mark.parametrize("block_size", [4, L])
def test_empty_and_fully_masked_blocks_are_finite(model, block_size, complementary):
    model.train()
    n_blocks = L // block_size
    x = tokens(2, L, seed=10)
    ids = torch.tensor([0, 1])
    cfg = DiffusionConfig(block_size=block_size, complementary_mask=complementary)
    # Even blocks at t = 0 (clamped to MIN_T: nothing masked here), odd blocks at t = 1 (all masked).
    # With one block (L' = L) only the fully masked case: an all-empty batch is tested below.
    levels = torch.tensor([0.0, 1.0]).repeat(n_blocks)[:n_blocks] if n_blocks > 1 else torch.tensor([1.0])
    t = levels.expand(2, n_blocks).clone()
    masks = sample_masks(ids, t.clamp(min=MIN_T), block_size, cfg.seed, protected_positions(x, None, False))
    if n_blocks > 1:
        assert not masks.view(2, n_blocks, block_size)[:, ::2].any()  # precondition
        assert masks.view(2, n_blocks, block_size)[:, 1::2].all()
    out = compute_nelbo(model, x, cfg, ids, t=t)
    assert (
        torch.isfinite(out.loss)
        and torch.isfinite(out.nelbo_sum).all()
        and torch.isfinite(out.block_nelbo).all()
    )
    assert out.loss > 0
    assert torch.equal(out.t, t.clamp(min=MIN_T))  # t = 0 is used (and reported) as MIN_T
    out.loss.backward()
    grads = _grads(model)
    assert "lm_head.weight" in grads and all(torch.isfinite(g).all() for g in grads.values())
    if n_blocks > 1 and not complementary:
        assert torch.equal(out.block_nelbo[:, ::2], torch.zeros(2, n_blocks // 2))


def test_backward_works_when_nothing_is_masked(model):
    """A batch (or a rank's shard of it) where no token is masked must still backpropagate (zero grads)."""
    model.train()
    x = tokens(2, 8, seed=11)
    ids = torch.tensor([0, 1])
    t = torch.full((2, 2), MIN_T)
    assert not sample_masks(ids, t, 4, 0).any()  # precondition
    out = compute_nelbo(model, x, DiffusionConfig(block_size=4), ids, t=t)
    assert out.loss.item() == 0.0
    out.loss.backward()  # a data-parallel rank that skips backward would hang the others
    assert model.lm_head.weight.grad is not None
    assert torch.equal(model.lm_head.weight.grad, torch.zeros_like(model.lm_head.weight))


@pytest.mark.parametrize(
    "block_size, backend", [(1, "sdpa"), (4, "sdpa"), (L, "sdpa"), (4, "flex")], ids=lambda v: str(v)
)
def test_bf16_autocast_forward_backward_is_finite(model, block_size, backend):
    """The objective under bf16 autocast (the run's amp_bf16): float32 losses, finite gradients, the
    float32 loss to bf16 accuracy (autocast must not change the masks or positions), on both CPU
    attention backends."""
    model.attn_backend = backend
    model.train()
    x = tokens(2, L, seed=12)
    ids = torch.tensor([0, 1])
    cfg = DiffusionConfig(block_size=block_size, noise_interval=(0.2, 0.9))
    with torch.no_grad():
        ref = compute_nelbo(model, x, cfg, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compute_nelbo(model, x, cfg, ids)
    assert out.loss.dtype == torch.float32 and out.nelbo_sum.dtype == torch.float32
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0.05, atol=0)
    out.loss.backward()
    grads = _grads(model)
    assert "model.embed_tokens.weight" in grads and "lm_head.weight" in grads
    assert all(torch.isfinite(g).all() for g in grads.values())


# -- complementary mask ------------------------------------------------------------------------------


def _complementary_setup(model, block_size):
    x = tokens(3, L, seed=13)
    ids = torch.tensor([0, 1, 2])
    cfg = DiffusionConfig(block_size=block_size, complementary_mask=True, noise_interval=(0.1, 0.9))
    with torch.no_grad():
        out = compute_nelbo(model, x, cfg, ids)
    protect = protected_positions(x, None, False)
    masks = draw_masks(cfg, ids, out.t, block_size, cfg.interval_for(block_size), protect)
    comp = ~masks & ~protect
    w = token_weights(out.t, block_size)
    w_comp = 1.0 / (1.0 - out.t.double()).clamp(min=MIN_T).repeat_interleave(block_size, dim=1)
    ref = loop_reference(model, x, masks, w, block_size, True)
    ref_comp = loop_reference(model, x, comp, w_comp, block_size, True)
    return out, ref, ref_comp


@pytest.mark.parametrize("block_size", [4, L])
def test_complementary_mask_scores_every_token_once(model, block_size):
    out, ref, ref_comp = _complementary_setup(model, block_size)
    assert torch.isfinite(out.loss)
    # Each scored token is masked in exactly one of the two copies.
    assert out.n_masked.tolist() == [L - 1] * 3
    assert torch.equal(
        ref["n_masked"] + ref_comp["n_masked"], torch.full((3,), float(L - 1), dtype=torch.float64)
    )
    # The loss averages the two (1/t and 1/(1-t) weighted) estimators.
    expected = (ref["nelbo_sum"] + ref_comp["nelbo_sum"]) / 2
    torch.testing.assert_close(out.nelbo_sum.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        out.block_nelbo.double(), (ref["block_nelbo"] + ref_comp["block_nelbo"]) / 2, rtol=1e-4, atol=1e-5
    )


def test_complementary_masked_ce_is_the_ce_per_masked_token(model):
    out, ref, ref_comp = _complementary_setup(model, 4)
    per_token = (ref["ce_sum"] + ref_comp["ce_sum"]).sum() / (ref["n_masked"] + ref_comp["n_masked"]).sum()
    torch.testing.assert_close(out.masked_ce.double(), per_token, rtol=1e-4, atol=0)


# -- per-document masking ----------------------------------------------------------------------------


def _doc_starts(batch, starts):
    d = torch.zeros(batch, L, dtype=torch.bool)
    d[:, starts] = True
    return d


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_per_document_equals_running_each_document_alone(model, block_size, shift):
    """Documents aligned to blocks: the packed row's sums equal those of each document as its own row
    (same masks; rotary attention only sees relative positions, hence a float tolerance)."""
    starts = [0, 12, 24]
    x = tokens(2, L, seed=14)
    ids = torch.tensor([0, 1])
    docs = _doc_starts(2, starts)
    cfg = DiffusionConfig(block_size=block_size, shift=shift, per_document=True, noise_interval=(0.1, 0.9))
    with torch.no_grad():
        out = compute_nelbo(model, x, cfg, ids, doc_starts=docs)
    masks = draw_masks(
        cfg, ids, out.t, block_size, cfg.interval_for(block_size), protected_positions(x, docs, True)
    )
    assert not masks[:, starts].any()
    assert out.n_scored.tolist() == [L - len(starts)] * 2
    total = torch.zeros(2, dtype=torch.float64)
    for s, e in zip(starts, starts[1:] + [L]):
        t_doc = out.t[:, s // block_size : e // block_size]
        ref = loop_reference(
            model, x[:, s:e], masks[:, s:e], token_weights(t_doc, block_size), block_size, shift
        )
        torch.testing.assert_close(
            out.block_nelbo[:, s // block_size : e // block_size].double(),
            ref["block_nelbo"],
            rtol=1e-4,
            atol=1e-4,
        )
        total += ref["nelbo_sum"]
    torch.testing.assert_close(out.nelbo_sum.double(), total, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_size", [4, L])
def test_document_starts_are_never_masked_nor_scored(model, block_size):
    starts = [0, 10, 21]
    x = tokens(2, L, seed=15)
    docs = _doc_starts(2, starts)
    cfg = DiffusionConfig(block_size=block_size, per_document=True)
    with torch.no_grad():
        out = compute_nelbo(
            model, x, cfg, torch.tensor([0, 1]), doc_starts=docs, t=torch.ones(2, L // block_size)
        )
        off = compute_nelbo(
            model,
            x,
            DiffusionConfig(block_size=block_size),
            torch.tensor([0, 1]),
            doc_starts=docs,
            t=torch.ones(2, L // block_size),
        )
    assert out.n_masked.tolist() == [L - 3] * 2 and out.n_scored.tolist() == [L - 3] * 2
    # Without per_document the boundaries are ignored.
    assert off.n_masked.tolist() == [L - 1] * 2 and off.n_scored.tolist() == [L - 1] * 2


@pytest.mark.parametrize("block_size", [4, L])
def test_other_documents_do_not_change_a_documents_token_losses(model, monkeypatch, block_size):
    """A document boundary inside a block (at 10, block 8..11): document 2's per-token cross-entropies do
    not depend on document 1's tokens with per_document, and do without it."""
    captured = []
    real = objective.chunked_cross_entropy

    def spy(*args, **kwargs):
        ce = real(*args, **kwargs)
        captured.append(ce.detach().clone())
        return ce

    monkeypatch.setattr(objective, "chunked_cross_entropy", spy)
    start = 10
    ids = torch.tensor([0, 1])
    docs = _doc_starts(2, [0, start])
    x = tokens(2, L, seed=16)
    x_other = x.clone()
    x_other[:, :start] = tokens(2, start, seed=17)

    def doc2_ce(per_document, inp):
        cfg = DiffusionConfig(block_size=block_size, per_document=per_document, noise_interval=(0.3, 0.9))
        captured.clear()
        with torch.no_grad():
            out = compute_nelbo(model, inp, cfg, ids, doc_starts=docs)
        masks = draw_masks(
            cfg,
            ids,
            out.t,
            block_size,
            cfg.interval_for(block_size),
            protected_positions(inp, docs, per_document),
        )
        cols = masks.nonzero(as_tuple=True)[1]
        ce = torch.cat(captured)
        assert ce.shape == cols.shape
        return ce[cols >= start], ce[cols < start]

    a2, a1 = doc2_ce(True, x)
    b2, b1 = doc2_ce(True, x_other)
    assert a2.numel() > 5
    torch.testing.assert_close(b2, a2, rtol=1e-5, atol=1e-5)
    assert (a1 - b1).abs().max() > 0.1  # document 1's own losses did change
    c2, _ = doc2_ce(False, x)
    d2, _ = doc2_ce(False, x_other)
    assert (c2 - d2).abs().max() > 0.1  # without per-document masking they leak
