"""The Monte Carlo NELBO is unbiased: its mean over many noise draws equals the exact expectation.

For a tiny row the expectation is computed exactly: per block, enumerate every mask M of the block's
n free positions (the row's first token is never masked), with probability t^|M| (1-t)^(n-|M|), and
integrate the (1/t)-weighted masked cross-entropy over t ~ U[beta, omega] on a fine midpoint grid.
Blocks add up: block b's loss conditions on the clean blocks < b and on its own noise only.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.diffusion.noise import EVAL_INTERVAL
from pipeline.diffusion.objective import DiffusionConfig, compute_nelbo
from tests.pipeline.diffusion.reference import block_token_ce, tokens

N_DRAWS = 6_000


def exact_nelbo(model, x0, block_size, shift, interval) -> float:
    """E_{t ~ U[beta, omega] per block, mask ~ Bernoulli(t)} of the row's NELBO sum (float64)."""
    L = x0.shape[1]
    beta, omega = interval
    n_grid = 200_000
    grid = beta + (omega - beta) * (torch.arange(n_grid, dtype=torch.float64) + 0.5) / n_grid
    total = 0.0
    for b in range(L // block_size):
        free = [p for p in range(b * block_size, (b + 1) * block_size) if p != 0]
        n = len(free)
        subsets = [s for k in range(n + 1) for s in itertools.combinations(free, k)]
        masked = torch.zeros(len(subsets), L, dtype=torch.bool)
        for i, s in enumerate(subsets):
            masked[i, list(s)] = True
        ce = block_token_ce(model, x0.expand(len(subsets), L), masked, block_size, b, shift)
        ce_masked = (ce * masked[:, b * block_size : (b + 1) * block_size].double()).sum(1)
        for i, s in enumerate(subsets):
            k = len(s)
            if k == 0:
                continue  # nothing masked: loss 0
            # Mean over the grid = (1/(omega-beta)) * integral of t^k (1-t)^(n-k) / t dt.
            prob_over_t = (grid ** (k - 1) * (1 - grid) ** (n - k)).mean().item()
            total += prob_over_t * ce_masked[i].item()
    return total


@pytest.mark.parametrize(
    "length,block_size,shift,interval",
    [
        (5, 5, True, EVAL_INTERVAL),  # MDLM, 4 scored positions, 16 masks
        (5, 5, False, EVAL_INTERVAL),
        (6, 3, True, EVAL_INTERVAL),  # two blocks, each with its own stratified t
        (6, 3, True, (0.3, 0.8)),  # a clipped training interval
    ],
)
def test_monte_carlo_nelbo_is_unbiased(model, length, block_size, shift, interval):
    x0 = tokens(1, length, seed=9)
    exact = exact_nelbo(model, x0, block_size, shift, interval)

    # The exact value enumerates independent per-token masks: BD3-LM's resampling (conditioning each
    # block's masked fraction) is another law, tested in test_resample.py.
    cfg = DiffusionConfig(
        block_size=block_size, shift=shift, noise_interval=interval, resample=False, seed=4, stratify_group=1
    )
    with torch.no_grad():
        out = compute_nelbo(model, x0.expand(N_DRAWS, length), cfg, torch.arange(N_DRAWS))
    draws = out.nelbo_sum.double()
    mc = draws.mean().item()
    se = (draws.std() / N_DRAWS**0.5).item()
    # Rows are i.i.d. draws (stratify_group=1, distinct noise ids), so the sample std over sqrt(N) is
    # the standard error of the mean; the per-row variance is finite (E[1/t] ~ log(1000) for
    # t ~ U[1e-3, 1]). A 4-standard-error band fails by chance with probability ~6e-5 (and the
    # seeds are fixed). With se < 3% of the value (about 1.5% here), a bias above ~6-12% (a wrong weight such as
    # 1/t^2 or 1, masking with probability != t, a wrong interval mapping) is caught.
    assert se < 0.03 * exact, (se, exact)
    assert abs(mc - exact) < 4 * se, (mc, exact, se)
