"""Cutting a stream of documents (each ending with EOS) into rows of exactly seq_len tokens.

No padding: a document that does not fit continues on the next row. Each row carries the
positions where a document begins inside it. The tokens left over after the last full row
(fewer than seq_len) are the carry; they start the next row, or are dropped at the end of a split.
"""

from __future__ import annotations

import numpy as np


class RowPacker:
    """Packs batches of documents into (rows, seq_len) arrays, keeping the carry between calls."""

    def __init__(
        self,
        seq_len: int,
        dtype: str,
        carry_tokens: np.ndarray | list[int] | None = None,
        carry_doc_starts: np.ndarray | list[int] | None = None,
    ):
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.carry_tokens = np.asarray(carry_tokens if carry_tokens is not None else [], dtype=self.dtype)
        self.carry_doc_starts = np.asarray(
            carry_doc_starts if carry_doc_starts is not None else [], dtype=np.int64
        )
        if len(self.carry_tokens) >= seq_len:
            raise ValueError(f"carry of {len(self.carry_tokens)} tokens does not fit below seq_len {seq_len}")

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Append documents (`tokens` = their concatenation, `lengths` = tokens per document).

        Returns (rows, doc_starts): rows is (n, seq_len) of the packer's dtype; doc_starts[r] is the
        sorted int64 array of positions in [0, seq_len) where a document begins in row r
        (possibly empty: a row inside one long document). See `add_flat` for the same without a
        list per row.
        """
        rows, starts, counts = self.add_flat(tokens, lengths)
        return rows, np.split(starts, start_bounds(counts)[1:-1]) if len(rows) else []

    def add_flat(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `add`, with the document starts of all rows concatenated: (rows, starts, counts).

        counts[r] starts belong to row r (`start_bounds`); starts are row-relative positions, int64.
        No work per row.
        """
        L = self.seq_len
        carry = len(self.carry_tokens)
        stream = np.concatenate([self.carry_tokens, tokens.astype(self.dtype, copy=False)])
        starts = np.concatenate([self.carry_doc_starts, carry + np.cumsum(lengths) - lengths])
        n_rows = len(stream) // L
        cut = n_rows * L
        rows = stream[:cut].reshape(n_rows, L)
        inside = int(np.searchsorted(starts, cut))  # the starts that fall in full rows
        row_of = starts[:inside] // L
        counts = np.bincount(row_of, minlength=n_rows).astype(np.int64)
        self.carry_tokens = stream[cut:].copy()
        self.carry_doc_starts = starts[inside:] - cut
        return rows, starts[:inside] - row_of * L, counts


def start_bounds(counts: np.ndarray) -> np.ndarray:
    """(n + 1,) int64 from the (n,) starts per row of `RowPacker.add_flat`: row r's document
    starts are starts[bounds[r] : bounds[r + 1]] of its flat starts."""
    return np.concatenate([[0], np.cumsum(counts)])
