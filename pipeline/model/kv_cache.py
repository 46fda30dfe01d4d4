"""Preallocated per-layer key/value cache for block-by-block decoding.

Keys are stored after rotary embedding at their absolute positions. Past ``capacity`` the oldest
tokens are evicted (a sliding window): rotary attention depends only on position differences, so
kept keys stay valid and new tokens keep counting positions upward.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of clean tokens, shape (layers, B, H_kv, capacity, hd) each."""

    def __init__(self, num_layers, batch_size, num_kv_heads, head_dim, capacity, dtype, device):
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # valid cached tokens
        self.next_position = 0  # absolute rotary position of the next token written
        self.evicted = 0

    def get(self, layer: int, extra: int = 0):
        """Views of the cached keys/values of ``layer`` plus ``extra`` staged tokens."""
        n = self.length + extra
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stage this layer's new keys/values (B, H_kv, n, hd) after the valid ones."""
        n = k.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(
                f"KV cache full ({self.length} + {n} > {self.capacity} tokens): call make_room({n}) first"
            )
        self.k[layer, :, :, self.length : self.length + n] = k.to(self.k.dtype)
        self.v[layer, :, :, self.length : self.length + n] = v.to(self.v.dtype)

    def advance(self, n: int) -> None:
        """Commit the n tokens staged by ``put`` in every layer."""
        self.length += n
        self.next_position += n

    def make_room(self, n: int) -> None:
        """Evict the oldest tokens so that cache plus ``n`` new tokens fit in ``capacity``."""
        if n > self.capacity:
            raise ValueError(f"a block of {n} tokens does not fit a KV cache of capacity {self.capacity}")
        drop = self.length + n - self.capacity
        if drop > 0:
            keep = self.length - drop
            self.k[:, :, :, :keep] = self.k[:, :, :, drop : self.length].clone()
            self.v[:, :, :, :keep] = self.v[:, :, :, drop : self.length].clone()
            self.length = keep
            self.evicted += drop

    def reset(self) -> None:
        self.length = self.next_position = self.evicted = 0
