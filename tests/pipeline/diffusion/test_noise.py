"""Noise of the BD3 objective: rank independence, stratification of t, the masking probability."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.noise import MIN_T, sample_block_times, sample_masks
from pipeline.diffusion.objective import DiffusionConfig, compute_nelbo
from tests.pipeline.diffusion.reference import tokens


def test_noise_is_independent_of_how_the_global_batch_is_split(model):
    """One process with ids 0..7 == two processes with 0..3 and 4..7 (same seed, same group)."""
    ids = torch.arange(8)
    halves = (ids[:4], ids[4:])
    n_blocks, bs, seed, group = 4, 4, 11, 8
    t_all = sample_block_times(ids, n_blocks, (0.1, 0.95), seed, group)
    t_split = torch.cat([sample_block_times(h, n_blocks, (0.1, 0.95), seed, group) for h in halves])
    assert torch.equal(t_all, t_split)
    m_all = sample_masks(ids, t_all, bs, seed)
    m_split = torch.cat([sample_masks(h, t_all[h], bs, seed) for h in halves])
    assert torch.equal(m_all, m_split)
    # Any order of the rows: each sample's draws follow its id.
    perm = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])
    assert torch.equal(sample_block_times(perm, n_blocks, (0.1, 0.95), seed, group), t_all[perm])
    assert torch.equal(sample_masks(perm, t_all[perm], bs, seed), m_all[perm])

    x = tokens(8, n_blocks * bs, seed=1)
    cfg = DiffusionConfig(block_size=bs, noise_interval=(0.1, 0.95), seed=seed, stratify_group=group)
    with torch.no_grad():
        full = compute_nelbo(model, x, cfg, ids)
        parts = [compute_nelbo(model, x[h], cfg, h) for h in halves]
    assert torch.equal(full.t, torch.cat([p.t for p in parts]))
    assert torch.equal(full.n_masked, torch.cat([p.n_masked for p in parts]))
    # The noise is identical (above, exactly); the losses differ only by float32 rounding: a batch of 8
    # and two of 4 take other BLAS paths (2.3e-5 relative measured on 2 threads).
    torch.testing.assert_close(full.nelbo_sum, torch.cat([p.nelbo_sum for p in parts]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        full.block_nelbo, torch.cat([p.block_nelbo for p in parts]), rtol=1e-4, atol=1e-5
    )


def test_noise_depends_on_the_seed():
    ids = torch.arange(4)
    a = sample_block_times(ids, 4, (0.0, 1.0), seed=0, group_size=4)
    assert torch.equal(a, sample_block_times(ids, 4, (0.0, 1.0), seed=0, group_size=4))
    assert not torch.equal(a, sample_block_times(ids, 4, (0.0, 1.0), seed=1, group_size=4))
    t = torch.full((4, 4), 0.5)
    assert not torch.equal(sample_masks(ids, t, 4, seed=0), sample_masks(ids, t, 4, seed=1))


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.2, 0.9), (0.45, 0.95)])
def test_block_times_are_stratified_over_the_group(interval):
    beta, omega = interval
    G, B = 8, 8
    for group in range(3):
        ids = torch.arange(group * G, (group + 1) * G)
        t = sample_block_times(ids, B, interval, seed=2, group_size=G)
        assert t.shape == (G, B) and t.dtype == torch.float32
        assert t.min() >= max(beta, MIN_T) and t.max() <= omega
        strata = torch.floor((t.double() - beta) / (omega - beta) * G * B).long()
        if beta == 0.0:  # t clamped up to MIN_T still falls in stratum 0
            strata = strata.clamp(min=0)
        assert sorted(strata.flatten().tolist()) == list(range(G * B))


def test_block_times_spread_within_every_sequence():
    """Stratified, but not row-major: a sequence's blocks do not share nearly the same t.

    Row-major strata would give each row 8 adjacent strata out of 64: per-row std about 0.036.
    A random permutation gives about the std of U[0, 1], 0.29.
    """
    G, B = 8, 8
    t = sample_block_times(torch.arange(4 * G), B, (0.0, 1.0), seed=0, group_size=G)
    std = t.std(dim=1)
    assert std.mean() > 0.2 and std.min() > 0.1
    # Marginally uniform: the mean of the 256 draws is close to 1/2 (stratified: very close).
    assert abs(t.mean().item() - 0.5) < 0.02


def test_masking_probability_is_t_per_block():
    n, bs = 2000, 8
    t = torch.tensor([[0.1, 0.5, 0.9, 1.0]]).expand(n, 4)
    protect = torch.zeros(n, 4 * bs, dtype=torch.bool)
    protect[:, 0] = True
    m = sample_masks(torch.arange(n), t, bs, seed=0, protect=protect)
    freq = m.float().view(n, 4, bs)[:, :, 1:].mean(dim=(0, 2))  # leave out the protected token
    # 14,000 Bernoulli draws per block: std <= 0.0043, tolerance 4 std.
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.5, 0.9, 1.0]), rtol=0, atol=0.017)
    assert not m[:, 0].any()


@pytest.mark.parametrize("interval", [(0.5, 0.2), (0.3, 0.3), (-0.1, 0.5), (0.2, 1.5)])
def test_bad_interval_raises(interval):
    with pytest.raises(ValueError, match="noise interval"):
        sample_block_times(torch.arange(2), 4, interval, seed=0)
