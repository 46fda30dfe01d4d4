"""Noise of the absorbing (masked) diffusion: block times t and the masked copy x_t.

Every random draw is a pure function of (seed, noise id), where the noise id of a sample is its
global index in the stream of training samples. Splitting a global batch over any number of
processes therefore gives every sample the same t and the same mask (no per-rank seeding).

t is stratified over a group of ``group_size`` consecutive noise ids x their blocks (one global
batch when the trainer passes the global batch size): the group's G * B slots take the strata
0..G*B-1 in a random permutation, so t spreads over the interval within every sequence
(a row-major assignment would give each sequence nearly constant t).
"""

from __future__ import annotations

import torch

EVAL_INTERVAL = (1e-3, 1.0)
MIN_T = 1e-3  # 1/t weights stay finite; the evaluation bound uses U[1e-3, 1] as in BD3-LM

_STREAM_STRATA, _STREAM_OFFSET, _STREAM_MASK = 1, 2, 3
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


def sample_masks(
    noise_ids: torch.Tensor, t: torch.Tensor, block_size: int, seed: int, protect: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean (b, L) mask: token l of block k is masked with probability t[:, k].

    ``protect`` (b, L) marks tokens that are never masked (the first token of every row, and of
    every document with per-document masking).
    """
    b, n_blocks = t.shape
    L = n_blocks * block_size
    u = torch.stack([torch.rand(L, generator=_generator(seed, _STREAM_MASK, i)) for i in noise_ids.tolist()])
    masked = u < t.repeat_interleave(block_size, dim=1)
    if protect is not None:
        masked &= ~protect.cpu()
    return masked
