"""Attention masks of block diffusion as pure predicates on (query, key) indices.

Every mask is one function ``allowed(q, k) -> bool tensor`` written with tensor ops only, so the
same code builds a dense boolean matrix (``q[:, None]``, ``k[None, :]`` broadcast) for SDPA and
serves as a FlexAttention ``mask_mod`` (scalar index tensors). Kinds (paper notation: L tokens,
blocks of L' = ``block_size``):

- ``ar``: causal over L positions (after ``cache_len`` cached keys, all visible).
- ``mdlm``: fully bidirectional over L positions (BD3 with L' = L).
- ``block_causal``: blk(k) <= blk(q) over L positions: the attention of decoding, written out for a
  whole sequence of clean blocks followed by the block being denoised (the no-cache reference).
- ``bd3_train``: the vectorized training input concat(x_t, x_0) of 2L positions. Allowed is the OR of
  block-diagonal (same half, same block), offset block-causal (q in x_t, k in x_0, blk(k) < blk(q))
  and block-causal (both in x_0, blk(k) <= blk(q)). x_0 never attends to x_t.
- ``bd3_decode``: a block of queries attending to ``cache_len`` cached clean tokens and
  bidirectionally within itself.

``lookahead`` implements DiffuLLaMA attention annealing inside a block: key k of the same block is
visible to query q only if pos(k) - pos(q) <= lookahead (0: causal, block_size - 1 or None:
bidirectional). Optional per-document masking (packed rows) ANDs ``doc(q) == doc(k)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("ar", "mdlm", "block_causal", "bd3_train", "bd3_decode")


@dataclass(frozen=True)
class AttentionMask:
    """Which attention pattern a forward pass uses. Hashable: it keys the block-mask caches.

    Attributes:
        kind: one of ``KINDS``.
        block_size: L' (tokens per block); ignored by ``ar`` and ``mdlm``.
        lookahead: in-block look-ahead for attention annealing; None means bidirectional.
        cache_len: number of cached keys before the queries (``ar`` and ``bd3_decode`` with a KV cache).
    """

    kind: str = "ar"
    block_size: int = 1
    lookahead: int | None = None
    cache_len: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attention kind {self.kind!r} is not one of {KINDS}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.lookahead is not None and self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 or None, got {self.lookahead}")

    @property
    def bidirectional_in_block(self) -> bool:
        return self.lookahead is None or self.lookahead >= self.block_size - 1


AR = AttentionMask("ar")


def _in_block_visible(qpos, kpos, lookahead):
    if lookahead is None:
        return torch.ones_like(qpos == kpos)
    return (kpos - qpos) <= lookahead


def mask_predicate(mask: AttentionMask, seq_len: int):
    """Return ``allowed(q, k)`` for ``mask`` where ``seq_len`` is L (queries of one half).

    For ``bd3_train`` indices run over 2L positions; for ``bd3_decode`` q runs over the block's
    queries and k over ``cache_len + n_queries`` keys; otherwise both run over L.
    """
    bs = mask.block_size
    la = mask.lookahead
    if mask.kind == "ar":
        n = mask.cache_len
        return lambda q, k: k <= q + n
    if mask.kind == "mdlm":
        if la is None:
            return lambda q, k: torch.ones_like(q == k)
        return lambda q, k: _in_block_visible(q, k, la)
    if mask.kind == "block_causal":
        return lambda q, k: (k // bs < q // bs) | ((k // bs == q // bs) & _in_block_visible(q, k, la))
    if mask.kind == "bd3_decode":
        n = mask.cache_len
        return lambda q, k: (k < n) | _in_block_visible(q, k - n, la)

    L = seq_len

    def bd3_train(q, k):
        q_noisy = q < L
        k_noisy = k < L
        qpos = torch.where(q_noisy, q, q - L)
        kpos = torch.where(k_noisy, k, k - L)
        qb = qpos // bs
        kb = kpos // bs
        same_block = (q_noisy == k_noisy) & (qb == kb) & _in_block_visible(qpos, kpos, la)
        offset_block_causal = q_noisy & ~k_noisy & (kb < qb)
        block_causal = ~q_noisy & ~k_noisy & (kb < qb)
        return same_block | offset_block_causal | block_causal

    return bd3_train


def dense_mask(mask: AttentionMask, n_queries: int, n_keys: int, seq_len: int, device=None) -> torch.Tensor:
    """Boolean (n_queries, n_keys) matrix, True where attention is allowed."""
    q = torch.arange(n_queries, device=device)[:, None]
    k = torch.arange(n_keys, device=device)[None, :]
    return mask_predicate(mask, seq_len)(q, k)


def document_ids(doc_starts: torch.Tensor) -> torch.Tensor:
    """Per-position document index (B, L) from a boolean (B, L) tensor marking document starts.

    Position 0 always opens a (possibly continued) document, so ids start at 0 on every row.
    """
    starts = doc_starts.clone()
    starts[:, 0] = False
    return torch.cumsum(starts.long(), dim=1)


def check_block_size(seq_len: int, block_size: int, key: str = "block_size") -> None:
    """Fixed-length BD3 needs L' to divide L; raise with what to change otherwise."""
    if block_size < 1 or seq_len % block_size:
        divisors = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if seq_len % d == 0]
        raise ValueError(
            f"{key}={block_size} does not divide the sequence length {seq_len}; "
            f"choose a divisor such as {divisors[-6:]}"
        )
