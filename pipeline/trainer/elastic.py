"""Resuming a DeepSpeed run on another number of processes: DeepSpeed's universal checkpoint.

Each rank of a ZeRO run saves only its own partition of the optimizer state (and, under ZeRO-3, of
the weights), and DeepSpeed refuses to load partitions written by another data-parallel world size.
When the latest checkpoint's partition count differs from the world size, its tag ``ba{N}`` is
converted once by DeepSpeed's own ``ds_to_universal`` into ``ba{N}.universal`` (per-parameter fp32
weights, Adam moments and step, beside the tag) and loaded with DeepSpeed's ``load_universal``: each
rank slices its new partition out of the full tensors. The conversion writes to
``ba{N}.universal.partial`` and renames it when complete, so a kill during it leaves the partitions
as they were and the next start converts again (``repair_save_folder`` removes the partial folder).

Who converts: global rank 0 into a local (shared) save_folder, where every rank reads it; with a
remote save_folder, local rank 0 of each node downloads every partition of the tag and converts it
into a node-local folder (``ds_node_staging``): the same bytes are read from the bucket as if a
converted copy were uploaded and read back, and nothing new is written to the bucket.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.save_folder import (
    download_ds_tag,
    ds_node_staging,
    partial_tag,
    remote_ds_tag_files,
    universal_tag,
    zero_partitions,
)
from pipeline.trainer.safe_saves import test_fault

log = logging.getLogger(__name__)


class UniversalConversionError(RuntimeError):
    """DeepSpeed could not convert a checkpoint's partitions for another world size (one line)."""


def saved_partitions(ds_dir: Path | None, tag: str, remote: str | None) -> int:
    """How many data-parallel ranks wrote the ZeRO checkpoint ``tag`` (0: it has no partitions)."""
    if remote is not None:
        return zero_partitions(remote_ds_tag_files(remote, tag))
    folder = None if ds_dir is None else ds_dir / tag
    return zero_partitions(os.listdir(folder)) if folder is not None and folder.is_dir() else 0


def convert_to_universal(tag_dir: Path, batch: int | None = None) -> Path:
    """Convert the ZeRO partitions in ``tag_dir`` into ``{tag_dir}.universal`` beside it, unless that
    exists (complete: it is only ever renamed into place). Returns its path.

    Runs DeepSpeed's ``ds_to_universal`` in this process (its own printing goes to the debug log); a
    failure is a ``UniversalConversionError`` naming the tag and DeepSpeed's reason.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = tag_dir.with_name(universal_tag(tag_dir.name))
    if out.is_dir():
        return out
    work = tag_dir.with_name(partial_tag(out.name))
    shutil.rmtree(work, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(work),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our engines write no client-side universal info
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal(args)
    except Exception as e:
        shutil.rmtree(work, ignore_errors=True)
        log.debug("ds_to_universal printed:\n%s", printed.getvalue())
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UniversalConversionError(
            f"DeepSpeed cannot convert {tag_dir} into a universal checkpoint ({type(e).__name__}: {reason}); "
            f"resume on the number of processes that wrote it, or convert it by hand with `python -m "
            f"deepspeed.checkpoint.ds_to_universal --input_folder {tag_dir} --output_folder {out}`"
        ) from e
    log.debug("ds_to_universal printed:\n%s", printed.getvalue())
    if batch is not None:
        test_fault("universal", batch)
    os.replace(work, out)
    return out


def universal_source(ds_dir: Path | None, tag: str, remote: str | None, batch: int) -> tuple[Path, str]:
    """(load_dir, tag) of the universal checkpoint of ``tag`` for every rank (collective): converted
    here if missing, by global rank 0 (local save_folder) or each node's local rank 0 (remote)."""
    from composer.utils import dist

    converter = dist.get_local_rank() == 0 if remote is not None else dist.get_global_rank() == 0
    load_dir = ds_node_staging(remote) if remote is not None else ds_dir
    error, seconds = None, 0.0
    if converter:
        start = time.perf_counter()
        try:
            if remote is not None and not (load_dir / universal_tag(tag)).is_dir():
                shutil.rmtree(load_dir, ignore_errors=True)  # older conversions of this node
                download_ds_tag(remote, tag, load_dir)  # every rank's partition
                convert_to_universal(load_dir / tag, batch)
                shutil.rmtree(load_dir / tag)
            else:
                convert_to_universal(load_dir / tag, batch)
        except UniversalConversionError as e:
            error = str(e)
        seconds = time.perf_counter() - start
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise UniversalConversionError(errors[0])
    if converter and seconds:
        log.info("universal checkpoint %s ready in %.1f s", load_dir / universal_tag(tag), seconds)
    return load_dir, universal_tag(tag)


# -- a requeued run that already finished -----------------------------------------------------------
def run_is_complete(state) -> bool:
    """Whether the Trainer's (resumed) state already reached ``max_duration``: a scheduler requeued a
    finished run, or its command was run again."""
    limit = state.max_duration
    return limit is not None and limit <= state.timestamp.get(limit.unit)


def completion_line(cfg, state) -> str:
    """One line: the run is complete at batch N, and where its last checkpoint is."""
    from pipeline.save_folder import LATEST, is_remote, remote_checkpoints

    where = "no save_folder"
    if cfg.save_folder and is_remote(cfg.save_folder):
        found, latest = remote_checkpoints(cfg.save_folder)
        if latest in found:
            where = f"{cfg.save_folder.rstrip('/')}/{Path(found[latest].rstrip('/')).name}"
    elif cfg.save_folder:
        latest = Path(cfg.save_folder) / LATEST
        where = str(latest.resolve()) if latest.exists() else str(cfg.save_folder)
    return (
        f"run {cfg.run_name} is complete: it reached max_duration {state.max_duration} at batch "
        f"{int(state.timestamp.batch)}; its last checkpoint is {where} (raise max_duration to train on)"
    )
