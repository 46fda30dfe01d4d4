"""Random access to the packed rows written by ``data_prep`` (MDS), without Composer.

A row comes out as ``input_ids`` (L,) int64, ``doc_starts`` (L,) bool and ``dataset_index`` (its index
in the split); ``RowReader.batches`` stacks rows into ``input_ids`` (b, L), ``doc_starts`` (b, L) and
``sample_index`` (b,), which fixes each row's evaluation noise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


def packed_rows_dataset_class():
    """``PackedRowsDataset``: a ``StreamingDataset`` of packed rows as tensors (streaming imported lazily)."""
    from streaming import StreamingDataset

    from data_prep.mds import doc_starts_from_column

    class PackedRowsDataset(StreamingDataset):
        """A ``StreamingDataset`` of packed rows yielding tensors (see the module docstring)."""

        def __init__(self, *, seq_len: int, **kwargs):
            # `orig` partitioning: the layout ``global_batch_positions`` relies on (the default
            # `relaxed` reorders samples when resuming on a different number of nodes).
            super().__init__(partition_algo="orig", **kwargs)
            self.seq_len = seq_len

        def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
            row = super().get_item(sample_id, retry)
            tokens = row["tokens"]
            if tokens.shape != (self.seq_len,):
                raise ValueError(
                    f"row {sample_id} has {tokens.shape[0]} tokens but the manifest says seq_len {self.seq_len}; "
                    "the shards and manifest.json disagree: re-run data_prep"
                )
            starts = np.zeros(self.seq_len, dtype=bool)
            starts[doc_starts_from_column(row["doc_starts"], self.seq_len)] = True
            return {
                "input_ids": torch.from_numpy(tokens.astype(np.int64)),
                "doc_starts": torch.from_numpy(starts),
                "dataset_index": sample_id,
            }

    return PackedRowsDataset


class RowReader:
    """Rows of one split, read through ``streaming.StreamingDataset`` (local folder)."""

    def __init__(self, data: str | Path, split: str = "val"):
        folder, self.manifest = split_dir(data, split)
        if self.manifest is not None:
            self.seq_len = int(self.manifest["seq_len"])
        else:
            from streaming import StreamingDataset

            self.seq_len = int(len(StreamingDataset(local=str(folder), batch_size=1)[0]["tokens"]))
        self.dataset = packed_rows_dataset_class()(
            seq_len=self.seq_len, local=str(folder), split=None, shuffle=False, batch_size=1
        )

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
            rows = [self.dataset[i] for i in chunk]
            yield {
                "input_ids": torch.stack([r["input_ids"] for r in rows]),
                "doc_starts": torch.stack([r["doc_starts"] for r in rows]),
                "sample_index": torch.tensor(list(chunk), dtype=torch.long),
            }
