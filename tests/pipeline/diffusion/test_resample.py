"""BD3-LM's clipped schedule (``training.resample``): every block's masked fraction in [beta, omega].

The sampler draws directly from the law of BD3-LM's rejection loop; the references here are the
loop itself (plain Python, redraw until the count fits) and that law enumerated mask by mask.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.diffusion.noise import EVAL_INTERVAL, clipped_counts, sample_block_times, sample_masks


def _row_starts(rows: int, L: int) -> torch.Tensor:
    protect = torch.zeros(rows, L, dtype=torch.bool)
    protect[:, 0] = True
    return protect


def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square (bins with expected > 0; dof = bins - 1)."""
    keep = expected > 0
    assert observed[~keep].sum() == 0, "counts where the reference has probability 0"
    o, e = observed[keep].double(), expected[keep].double()
    stat = ((o - e) ** 2 / e).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def test_clipped_counts_follow_bd3lm_bounds():
    assert clipped_counts((0.45, 0.95), 4) == (2, 3)
    assert clipped_counts((0.3, 0.8), 16) == (5, 12)
    assert clipped_counts((0.5, 1.0), 4) == (2, 4)  # omega = 1: no upper bound
    assert clipped_counts(EVAL_INTERVAL, 16) == (0, 16)  # beta = 1e-3: no lower bound (BD3-LM)


@pytest.mark.parametrize("block_size,interval", [(4, (0.45, 0.95)), (16, (0.3, 0.8))])
def test_no_block_outside_the_interval(block_size, interval):
    L = 128
    rows = 100_000 * block_size // L
    ids = torch.arange(rows)
    t = sample_block_times(ids, L // block_size, interval, seed=3, group_size=rows)
    protect = _row_starts(rows, L)
    plain = sample_masks(ids, t, block_size, 3, protect)
    clipped = sample_masks(ids, t, block_size, 3, protect, clipped_counts(interval, block_size))
    beta, omega = interval

    def outside(m):  # blocks after the first (a row's first token is unmasked after the count)
        frac = m.view(rows, -1, block_size)[:, 1:].sum(-1).double() / block_size
        return ((frac < beta - 1e-9) | (frac > omega + 1e-9)).double().mean().item()

    assert outside(plain) > 0.1  # the independent draws the resampling corrects (42% and 19%)
    assert outside(clipped) == 0.0
    assert not clipped[:, 0].any()  # the protected first token stays unmasked
    later = lambda m: m.view(rows, -1, block_size)[:, 1:]  # noqa: E731
    fits = later(plain).sum(-1).double() / block_size
    fits = (fits >= beta - 1e-9) & (fits <= omega + 1e-9)
    # Blocks whose first draw fits keep it (BD3-LM's loop only redraws the others).
    assert torch.equal(later(clipped)[fits], later(plain)[fits])


def _rejection_law(n: int, t: float, k_min: int, k_max: int) -> dict[tuple[bool, ...], float]:
    """P(mask pattern) of the loop 'draw n Bernoulli(t); redraw until k_min <= count <= k_max'."""
    weight = {
        s: t ** sum(s) * (1 - t) ** (n - sum(s))
        for s in itertools.product((False, True), repeat=n)
        if k_min <= sum(s) <= k_max
    }
    z = sum(weight.values())
    return {s: w / z for s, w in weight.items()}


@pytest.mark.parametrize("t_value", [0.5, 0.9])
def test_small_block_masks_have_the_rejection_loops_exact_law(t_value):
    """L'=4, [0.45, 0.95]: frequencies of all mask patterns against the enumerated law of BD3-LM's loop,
    for a full block and for a row's first block (the loop draws all 4 positions, the first token
    counted, and unmasks that token afterwards: the law of positions 1..3 is the 4-position law
    summed over position 0)."""
    bs, rows, interval = 4, 20_000, (0.45, 0.95)
    ids = torch.arange(rows)
    t = torch.full((rows, 2), t_value)
    k_min, k_max = clipped_counts(interval, bs)
    m = sample_masks(ids, t, bs, 5, _row_starts(rows, 2 * bs), (k_min, k_max))
    full = _rejection_law(bs, t_value, k_min, k_max)
    first: dict[tuple[bool, ...], float] = {}
    for s, p in full.items():
        first[s[1:]] = first.get(s[1:], 0.0) + p
    for block, n, law in ((0, 3, first), (1, 4, full)):
        cols = slice(block * bs + (bs - n), (block + 1) * bs)  # the maskable positions
        patterns = list(itertools.product((False, True), repeat=n))
        observed = torch.zeros(len(patterns))
        index = {s: i for i, s in enumerate(patterns)}
        for row in m[:, cols].tolist():
            observed[index[tuple(row)]] += 1
        expected = torch.tensor([law.get(s, 0.0) * rows for s in patterns])
        assert _chi_square_p(observed, expected) > 1e-3


def test_large_block_counts_match_a_plain_rejection_loop():
    """L'=16, [0.3, 0.8], t from the training sampler: masked counts of the direct sampler and of a
    redraw-until-it-fits loop (same t) are one distribution (chi-square homogeneity), and at one fixed
    t the counts follow the truncated binomial computed in float64 with a loop."""
    bs, interval = 16, (0.3, 0.8)
    k_min, k_max = clipped_counts(interval, bs)
    rows = 4000
    ids = torch.arange(rows)
    t = sample_block_times(ids, 1, interval, seed=9, group_size=rows)
    counts = sample_masks(ids, t, bs, 9, None, (k_min, k_max)).sum(1)

    g = torch.Generator().manual_seed(0)
    ref = []
    for tv in t[:, 0].tolist():
        while True:
            k = int((torch.rand(bs, generator=g) < tv).sum())
            if k_min <= k <= k_max:
                ref.append(k)
                break
    ref = torch.tensor(ref)
    a = torch.bincount(counts, minlength=bs + 1).double()
    b = torch.bincount(ref, minlength=bs + 1).double()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    pooled = (a + b) / (2 * rows)
    stat = (((a - rows * pooled) ** 2 + (b - rows * pooled) ** 2) / (rows * pooled)).sum()
    p = torch.special.gammaincc(torch.tensor((len(a) - 1) / 2, dtype=torch.float64), stat / 2)
    assert p > 1e-3

    t_fixed = 0.35
    fixed = sample_masks(ids, torch.full((rows, 1), t_fixed), bs, 2, None, (k_min, k_max)).sum(1)
    pmf = [
        math.comb(bs, k) * t_fixed**k * (1 - t_fixed) ** (bs - k) if k_min <= k <= k_max else 0.0
        for k in range(bs + 1)
    ]
    expected = torch.tensor(pmf, dtype=torch.float64) / sum(pmf) * rows
    assert _chi_square_p(torch.bincount(fixed, minlength=bs + 1), expected) > 1e-3


def test_evaluation_interval_leaves_masks_unchanged():
    ids = torch.arange(64)
    t = sample_block_times(ids, 8, EVAL_INTERVAL, seed=1, group_size=64)
    protect = _row_starts(64, 64)
    assert torch.equal(
        sample_masks(ids, t, 8, 1, protect, clipped_counts(EVAL_INTERVAL, 8)),
        sample_masks(ids, t, 8, 1, protect),
    )


def test_protected_positions_count_then_are_unmasked():
    """Per-document starts (protected) count in their block's conditioned draw, as a row's first token
    does in BD3-LM, and are unmasked afterwards: the draw is the unprotected draw with them removed."""
    bs, rows = 4, 2000
    ids = torch.arange(rows)
    t = torch.full((rows, 2), 0.85)
    protect = torch.zeros(rows, 2 * bs, dtype=torch.bool)
    protect[:, [0, 1]] = True
    counts = clipped_counts((0.75, 1.0), bs)
    free = sample_masks(ids, t, bs, 4, None, counts)
    clipped = sample_masks(ids, t, bs, 4, protect, counts)
    assert torch.equal(clipped, free & ~protect)
    assert (free.view(rows, 2, bs).sum(-1) >= 3).all() and not clipped[:, :2].any()


# -- several block sizes in one run ------------------------------------------------------------------


def test_block_size_of_a_step_is_a_function_of_seed_and_step_with_the_weights():
    from pipeline.diffusion.objective import DiffusionConfig

    cfg = DiffusionConfig(block_size=[2, 4, 16], block_size_weights=[1.0, 1.0, 2.0], seed=5)
    steps = range(4000)
    drawn = [cfg.block_size_at(s) for s in steps]
    assert drawn == [
        DiffusionConfig(block_size=[2, 4, 16], block_size_weights=[1, 1, 2], seed=5).block_size_at(s)
        for s in steps
    ]
    assert drawn != [
        DiffusionConfig(block_size=[2, 4, 16], block_size_weights=[1, 1, 2], seed=6).block_size_at(s)
        for s in steps
    ]
    observed = torch.tensor([drawn.count(b) for b in (2, 4, 16)], dtype=torch.float64)
    assert _chi_square_p(observed, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64) * len(steps)) > 1e-3
    assert DiffusionConfig(block_size=8).block_size_at(123) == 8


def test_compute_nelbo_uses_the_steps_block_size_and_its_interval(model):
    from pipeline.diffusion.objective import DiffusionConfig, compute_nelbo
    from tests.pipeline.diffusion.reference import tokens

    intervals = {4: (0.45, 0.95), 16: (0.3, 0.8)}
    cfg = DiffusionConfig(block_size=[4, 16], noise_interval=intervals, seed=2, stratify_group=4)
    x = tokens(4, 32, seed=3)
    ids = torch.arange(4)
    seen = set()
    with torch.no_grad():
        for step in range(6):
            bs = cfg.block_size_at(step)
            out = compute_nelbo(model, x, cfg, ids, step=step)
            single = DiffusionConfig(block_size=bs, noise_interval=intervals[bs], seed=2, stratify_group=4)
            ref = compute_nelbo(model, x, single, ids, step=step)
            assert out.block_size == bs and out.t.shape == (4, 32 // bs)
            assert torch.equal(out.t, ref.t) and torch.equal(out.n_masked, ref.n_masked)
            assert torch.equal(out.nelbo_sum, ref.nelbo_sum)
            beta, omega = intervals[bs]
            assert out.t.min() >= beta and out.t.max() <= omega
            seen.add(bs)
    assert seen == {4, 16}


@pytest.mark.parametrize("interval", [(0.45, 0.95), (0.3, 0.8), (0.25, 0.75)])
def test_an_interval_allowing_one_masked_count_warns(interval):
    import warnings

    from pipeline.diffusion.objective import DiffusionConfig

    with pytest.warns(UserWarning, match="block size 2 allows only 1 of 2 tokens masked"):
        DiffusionConfig(block_size=[2, 4], noise_interval=interval)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiffusionConfig(block_size=[4, 16], noise_interval=interval)  # several counts at 4 and 16
        DiffusionConfig(block_size=2, noise_interval=interval, resample=False)  # no conditioning
