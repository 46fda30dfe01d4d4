"""The seams of MosaicML Streaming (0.13.0) this project uses, checked at import (``pipeline.seams``).

``pipeline.rows.PackedRowsDataset`` overrides ``StreamingDataset.prepare_shard`` and ``get_item`` to
name a damaged shard, ``on_exception`` so that a background thread's shard error is reported once (by
the reader), and ``load_state_dict`` so that a resume state removed from shared memory is written
again; it reads Streaming's shard bookkeeping through the functions below;
``pipeline.trainer.data`` removes the shared memory of killed jobs by the names Streaming gives it.
Import this module lazily (it imports ``streaming``: seconds), as its users do.
"""

from __future__ import annotations

import re

import streaming.base.constant as constant
import streaming.base.dataset as dataset_module

from pipeline.seams import Seam, check_seams

_DATASET = "streaming.base.dataset:StreamingDataset"


def _names_shared_memory_as_before(get_path) -> bool:
    return get_path(7, "locals") == "000007_locals"


def _keeps_resume_state_in_resume_shm(load_state_dict) -> bool:
    import inspect

    return re.search(r"\bself\._resume_shm\s*=(?!=)", inspect.getsource(load_state_dict)) is not None


SEAMS = [
    Seam(
        "streaming",
        "streaming.base.dataset",
        "_ShardState",
        "the shard states PREPARING and REMOTE: a shard that failed to download is marked REMOTE",
        probe=lambda states: hasattr(states, "PREPARING") and hasattr(states, "REMOTE"),
    ),
    Seam("streaming", _DATASET, "_shard_states", "each shard's download state", set_in="__init__"),
    Seam("streaming", _DATASET, "spanner", "the shard of a sample, named in errors", set_in="__init__"),
    Seam(
        "streaming",
        "streaming.base.format.base.reader:Reader",
        "file_pairs",
        "a shard's files, named in errors and hash-checked",
        set_in="__init__",
    ),
    Seam(
        "streaming",
        _DATASET,
        "prepare_shard",
        "overridden: a shard that fails to download raises ShardReadError",
        params=("self", "shard_id", "blocking"),
    ),
    Seam(
        "streaming",
        _DATASET,
        "on_exception",
        "overridden: a background thread's ShardReadError is not re-raised (and logged) in its callback",
        params=("self", "future"),
    ),
    Seam(
        "streaming",
        _DATASET,
        "load_state_dict",
        "overridden: the loaded resume state is kept, to write again if its shared memory "
        "(self._resume_shm, assigned there) is removed",
        params=("self", "obj"),
        probe=_keeps_resume_state_in_resume_shm,
    ),
    Seam(
        "streaming",
        _DATASET,
        "get_item",
        "overridden: rows as tensors, a damaged shard raises ShardReadError",
        params=("self", "sample_id", "retry"),
    ),
    Seam(
        "streaming",
        _DATASET,
        "sample_offset_per_stream",
        "where each stream's rows start in a mixture (per-stream evaluation)",
        set_in="__init__",
    ),
    Seam(
        "streaming", _DATASET, "samples_per_stream", "the rows of each stream of a mixture", set_in="__init__"
    ),
    Seam(
        "streaming",
        "streaming.base.shared.prefix",
        "_get_path",
        "the shared-memory names NNNNNN_<name> of stale segments",
        params=("prefix_int", "name"),
        probe=_names_shared_memory_as_before,
    ),
    Seam("streaming", "streaming.base.constant", "SHM_TO_CLEAN", "the shared-memory segment names"),
    Seam("streaming", "streaming.base.constant", "BARRIER_FILELOCK", "a lock file name of stale runs"),
    Seam("streaming", "streaming.base.constant", "CACHE_FILELOCK", "a lock file name of stale runs"),
]

check_seams(SEAMS, __name__)

# Streaming's shared memory (/dev/shm) and its lock files (temp dir): NNNNNN_<name>, NNNNNN the
# prefix of one dataset group (``streaming.base.shared.prefix._get_path``).
SHARED_MEMORY_NAME = re.compile(rf"^(\d{{6}})_({'|'.join(map(re.escape, constant.SHM_TO_CLEAN))})$")
_LOCKS = (constant.BARRIER_FILELOCK, constant.CACHE_FILELOCK)
LOCK_FILE_NAME = re.compile(rf"^(\d{{6}})_({'|'.join(map(re.escape, _LOCKS))})$")


def fail_preparing_shard(dataset, shard_id: int) -> None:
    """After ``prepare_shard`` raised: mark the shard REMOTE if Streaming left it PREPARING, so that
    every later reader (another worker, the next retry) fails too instead of waiting for it forever."""
    states = dataset_module._ShardState
    if dataset._shard_states[shard_id] == states.PREPARING:
        dataset._shard_states[shard_id] = states.REMOTE


def shard_files(reader):
    """(raw, zipped) ``FileInfo`` of a shard's reader (zipped None when the shard is not compressed)."""
    return reader.file_pairs[0]


def shard_of_sample(dataset, sample_id: int) -> int:
    """The shard that holds sample ``sample_id`` of a ``StreamingDataset``."""
    return int(dataset.spanner[sample_id][0])


def stream_rows(dataset) -> list[range]:
    """The sample ids of each stream of a ``StreamingDataset``, in stream order (one range per stream)."""
    offsets, counts = dataset.sample_offset_per_stream, dataset.samples_per_stream
    return [range(int(o), int(o) + int(n)) for o, n in zip(offsets, counts)]


def resume_state_present(dataset) -> bool:
    """Whether the shared memory that holds a dataset's loaded resume state (``load_state_dict``) still
    exists under its name, where Streaming looks for it when an epoch starts."""
    from streaming.base.shared.memory import SharedMemory

    try:
        shm = SharedMemory(name=dataset._resume_shm.shm.name, create=False, auto_cleanup=False)
    except FileNotFoundError:
        return False
    shm.cleanup()  # (attached, not created: closes it, unlinks nothing)
    return True
