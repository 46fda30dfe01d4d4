"""Noise of the absorbing (masked) diffusion: block times t and the masked copy x_t.

Every random draw is a pure function of (seed, noise id), where the noise id of a sample is its
global index in the stream of training samples. Splitting a global batch over any number of
processes therefore gives every sample the same t and the same mask (no per-rank seeding).

t is stratified over a group of ``group_size`` consecutive noise ids x their blocks (one global
batch when the trainer passes the global batch size): the group's G * B slots take the strata
0..G*B-1 in a random permutation, so t spreads over the interval within every sequence
(a row-major assignment would give each sequence nearly constant t).

Clipped schedule (BD3-LM's ``training.resample``): with t_b in [beta, omega] and independent
per-token masks, the realized masked fraction of a block often falls outside [beta, omega]
(42.7% of blocks at L'=4 with [0.45, 0.95]). BD3-LM redraws such a block's mask until its
fraction k / L' lies in [beta, omega]. Given t and the L' positions of the block, that
loop returns a mask of k tokens with probability Binomial(k; n, t) / P(K) for k in the allowed set
K, the k positions uniform among the n. ``sample_masks`` draws from exactly that distribution
without a loop: a block whose first draw already fits keeps it; any other block draws k from the
binomial truncated to K (inverse CDF, one extra uniform per block from its own stream) and masks
the k positions with the smallest per-token uniforms. Both cases together give every fitting mask
S the probability t^|S| (1-t)^(n-|S|) / P(K), the loop's law (n = L'). As in BD3-LM, protected
positions (a row's first token) are drawn and counted like the others and unmasked afterwards.
"""

from __future__ import annotations

import math

import torch

MIN_T = 1e-3  # 1/t weights stay finite; the evaluation bound uses U[1e-3, 1] as in BD3-LM
EVAL_INTERVAL = (MIN_T, 1.0)

_STREAM_STRATA, _STREAM_OFFSET, _STREAM_MASK, _STREAM_COUNT, _STREAM_BLOCK_SIZE = 1, 2, 3, 4, 5
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64-style hash of integers to a 63-bit seed (deterministic across processes)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h >> 1


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_mix(seed, stream, index))
    return g


def sample_block_size(sizes: list[int], weights: list[float] | None, seed: int, step: int) -> int:
    """One of ``sizes`` (probabilities proportional to ``weights``, default uniform) for ``step``.

    A pure function of (seed, step): every rank and microbatch of an optimizer step, and a resumed
    run, draw the same block size.
    """
    w = torch.tensor(weights if weights is not None else [1.0] * len(sizes), dtype=torch.float64)
    u = torch.rand(1, generator=_generator(seed, _STREAM_BLOCK_SIZE, step), dtype=torch.float64)
    i = int((w.cumsum(0) <= u * w.sum()).sum().clamp(max=len(sizes) - 1))
    return sizes[i]


def sample_block_times(
    noise_ids: torch.Tensor,
    n_blocks: int,
    interval: tuple[float, float],
    seed: int,
    group_size: int = 1,
) -> torch.Tensor:
    """Stratified t for every block: (b, n_blocks) float32 in [max(beta, MIN_T), omega].

    Args:
        noise_ids: (b,) global sample indices (int64).
        interval: the clipped interval [beta, omega] (training) or EVAL_INTERVAL.
        group_size: consecutive noise ids stratified together (the global batch size).
    """
    beta, omega = interval
    if not 0.0 <= beta < omega <= 1.0:
        raise ValueError(f"noise interval must satisfy 0 <= beta < omega <= 1, got [{beta}, {omega}]")
    n_slots = group_size * n_blocks
    perms: dict[int, torch.Tensor] = {}
    out = torch.empty(len(noise_ids), n_blocks, dtype=torch.float64)
    for row, nid in enumerate(noise_ids.tolist()):
        group, pos = divmod(nid, group_size)
        if group not in perms:
            perms[group] = torch.randperm(n_slots, generator=_generator(seed, _STREAM_STRATA, group))
        strata = perms[group][pos * n_blocks : (pos + 1) * n_blocks].double()
        u = torch.rand(n_blocks, generator=_generator(seed, _STREAM_OFFSET, nid), dtype=torch.float64)
        out[row] = beta + (omega - beta) * (strata + u) / n_slots
    return out.clamp_(min=MIN_T).float()


def clipped_counts(interval: tuple[float, float], block_size: int) -> tuple[int, int]:
    """Masked counts k of one block allowed by the clipped interval: k / L' in [beta, omega].

    Returns (k_min, k_max). As in BD3-LM, beta <= 1e-3 sets no lower bound and omega = 1 no upper
    bound, so the evaluation interval [1e-3, 1] allows every count (0, L').
    """
    beta, omega = interval
    k_min = math.ceil(beta * block_size - 1e-9) if beta > MIN_T else 0
    k_max = min(math.floor(omega * block_size + 1e-9), block_size)
    return k_min, k_max


def truncated_binomial(
    n: torch.Tensor, t: torch.Tensor, k_min: int, k_max: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF draw of k ~ Binomial(n, t) conditioned on k_min <= k <= k_max (elementwise, int64).

    All arguments broadcast to one shape; ``u`` are uniforms in [0, 1) (float64). Requires
    k_min <= k_max <= n wherever the draw is used.
    """
    n, t, k_max = n.double(), t.double(), k_max.double()
    k = torch.arange(int(n.max().item()) + 1, dtype=torch.float64)
    n_, t_, hi = n[..., None], t[..., None], k_max[..., None]
    log_pmf = (
        torch.lgamma(n_ + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma((n_ - k).clamp(min=0) + 1)
        + torch.xlogy(k, t_)
        + torch.xlogy((n_ - k).clamp(min=0), 1 - t_)
    )
    allowed = (k >= k_min) & (k <= hi)
    pmf = torch.softmax(log_pmf.masked_fill(~allowed, float("-inf")), dim=-1)
    cdf = pmf.cumsum(-1)
    draw = (cdf <= u[..., None] * cdf[..., -1:]).sum(-1)
    return torch.minimum(draw.clamp(min=k_min), k_max.long())


def sample_masks(
    noise_ids: torch.Tensor,
    t: torch.Tensor,
    block_size: int,
    seed: int,
    protect: torch.Tensor | None = None,
    counts: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Boolean (b, L) mask: token l of block k is masked with probability t[:, k].

    ``protect`` (b, L) marks tokens that are never masked (the first token of every row, and of
    every document with per-document masking).
    ``counts`` = (k_min, k_max) (``clipped_counts``): every block's number of masked tokens is
    conditioned to lie in that range, BD3-LM's resampling (see the module docstring). As BD3-LM does
    with a row's first token, the count is conditioned over all L' positions of the block, protected
    ones included, and protected positions are unmasked afterwards (so a row's first block can end with
    fewer masked tokens than k_min).
    """
    b, n_blocks = t.shape
    L = n_blocks * block_size
    ids = noise_ids.tolist()
    u = torch.stack([torch.rand(L, generator=_generator(seed, _STREAM_MASK, i)) for i in ids])
    masked = u < t.repeat_interleave(block_size, dim=1)
    eligible = torch.ones(b, L, dtype=torch.bool) if protect is None else ~protect.cpu()
    if counts is None or counts == (0, block_size):
        return masked & eligible
    # As BD3-LM: the block's count is conditioned with every position drawn (protected ones included),
    # and protected positions are unmasked afterwards.
    k_min, k_max = counts
    shape = (b, n_blocks, block_size)
    have = masked.view(shape).sum(-1)
    redraw = (have < k_min) | (have > k_max)
    if redraw.any():
        v = torch.stack(
            [
                torch.rand(n_blocks, generator=_generator(seed, _STREAM_COUNT, i), dtype=torch.float64)
                for i in ids
            ]
        )
        n = torch.full((b, n_blocks), block_size)
        k = truncated_binomial(n, t, k_min, torch.full_like(n, k_max), v)
        # Ranks of the uniforms within the block: the k smallest form a uniform k-subset.
        rank = u.view(shape).argsort(-1).argsort(-1)
        masked = torch.where(redraw[..., None], rank < k[..., None], masked.view(shape)).view(b, L)
    return masked & eligible
