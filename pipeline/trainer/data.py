"""Training data: MDS rows of packed tokens (written by ``data_prep``) as batches for the BD3 objective.

A data folder holds ``train/`` and ``val/`` MDS datasets (columns ``tokens``: uint16/uint32 array of
``seq_len``; ``doc_starts``: uint32 positions where documents start in the row, ``[seq_len]`` for none)
and ``manifest.json`` (see ``data_prep.mds`` for the row contract).

Batches are dicts: ``input_ids`` int64 (b, L), ``doc_starts`` bool (b, L), ``dataset_index`` int64 (b,)
(the row's index in its split; it seeds the noise of evaluation). The trainer adds ``sample_index``
(the row's position in the training stream, the noise id of training) and ``step``.

A mixture (``streams``) is one ``StreamingDataset`` of several Streaming ``Stream``s: Streaming draws
each stream's share of every epoch and shuffles the rows of all streams together.

Deterministic resumption: the DataLoader's dataset *is* the ``StreamingDataset``, so Composer saves
``dataset.state_dict`` in every checkpoint and loads it on resume (``State._dataset_of``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.rows import machine_lock, packed_rows_dataset_class

log = logging.getLogger(__name__)

_SHM_DIR = Path("/dev/shm")
# A job that starts creates its memory, then maps it; in between nobody maps it. Segments younger than
# this are never taken for a killed job's (a restarted job gets here seconds after the kill at best).
_NEW_SEGMENT_AGE_S = 3.0
_ORPHAN_LOCK_AGE_S = 60.0  # a Streaming lock file without memory this old belongs to no starting job


def _age_s(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _mapped_shm_names() -> set[str]:
    """Names under /dev/shm that some live process has mapped (from /proc/*/maps)."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process exited, or is not ours to read
            continue
        for line in text.splitlines():
            i = line.find("/dev/shm/")
            if i >= 0:
                names.add(line[i + len("/dev/shm/") :].split(" ")[0])
    return names


def clean_stale_streaming_memory(*, lock: bool = True) -> list[str]:
    """Remove Streaming's shared memory left by killed jobs; returns the names removed.

    Runs under ``pipeline.rows.machine_lock`` (``lock=False``: the caller holds it), so no job of this
    pipeline registers its memory meanwhile and two clean-ups never share the work.

    A job killed as a whole (preemption, the OOM killer, a lost node: Python's resource tracker dies
    with it) leaves ``/dev/shm/NNNNNN_*`` segments and ``$TMPDIR/NNNNNN_*_filelock`` files behind.
    Streaming skips every such prefix, so on a long-lived node they pile up in RAM, and a segment
    whose lock file is gone makes the next job fail with FileExistsError. A prefix is stale when no
    live process maps any of its segments and none of them is new (a job starting beside this one
    creates its memory an instant before it maps it), so jobs running or starting on the node are
    never touched (unlike ``streaming.base.util.clean_stale_shared_memory``, which removes
    everything). Linux only; call on one process per node before any dataset exists.
    """
    if not _SHM_DIR.is_dir() or not Path("/proc/self/maps").exists():
        return []
    if lock:
        with machine_lock():
            return clean_stale_streaming_memory(lock=False)
    from pipeline.streaming_seams import LOCK_FILE_NAME, SHARED_MEMORY_NAME

    groups: dict[str, list[Path]] = {}
    for p in _SHM_DIR.iterdir():
        m = SHARED_MEMORY_NAME.match(p.name)
        if m:
            groups.setdefault(m.group(1), []).append(p)
    now = time.time()
    live = _mapped_shm_names() if groups else set()
    stale = {
        prefix
        for prefix, files in groups.items()
        if not any(f.name in live for f in files) and all(_age_s(f, now) > _NEW_SEGMENT_AGE_S for f in files)
    }
    doomed = [f for prefix in sorted(stale) for f in groups[prefix]]
    # File locks Streaming leaves in the temp dir: stale with their segments, or with none left at all.
    # (Streaming skips every prefix that has one, so they pile up over killed runs.) A lock with no
    # segment may also be a job on this node that is starting now (it takes the lock, then creates
    # its memory): such a lock is left alone until it is _ORPHAN_LOCK_AGE_S old.
    for p in Path(tempfile.gettempdir()).glob("[0-9]*_*_filelock"):
        m = LOCK_FILE_NAME.match(p.name)
        if m and (m.group(1) in stale or (m.group(1) not in groups and _age_s(p, now) > _ORPHAN_LOCK_AGE_S)):
            doomed.append(p)
    removed = []
    for f in doomed:
        try:
            os.unlink(f)
            removed.append(f.name)
        except FileNotFoundError:
            pass
        except OSError as e:  # another user's file: leave it
            log.debug("cannot remove %s: %s", f, e)
    if removed:
        log.warning(
            "removed %d stale Streaming shared-memory segments / locks of killed runs (%s%s)",
            len(removed),
            ", ".join(removed[:4]),
            ", ..." if len(removed) > 4 else "",
        )
    return removed


def read_manifest(folder: str | Path, remote: str | None = None) -> dict[str, Any]:
    """data_prep's manifest of a data folder; with ``remote``, the remote's manifest (fetched into
    ``folder`` every time: a manifest left in the cache by an earlier run must not hide a remote that
    has none).

    Raises ``data_prep.DataPrepError`` when the folder is not a finished data_prep output, or when the
    remote has no manifest (one line naming the URL).
    """
    from data_prep import DataPrepError
    from data_prep.manifest import MANIFEST
    from data_prep.manifest import read_manifest as read_local

    if remote:
        from streaming.base.storage import CloudDownloader

        from data_prep.verify import is_missing_object

        url = f"{remote.rstrip('/')}/{MANIFEST}"
        path = Path(folder) / MANIFEST
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{MANIFEST}.{os.getpid()}")
        try:
            CloudDownloader.direct_download(url, str(partial))
        except Exception as e:  # botocore, gcs, oci... each raises its own: one line naming the URL
            partial.unlink(missing_ok=True)
            reason = "not found" if is_missing_object(e) else f"cannot be read ({type(e).__name__})"
            raise DataPrepError(
                f"{url} {reason}: the remote holds no finished data_prep output; convert the data there "
                f"first (python -m data_prep convert ... --out {remote.rstrip('/')}) or fix the URL"
            ) from None
        os.replace(partial, path)
    return read_local(folder)


def global_batch_positions(
    device_batch_size: int, world_size: int, local_world_size: int, node_rank: int, local_rank: int
) -> torch.Tensor:
    """(b,) int64: where this rank's samples sit inside the global batch (0 .. global batch - 1).

    Streaming's ``orig`` partition deals the global sample stream to nodes round-robin, and each
    node's share to its ranks round-robin (``get_partitions_orig``: ``reshape(-1, nodes).T`` then
    ``reshape(nodes, -1, ranks_per_node)``). The j-th sample of a device batch on (node n, local
    rank r) is therefore stream sample ``j * world + r * nodes + n`` of its global batch, whatever
    the number of DataLoader workers. Adding ``state.timestamp.sample`` (samples of all earlier
    global batches) gives the sample's global stream index: the same for any world size.
    """
    nodes = world_size // local_world_size
    return torch.arange(device_batch_size, dtype=torch.long) * world_size + local_rank * nodes + node_rank


def dataset_location(section) -> dict[str, Any]:
    """The ``StreamingDataset`` arguments that say where a loader section's rows are: ``local``/
    ``remote``/``split`` of one folder, or one ``streaming.Stream`` per stream of a mixture (in the
    YAML's order, which is the order of their rows in the dataset) and the mixture's ``epoch_size``."""
    if not section.is_mixture:
        return dict(local=section.local, remote=section.remote, split=section.split)
    from streaming import Stream

    streams = [
        Stream(
            local=s.local,
            remote=s.remote,
            split=s.split,
            proportion=s.proportion,
            repeat=s.repeat,
            choose=s.choose,
        )
        for s in section.resolved_streams("loader")
    ]
    return dict(streams=streams, epoch_size=section.epoch_size)


def build_dataloader(section, *, seq_len: int, batch_size: int):
    """A Composer ``DataSpec`` over one split: a torch DataLoader whose dataset is the StreamingDataset.

    Args:
        section: a ``TrainLoaderSection``/``EvalLoaderSection`` of the config.
        batch_size: rows per device batch (global batch / world size for training).
    """
    from composer.core import DataSpec
    from torch.utils.data import DataLoader

    try:
        dataset = packed_rows_dataset_class()(
            **dataset_location(section),
            sampling_method=section.sampling_method,
            shuffle_algo=section.shuffle_algo,
            shuffle_block_size=section.shuffle_block_size,
            shuffle=section.shuffle,
            shuffle_seed=section.shuffle_seed,
            predownload=section.predownload,
            num_canonical_nodes=section.num_canonical_nodes,
            batch_size=batch_size,
            seq_len=seq_len,
            validate_hash=section.validate_hash,
        )
    except FileExistsError as e:  # (jobs of this pipeline starting at once take pipeline.rows' lock)
        raise RuntimeError(
            f"{e}: stale shared memory from a crashed streaming job, or a Streaming job of another "
            "program that started at the same moment; start again, or remove the /dev/shm/NNNNNN_* "
            "files that no running job uses"
        ) from e
    workers = section.num_workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=section.drop_last,
        pin_memory=section.pin_memory,
        prefetch_factor=section.prefetch_factor if workers > 0 else None,
        persistent_workers=section.persistent_workers and workers > 0,
    )
    return DataSpec(
        loader,
        get_num_samples_in_batch=lambda batch: batch["input_ids"].shape[0],
        get_num_tokens_in_batch=lambda batch: batch["input_ids"].numel(),
    )
