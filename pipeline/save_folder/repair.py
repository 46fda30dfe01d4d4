"""Before and between checkpoints: the checks of a save_folder, the repair of a killed run's folder and
the rotation of DeepSpeed partitions.

A kill at any instant leaves ``.partial`` files, a ``deepspeed/ba{N}.partial`` tag, a Composer file
without its partitions or a latest symlink that names something older (or missing); at start, before
Composer looks for its autoresume checkpoint, ``repair_save_folder`` points ``latest-rank0.pt`` at the
newest *complete* checkpoint and removes the rest (``repair_remote_save_folder`` for a bucket).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from pipeline.save_folder.layout import (
    LATEST,
    WRITE_PROBE,
    composer_checkpoints,
    ds_folder,
    ds_owner_batch,
    ds_tag,
    is_remote,
    partial_file,
    partial_tag,
    write_probe,
)
from pipeline.save_folder.remote import delete_remote, remote_checkpoints, remove_autoresume_copy

log = logging.getLogger(__name__)


def repair_save_folder(folder: str | Path, deepspeed: bool) -> int | None:
    """Make ``latest-rank0.pt`` point at the newest complete checkpoint; drop partial writes.

    Call on global rank 0 before the Trainer is built (shared filesystem). A checkpoint is complete
    when its Composer file (or sharded folder with ``.metadata``) exists and, with ``deepspeed``, so
    does ``deepspeed/ba{N}``. A ``latest-rank0.pt`` that points at something else that exists (a name
    ``composer_checkpoints`` does not parse) is left alone. Returns the batch resumed from (None: unknown or none).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for p in folder.glob(partial_file("*")):
        log.warning("removing the partial checkpoint file %s (a run was killed while writing it)", p)
        p.unlink(missing_ok=True)
    ds_dir = ds_folder(folder)
    if ds_dir.is_dir():
        for p in ds_dir.glob(partial_tag("*")):
            log.warning("removing the partial DeepSpeed checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
    files = composer_checkpoints(folder)
    complete = sorted(b for b in files if not deepspeed or (ds_dir / ds_tag(b)).is_dir())
    latest = folder / LATEST
    current = os.readlink(latest) if latest.is_symlink() else None
    if current is not None and not latest.exists():
        log.warning("%s points to the missing %s: removing it", latest, current)
        latest.unlink()
        current = None
    if not complete:
        return None
    batch = complete[-1]
    target = files[batch].name
    known = {p.name: b for b, p in files.items()}
    if current is not None and current not in known:
        log.info("%s points to %s: left as it is", latest, current)
        return None
    if current != target:
        log.warning("pointing %s at %s, the newest complete checkpoint", latest, target)
        tmp = folder / partial_file(LATEST)
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, latest)
    for b, p in composer_checkpoints(folder, complete=False).items():
        if b > batch:  # a sharded folder without .metadata, or a file without its DeepSpeed half
            log.warning("removing %s: an incomplete checkpoint cannot be resumed from", p)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    return batch


def repair_remote_save_folder(uri: str) -> list[int]:
    """Delete what a killed run left beyond the latest symlink (s3:// only): checkpoints and DeepSpeed
    partitions of later batches, which the resumed run will write again. Returns their batches."""
    if not uri.startswith("s3://"):
        return []
    found, latest = remote_checkpoints(uri)
    newer = (lambda b: True) if latest is None else (lambda b: b > latest)
    return delete_remote(uri, found, newer, newer)


def rotate_deepspeed_partitions(folder: Path, keep_batch: int) -> None:
    """Rank 0 removes DeepSpeed tags whose Composer file is gone (Composer rotated it), keeping ``keep_batch``."""
    alive = set(composer_checkpoints(folder)) | {keep_batch}
    for p in ds_folder(folder).glob("ba*"):
        batch = ds_owner_batch(p.name)  # a tag, or the universal checkpoint converted from it
        if batch is not None and p.is_dir() and batch not in alive:
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_bytes(num_params: int, deepspeed: bool) -> int:
    """A lower bound on one checkpoint's size: fp32 weights + Adam's two moments (+ bf16 copy, DS)."""
    return num_params * (14 if deepspeed else 12)


def check_save_folder(folder: str | Path, need_bytes: int, probe_name: str = WRITE_PROBE) -> str | None:
    """None when ``folder`` can be created and written and has room for ``need_bytes``; else what is wrong.

    Writes and removes a small probe file (so a read-only mount, a missing permission or a full
    disk shows up before training, not at the first checkpoint hours later).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / probe_name
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or e}): choose a folder this job can write, or fix its permissions"
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        return (
            f"{folder} has {free / 2**20:.1f} MiB free but one checkpoint needs about "
            f"{need_bytes / 2**20:.1f} MiB: free space there or point save_folder elsewhere"
        )
    return None


def prepare_save_folder(
    save_folder: str | None,
    model_config,
    *,
    deepspeed: bool,
    autoresume: bool,
    local_rank: int,
    global_rank: int,
    node_rank: int,
) -> str | None:
    """A process's part of getting ``save_folder`` ready, before the Trainer exists; what is wrong
    with a local one (None: fine, or not this process's to check).

    Local rank 0 of each node removes a stale autoresume copy of a remote save_folder, or probes a
    local one (every node writes there under DeepSpeed) for room for one checkpoint of a
    ``model_config`` model; with ``autoresume``, global rank 0 repairs what a killed run left.
    """
    from pipeline.model import BD3LM

    local = save_folder is not None and not is_remote(save_folder)
    problem = None
    if local_rank == 0:
        if save_folder and not local:
            remove_autoresume_copy(save_folder)  # stale: the bucket's latest symlink decides
        if local:
            with torch.device("meta"):
                n = sum(p.numel() for p in BD3LM(model_config).parameters())
            problem = check_save_folder(save_folder, checkpoint_bytes(n, deepspeed), write_probe(node_rank))
    if problem is None and local and autoresume and global_rank == 0:
        repair_save_folder(save_folder, deepspeed=deepspeed)
    if save_folder and not local and autoresume and global_rank == 0:
        removed = repair_remote_save_folder(save_folder)
        if removed:
            log.info("removed the unfinished checkpoints of batches %s from %s", removed, save_folder)
    return problem
