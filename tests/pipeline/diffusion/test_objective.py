"""The BD3 NELBO against independent references: the AR NLL of ``transformers``, a per-block loop,
SUBS, attention annealing, chunked cross-entropy and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.diffusion.noise import EVAL_INTERVAL, MIN_T, sample_masks
from pipeline.diffusion.objective import (
    DiffusionConfig,
    anneal_lookahead,
    ar_nll,
    chunked_cross_entropy,
    compute_nelbo,
    draw_masks,
    eval_nelbo,
    protected_positions,
)
from pipeline.model import from_pretrained
from tests.pipeline.diffusion.reference import (
    BASE_VOCAB,
    REUSED_MASK_ID,
    loop_reference,
    token_weights,
    tokens,
)

L = 32


def _masks_of(out, x0, cfg, noise_ids, block_size, doc_starts=None):
    """The exact masks compute_nelbo used: same ids, same (clamped) t, same protected positions."""
    protect = protected_positions(x0, doc_starts, cfg.per_document)
    return draw_masks(cfg, noise_ids, out.t, block_size, cfg.interval_for(block_size), protect)


# -- 1. L' = 1 is the AR model ---------------------------------------------------------------------


def test_block_size_one_is_the_ar_nll_of_the_transformers_model(model, hf_model):
    x = tokens(3, L)
    ids = torch.arange(3)
    with torch.no_grad():
        hf_logits = hf_model(x).logits
        assert hf_logits.shape[-1] == BASE_VOCAB  # same normalization as -inf on mask/padding ids
        lp = torch.log_softmax(hf_logits.double(), dim=-1)
        nll = -lp[:, :-1].gather(2, x[:, 1:, None]).squeeze(2)  # positions 1..L-1
        out = compute_nelbo(model, x, DiffusionConfig(block_size=4, shift=True), ids, block_size=1)
        direct = compute_nelbo(model, x, DiffusionConfig(block_size=1, shift=True), ids + 100)
        ev = eval_nelbo(model, x, 1, ids, DiffusionConfig(block_size=8))
        ar, n_ar = ar_nll(model, x)

    assert torch.equal(out.t, torch.ones(3, L))
    assert out.n_masked.tolist() == [L - 1] * 3 and out.n_scored.tolist() == [L - 1] * 3
    torch.testing.assert_close(out.nelbo_sum.double(), nll.sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.masked_ce_sum.double(), nll.sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.nelbo.double(), nll.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss.double(), nll.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ar.double(), nll.sum(1), rtol=1e-5, atol=0)
    assert n_ar.tolist() == [L - 1] * 3
    # At L' = 1 there is no noise: any noise ids, the evaluation interval, the config's L' all agree.
    torch.testing.assert_close(direct.nelbo_sum, out.nelbo_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(ev.nelbo_sum, out.nelbo_sum, rtol=1e-6, atol=0)


# -- 3. vectorized = loop of one forward per block ---------------------------------------------------


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("block_size", [1, 2, 4, L // 2, L])
def test_vectorized_equals_per_block_loop(model, block_size, shift):
    x = tokens(3, L, seed=1)
    ids = torch.tensor([5, 6, 7])
    cfg = DiffusionConfig(
        block_size=block_size, shift=shift, noise_interval=(0.1, 0.9), seed=3, stratify_group=3
    )
    with torch.no_grad():
        out = compute_nelbo(model, x, cfg, ids)
    masks = _masks_of(out, x, cfg, ids, block_size)
    assert masks.any(1).all() and not masks[:, 0].any()
    ref = loop_reference(model, x, masks, token_weights(out.t, block_size), block_size, shift)

    torch.testing.assert_close(out.nelbo_sum.double(), ref["nelbo_sum"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.masked_ce_sum.double(), ref["ce_sum"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.block_nelbo.double(), ref["block_nelbo"], rtol=1e-4, atol=1e-5)
    assert torch.equal(out.n_masked.double(), ref["n_masked"])
    assert out.n_scored.tolist() == [L - 1] * 3
    torch.testing.assert_close(out.loss, out.nelbo_sum.sum() / out.n_scored.sum(), rtol=1e-6, atol=0)


def test_shift_changes_the_prediction_source(model):
    """Guard for the loop test: with and without the shift the references genuinely differ."""
    x = tokens(2, L, seed=1)
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        a = compute_nelbo(model, x, DiffusionConfig(block_size=4, shift=True), ids)
        b = compute_nelbo(model, x, DiffusionConfig(block_size=4, shift=False), ids)
    assert torch.equal(a.t, b.t)
    assert ((a.masked_ce_sum - b.masked_ce_sum).abs() > 1e-2 * a.masked_ce_sum).all()


# -- 5. SUBS -----------------------------------------------------------------------------------------


@pytest.fixture(params=["added", "reused"])
def subs_model(request, model, diffusion_ckpt_dir):
    if request.param == "added":
        assert model.invalid_output_ids.tolist() == list(range(BASE_VOCAB, 256))
        return model
    reused = from_pretrained(diffusion_ckpt_dir, mask_token_id=REUSED_MASK_ID, attn_backend="sdpa").eval()
    assert reused.config.vocab_size == BASE_VOCAB
    assert reused.invalid_output_ids.tolist() == [REUSED_MASK_ID]
    return reused


@pytest.mark.parametrize("block_size", [1, 4, L])
def test_mask_and_padding_ids_are_never_predicted(subs_model, block_size):
    x = tokens(2, L, seed=2)
    ids = torch.tensor([0, 1])
    cfg = DiffusionConfig(block_size=block_size, noise_interval=(0.2, 0.9))
    invalid = subs_model.invalid_output_ids
    row = 1e4 * torch.randn(subs_model.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = compute_nelbo(subs_model, x, cfg, ids)
        moved = []
        for sign in (1.0, -1.0):  # logits of +-1e4: one sign makes them win the softmax wherever allowed
            boosted = copy.deepcopy(subs_model)
            boosted.lm_head.weight[invalid] = sign * row
            out = compute_nelbo(boosted, x, cfg, ids)
            assert torch.equal(out.nelbo_sum, base.nelbo_sum)
            assert torch.equal(out.masked_ce_sum, base.masked_ce_sum)
            # The same change on one valid id does move the loss (the test can see such a logit).
            control = copy.deepcopy(subs_model)
            control.lm_head.weight[100] = sign * row
            moved.append((compute_nelbo(control, x, cfg, ids).masked_ce_sum - base.masked_ce_sum).abs().max())
    assert max(moved) > 100.0


def test_reused_mask_id_matches_the_loop_reference(subs_model):
    """The reused-id model normalizes over the base vocabulary minus the mask id."""
    x = tokens(2, L, seed=3)
    ids = torch.tensor([2, 3])
    cfg = DiffusionConfig(block_size=8, noise_interval=(0.2, 0.9))
    with torch.no_grad():
        out = compute_nelbo(subs_model, x, cfg, ids)
    masks = _masks_of(out, x, cfg, ids, 8)
    ref = loop_reference(subs_model, x, masks, token_weights(out.t, 8), 8, True)
    torch.testing.assert_close(out.nelbo_sum.double(), ref["nelbo_sum"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_size", [2, 8, L])
def test_unmasked_positions_cost_nothing_and_first_token_is_never_masked(model, block_size):
    x = tokens(4, L, seed=4)
    ids = torch.arange(4)
    n_blocks = L // block_size
    cfg = DiffusionConfig(block_size=block_size)
    t_min = torch.full((4, n_blocks), MIN_T)
    assert not sample_masks(ids, t_min, block_size, cfg.seed).any()  # precondition: t = MIN_T draws nothing
    with torch.no_grad():
        none = compute_nelbo(model, x, cfg, ids, t=t_min)
        every = compute_nelbo(model, x, cfg, ids, t=torch.ones(4, n_blocks))
    # Nothing masked: every token is copied, the loss is exactly 0 (not the CE of the copies).
    assert none.n_masked.sum() == 0
    assert torch.equal(none.nelbo_sum, torch.zeros(4)) and none.loss.item() == 0.0
    assert torch.equal(none.block_nelbo, torch.zeros(4, n_blocks))
    # t = 1: every token but the first of the row is masked and scored.
    assert every.n_masked.tolist() == [L - 1] * 4
    assert every.n_scored.tolist() == [L - 1] * 4
    assert every.block_nelbo[:, 1:].gt(0).all()
    masks = sample_masks(
        ids, torch.ones(4, n_blocks), block_size, cfg.seed, protected_positions(x, None, False)
    )
    assert not masks[:, 0].any() and masks[:, 1:].all()


# -- 7. attention annealing --------------------------------------------------------------------------


def test_anneal_lookahead_schedule():
    bs, n = 8, 10
    values = [anneal_lookahead(bs, n, s) for s in range(n)]
    assert values[0] == 0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] > 0 and all(0 <= v < bs - 1 for v in values)
    assert all(anneal_lookahead(bs, n, s) is None for s in (n, n + 1, 10 * n))
    assert all(anneal_lookahead(bs, 0, s) is None for s in (0, 5))


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("block_size", [4, L])
def test_annealed_loss_matches_in_block_causal_reference(model, block_size, shift):
    x = tokens(2, L, seed=5)
    ids = torch.tensor([0, 1])
    cfg = DiffusionConfig(block_size=block_size, shift=shift, anneal_steps=10, noise_interval=(0.2, 0.9))
    with torch.no_grad():
        causal = compute_nelbo(model, x, cfg, ids, step=0)
        half = compute_nelbo(model, x, cfg, ids, step=5)
        bidir = compute_nelbo(model, x, cfg, ids, step=10)
        plain = compute_nelbo(
            model, x, DiffusionConfig(block_size=block_size, shift=shift, noise_interval=(0.2, 0.9)), ids
        )
    masks = _masks_of(causal, x, cfg, ids, block_size)
    w = token_weights(causal.t, block_size)
    for out, lookahead in ((causal, 0), (half, anneal_lookahead(block_size, 10, 5)), (bidir, None)):
        ref = loop_reference(model, x, masks, w, block_size, shift, lookahead=lookahead)
        torch.testing.assert_close(out.nelbo_sum.double(), ref["nelbo_sum"], rtol=1e-4, atol=1e-5)
    assert torch.equal(bidir.nelbo_sum, plain.nelbo_sum)
    assert ((causal.masked_ce_sum - plain.masked_ce_sum).abs() > 1e-3 * plain.masked_ce_sum).all()


# -- 8. validation -----------------------------------------------------------------------------------


def test_block_size_not_dividing_length_raises(model):
    x = tokens(1, 30)
    with pytest.raises(ValueError, match="block_size=4"):
        compute_nelbo(model, x, DiffusionConfig(block_size=4), torch.arange(1))
    with pytest.raises(ValueError, match="block_size=7"):
        compute_nelbo(model, tokens(1, L), DiffusionConfig(block_size=4), torch.arange(1), block_size=7)
    with pytest.raises(ValueError, match="block_size=64"):
        eval_nelbo(model, tokens(1, L), 64, torch.arange(1), DiffusionConfig(block_size=4))


@pytest.mark.parametrize("interval", [(0.5, 0.2), (0.3, 0.3), (-0.1, 0.5), (0.2, 1.5)])
def test_bad_noise_interval_raises(model, interval):
    with pytest.raises(ValueError, match="^noise_interval must be"):
        DiffusionConfig(block_size=4, noise_interval=interval)
    with pytest.raises(ValueError, match="noise interval"):
        compute_nelbo(model, tokens(1, L), DiffusionConfig(block_size=4), torch.arange(1), interval=interval)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"block_size": []}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": [4, 4]}, "block_size"),
        ({"block_size_weights": [1.0]}, "block_size_weights"),  # needs a list of sizes
        ({"block_size": [4, 8], "block_size_weights": [1.0]}, "block_size_weights"),
        ({"block_size": [4, 8], "block_size_weights": [0.0, 0.0]}, "block_size_weights"),
        ({"block_size": [4, 8], "noise_interval": {4: (0.3, 0.8)}}, "noise_interval"),
        ({"block_size": [4, 8], "noise_interval": {4: (0.3, 0.8), 8: (0.9, 0.3)}}, "noise_interval.8"),
        ({"anneal_steps": -1}, "anneal_steps"),
        ({"aux_ar_weight": -0.5}, "aux_ar_weight"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
        ({"stratify_group": 0}, "stratify_group"),
    ],
)
def test_diffusion_config_refuses_bad_values_naming_the_field(fields, named):
    """Checked on construction, so pipeline.eval and pipeline.plan cannot build an invalid objective; the
    message starts with the field (the trainer reports it as diffusion.<field>)."""
    with pytest.raises(ValueError, match=rf"^{named} "):
        DiffusionConfig(**{"block_size": 4, **fields})


def test_eval_uses_the_full_interval_and_bidirectional_attention(model):
    x = tokens(64, 8, seed=6)
    ids = torch.arange(64)
    cfg = DiffusionConfig(block_size=4, noise_interval=(0.6, 0.7), anneal_steps=100)
    ev = eval_nelbo(model, x, 4, ids, cfg)
    assert not ev.loss.requires_grad
    assert ev.t.min() < 0.3 and ev.t.max() > 0.9 and ev.t.min() >= EVAL_INTERVAL[0]
    with torch.no_grad():
        ref = compute_nelbo(model, x, DiffusionConfig(block_size=4), ids, interval=EVAL_INTERVAL)
    assert torch.equal(ev.t, ref.t)
    torch.testing.assert_close(ev.nelbo_sum, ref.nelbo_sum, rtol=1e-6, atol=1e-6)


# -- 9. gradients and chunked cross-entropy ----------------------------------------------------------


def _loss_and_grads(model, x, cfg, ids):
    model.zero_grad(set_to_none=True)
    out = compute_nelbo(model, x, cfg, ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_gradients_flow_and_chunked_ce_matches_one_chunk(model, block_size):
    # float64: the mask token's embedding sums the gradient of every masked position, and in float32
    # chunking alone moves it by ~1e-6 (summation order), more than the comparison could tell apart.
    model.train().double()
    x = tokens(2, 16, seed=7)
    ids = torch.tensor([3, 4])
    cfg = DiffusionConfig(block_size=block_size, noise_interval=(0.2, 0.9))
    loss_one, g_one = _loss_and_grads(model, x, cfg, ids)
    loss_chunk, g_chunk = _loss_and_grads(
        model, x, DiffusionConfig(**{**cfg.__dict__, "loss_chunk_size": 7}), ids
    )

    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        g = g_one[name]
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    # SUBS: the mask/padding output rows get no gradient (their logits are constant -inf).
    assert torch.equal(
        g_one["lm_head.weight"][BASE_VOCAB:], torch.zeros_like(g_one["lm_head.weight"][BASE_VOCAB:])
    )
    torch.testing.assert_close(loss_chunk, loss_one, rtol=1e-12, atol=0)
    for name, g in g_one.items():
        torch.testing.assert_close(g_chunk[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_chunked_cross_entropy_equals_dense_cross_entropy():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 30, (23,), generator=g)
    invalid = torch.arange(30, 40)
    ce = chunked_cross_entropy(hidden, weight, targets, invalid, chunk=5)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t())[:, :30].double(), targets, reduction="none")
    torch.testing.assert_close(ce.double(), ref, rtol=1e-6, atol=1e-6)
    gh, gw = torch.autograd.grad(ce.sum(), (hidden, weight))
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_aux_ar_loss_adds_the_weighted_ar_nll(model):
    x = tokens(2, L, seed=8)
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        plain = compute_nelbo(model, x, DiffusionConfig(block_size=4), ids)
        aux = compute_nelbo(model, x, DiffusionConfig(block_size=4, aux_ar_weight=0.5), ids)
        ar, _ = ar_nll(model, x)
    torch.testing.assert_close(aux.nelbo_sum, plain.nelbo_sum, rtol=0, atol=0)
    torch.testing.assert_close(
        aux.loss, plain.loss + 0.5 * ar.sum() / plain.n_scored.sum(), rtol=1e-6, atol=0
    )
