"""Random access to the packed rows written by ``data_prep`` (MDS), without Composer.

Each row is ``{"tokens": (L,) uint16/uint32, "doc_starts": (k,) uint32}``; batches are dicts with
``input_ids`` (b, L) int64, ``doc_starts`` (b, L) bool and ``sample_index`` (b,) int64.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch


def split_dir(data: str | Path, split: str) -> tuple[Path, dict | None]:
    """The MDS folder of ``split`` and the data_prep manifest when there is one."""
    root = Path(data)
    manifest = root / "manifest.json"
    if manifest.exists():
        folder = root / split
        if not (folder / "index.json").exists():
            raise FileNotFoundError(f"{root} has no finished split {split!r} ({folder}/index.json missing)")
        return folder, json.loads(manifest.read_text())
    if (root / "index.json").exists():
        return root, None
    raise FileNotFoundError(
        f"{root} is neither a data_prep output (manifest.json) nor an MDS folder (index.json); "
        "run `python -m data_prep convert` first"
    )


def rows_to_batch(rows: Sequence[dict], indices: Sequence[int]) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([np.asarray(r["tokens"], dtype=np.int64) for r in rows]))
    starts = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        starts[i, torch.from_numpy(np.asarray(r["doc_starts"], dtype=np.int64))] = True
    return {"input_ids": tokens, "doc_starts": starts, "sample_index": torch.tensor(list(indices), dtype=torch.long)}


class RowReader:
    """Rows of one split, read through ``streaming.StreamingDataset`` (local folder)."""

    def __init__(self, data: str | Path, split: str = "val"):
        from streaming import StreamingDataset

        folder, self.manifest = split_dir(data, split)
        self.dataset = StreamingDataset(local=str(folder), split=None, shuffle=False, batch_size=1)
        first = self.dataset[0]["tokens"]
        self.seq_len = int(len(first))
        if self.manifest and int(self.manifest.get("seq_len", self.seq_len)) != self.seq_len:
            raise ValueError(f"{folder}: rows have {self.seq_len} tokens but manifest.json says {self.manifest['seq_len']}")

    def __len__(self) -> int:
        # num_samples is the whole split; len() of a StreamingDataset is this rank's share.
        return int(self.dataset.num_samples)

    def check_vocab(self, model_vocab: int) -> None:
        tok = (self.manifest or {}).get("tokenizer", {})
        v = tok.get("vocab_size")
        if v is not None and v > model_vocab:
            raise ValueError(
                f"the data was tokenized with a {v}-token vocabulary but the model has {model_vocab} "
                "(before the mask token): evaluate with the tokenizer the model was trained with"
            )

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for s in range(0, len(indices), batch_size):
            chunk = indices[s : s + batch_size]
            yield rows_to_batch([self.dataset[i] for i in chunk], chunk)
