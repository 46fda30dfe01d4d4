"""Random access to the packed rows written by ``data_prep`` (MDS), without Composer.

A row comes out as ``input_ids`` (L,) int64, ``doc_starts`` (L,) bool and ``dataset_index`` (its index
in the split); ``RowReader.batches`` stacks rows into ``input_ids`` (b, L), ``doc_starts`` (b, L) and
``sample_index`` (b,), which fixes each row's evaluation noise. Streaming's private names are reached
through ``pipeline.streaming_seams``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.manifest import INDEX, MANIFEST

log = logging.getLogger(__name__)


def split_dir(data: str | Path, split: str) -> tuple[Path, dict | None]:
    """The MDS folder of ``split`` and the data_prep manifest when there is one."""
    root = Path(data)
    manifest = root / MANIFEST
    if manifest.exists():
        folder = root / split
        if not (folder / INDEX).exists():
            raise FileNotFoundError(f"{root} has no finished split {split!r} ({folder}/{INDEX} missing)")
        return folder, json.loads(manifest.read_text())
    if (root / INDEX).exists():
        return root, None
    raise FileNotFoundError(
        f"{root} is neither a data_prep output ({MANIFEST}) nor an MDS folder ({INDEX}); "
        "run `python -m data_prep convert` first"
    )


class ShardReadError(RuntimeError):
    """A shard that failed while rows were read (damaged or deleted after start, a failed download).

    The message is one line: the shard, what went wrong and the fix. A DataLoader worker's error comes
    back re-raised with the worker's traceback around it; ``one_line`` recovers the line.
    """

    FIX = (
        "check the data with `python -m data_prep verify DIR`; delete a damaged decompressed copy "
        "(Streaming recreates it from the .zstd file) or prepare or copy the data again"
    )

    @staticmethod
    def one_line(error: BaseException) -> str:
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        return last.split("ShardReadError: ", 1)[-1]


PREFIX_LOCK = "bd3-pipeline-streaming-prefix.lock"  # in the temporary directory, machine-wide


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """The machine-wide file lock (``PREFIX_LOCK`` in the temporary directory) under which jobs of this
    pipeline register Streaming's shared memory and clean up what killed jobs left: held by this
    process while inside. Without access to the file (another user's) it goes without."""
    import fcntl
    import tempfile

    try:
        fd = os.open(Path(tempfile.gettempdir()) / PREFIX_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


@contextlib.contextmanager
def shm_prefix_lock() -> Iterator[None]:
    """Around the creation of a ``StreamingDataset`` by every rank of a job: each node's local leader
    (``LOCAL_RANK`` 0, or a single process) holds ``machine_lock``, and the other ranks start only
    once it holds it.

    Streaming finds a free shared-memory prefix, then its local leader creates it; each of the other
    ranks looks for the free prefix on its own, before that. Two jobs starting at the same moment on
    one machine could both find the same prefix (one then fails with ``FileExistsError``), or a rank
    could look before another job took a prefix and its leader after, so that the rank attaches to
    the other job's memory ("shared memory registered does not match local leader"; both seen with
    two tests starting at once). With the lock held from before any rank of the node looks until
    its leader has created the prefix, no other job of this pipeline takes one in between. The
    other ranks take no lock themselves (they would wait for their own leader, which waits for them).
    """
    import torch.distributed as dist

    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    together = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    with machine_lock() if leader else contextlib.nullcontext():
        if together:
            dist.barrier()  # every leader of the job holds its node's lock: the other ranks may look
        yield


# Over 60 lines on purpose: a class factory (Streaming imported lazily): its length is the class's methods.
def packed_rows_dataset_class():
    """``PackedRowsDataset``: a ``StreamingDataset`` of packed rows as tensors (streaming imported lazily)."""
    from streaming import StreamingDataset
    from streaming.base.hashing import get_hash

    from data_prep.mds import doc_starts_from_column
    from pipeline.streaming_seams import (
        fail_preparing_shard,
        resume_state_present,
        shard_files,
        shard_of_sample,
    )

    class PackedRowsDataset(StreamingDataset):
        """A ``StreamingDataset`` of packed rows yielding tensors (see the module docstring).

        A shard that cannot be read raises ``ShardReadError`` naming it. ``validate_hash`` (an
        algorithm recorded in the index, e.g. "sha1") turns on Streaming's check of compressed and
        downloaded files and, since Streaming never re-checks a decompressed file it finds on disk, a
        check of each shard's decompressed file on its first read in this process.
        """

        def __init__(self, *, seq_len: int, validate_hash: str | None = None, **kwargs):
            # `orig` partitioning: the layout ``global_batch_positions`` relies on (the default
            # `relaxed` reorders samples when resuming on a different number of nodes).
            with shm_prefix_lock():
                super().__init__(partition_algo="orig", validate_hash=validate_hash, **kwargs)
            self.seq_len = seq_len
            self.hash_algo = validate_hash
            self._hashed: set[int] = set()  # shards whose decompressed file this process checked
            self._prepare_error: ShardReadError | None = None
            self._loaded_state: dict[str, Any] | None = None

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._loaded_state = dict(obj)  # written again if its shared memory vanishes (__iter__)

        def shard_path(self, shard_id: int) -> str:
            """The shard's stored file (its compressed file when it has one)."""
            reader = self.shards[shard_id]
            raw, zipped = shard_files(reader)
            return os.path.join(reader.dirname, reader.split, (zipped or raw).basename)

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            try:
                super().prepare_shard(shard_id, blocking)
            except Exception as e:  # runs in Streaming's prefetch thread too: keep the shard's name
                fail_preparing_shard(self, shard_id)
                self._prepare_error = ShardReadError(
                    f"shard {self.shard_path(shard_id)}: {type(e).__name__}: {e}; {ShardReadError.FIX}"
                )
                raise self._prepare_error from e

        def on_exception(self, future) -> None:
            try:
                super().on_exception(future)  # (sets the event that stops the other threads)
            except ShardReadError:
                # The reading thread raises it (``_prepare_error``); re-raised here, concurrent.futures
                # would log it again at any moment, e.g. after training's last line.
                pass

        def __iter__(self):
            # Streaming keeps a loaded resume state in shared memory under a name and reads it by name
            # when the epoch starts; without it the epoch silently starts again from its first row.
            # Another program cleaning /dev/shm (Streaming's own clean_stale_shared_memory removes
            # every job's) takes it from a running job: write it again from the checkpoint's copy.
            if self._loaded_state is not None and not resume_state_present(self):
                log.warning(
                    "Streaming's resume state of this dataset was removed from shared memory while the "
                    "job ran (another program cleaning /dev/shm?); written again from the checkpoint"
                )
                super().load_state_dict(self._loaded_state)
            yield from super().__iter__()
            # Streaming ends the epoch early, without an error, when its prefetch thread failed.
            if self._prepare_error is not None:
                raise self._prepare_error

        def _check_decompressed(self, shard_id: int) -> None:
            reader = self.shards[shard_id]
            raw = shard_files(reader)[0]
            path = os.path.join(reader.dirname, reader.split, raw.basename)
            if os.path.isfile(path):  # else Streaming makes it now, checking the file it comes from
                with open(path, "rb") as f:
                    digest = get_hash(self.hash_algo, f.read())
                if digest != (raw.hashes or {}).get(self.hash_algo):
                    raise ShardReadError(
                        f"shard file {path}: its {self.hash_algo} hash does not match the index; "
                        f"{ShardReadError.FIX}"
                    )
            self._hashed.add(shard_id)

        def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
            shard_id = shard_of_sample(self, sample_id)
            try:
                if self.hash_algo and shard_id not in self._hashed:
                    self._check_decompressed(shard_id)
                row = super().get_item(sample_id, retry)
            except ShardReadError:
                raise
            except Exception as e:
                if self._prepare_error is not None:  # "Background thread failed": say which shard
                    raise self._prepare_error from e
                raise ShardReadError(
                    f"shard {self.shard_path(shard_id)} (row {sample_id}): {type(e).__name__}: {e}; "
                    f"{ShardReadError.FIX}"
                ) from e
            tokens = row["tokens"]
            if tokens.shape != (self.seq_len,):
                raise ShardReadError(
                    f"shard {self.shard_path(shard_id)}: row {sample_id} has {tokens.shape[0]} tokens but the "
                    f"manifest says seq_len {self.seq_len}; the shards and manifest.json disagree: re-run data_prep"
                )
            starts = np.zeros(self.seq_len, dtype=bool)
            starts[doc_starts_from_column(row["doc_starts"], self.seq_len)] = True
            return {
                "input_ids": torch.from_numpy(tokens.astype(np.int64)),
                "doc_starts": torch.from_numpy(starts),
                "dataset_index": sample_id,
            }

    return PackedRowsDataset


def stack_rows(rows: Sequence[dict[str, Any]], sample_index: Sequence[int]) -> dict[str, torch.Tensor]:
    """An evaluation batch of rows read from a split: ``input_ids`` (b, L) int64, ``doc_starts``
    (b, L) bool and ``sample_index`` (b,) int64, each row's noise id (its index in the split)."""
    return {
        "input_ids": torch.stack([torch.as_tensor(r["input_ids"]) for r in rows]),
        "doc_starts": torch.stack([torch.as_tensor(r["doc_starts"]) for r in rows]),
        "sample_index": torch.tensor([int(i) for i in sample_index], dtype=torch.long),
    }


class RowReader:
    """Rows of one split, read through ``streaming.StreamingDataset`` (local folder)."""

    def __init__(self, data: str | Path, split: str = "val"):
        folder, self.manifest = split_dir(data, split)
        if self.manifest is not None:
            self.seq_len = int(self.manifest["seq_len"])
        else:
            from streaming import StreamingDataset

            with shm_prefix_lock():
                peek = StreamingDataset(local=str(folder), batch_size=1)
            self.seq_len = int(len(peek[0]["tokens"]))
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
            yield stack_rows([self.dataset[i] for i in chunk], chunk)
