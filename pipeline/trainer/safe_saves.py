"""Crash-safe checkpoints: the Composer hooks that make a kill at any instant leave the latest
complete checkpoint loadable.

Composer 0.32.1 writes ``ep{E}-ba{N}-rank0.pt`` in place, then removes and recreates the
``latest-rank0.pt`` symlink; a SIGKILL in between leaves a truncated file or no symlink (autoresume
would then start from batch 0, or refuse the "conflicting" newer file). Here:

- every checkpoint file is written to ``.partial.<name>`` and renamed when complete
  (``atomic_checkpoint_files``); DeepSpeed partitions go to ``deepspeed/ba{N}.partial`` and are
  renamed to ``ba{N}`` once every rank has written its part;
- DeepSpeed tags are rotated only after Composer's own file of the same batch exists;
- no checkpoint is written while any parameter is NaN/Inf (``check_finite_parameters``).

At start, before Composer looks for its autoresume checkpoint, ``pipeline.save_folder`` repairs what
a killed run left (``repair_save_folder``). Composer's names used here are reached through
``pipeline.trainer.seams``; a Trainer whose checkpoint saver cannot be found does not train.

``PIPELINE_TEST_FAULTS`` (tests only) kills the process at named points of a save, e.g.
``kill@composer_tmp:10`` = SIGKILL after batch 10's file is written but before its rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import torch

from pipeline.save_folder import (
    REMOTE_LATEST,
    batch_of,
    composer_checkpoints,
    ds_tag,
    is_remote,
    partial_file,
    partial_tag,
    rotate_deepspeed_partitions,
    rotate_remote_checkpoints,
    upload_ds_tag,
)

log = logging.getLogger(__name__)


# -- test-only fault injection --------------------------------------------------------------------
def test_fault(point: str, batch: int, rank: int | None = None) -> bool:
    """True when ``PIPELINE_TEST_FAULTS`` names ``point`` at ``batch`` (and rank, if given there).

    Entries are comma separated ``action@point:batch[:rank]``; ``kill`` entries SIGKILL this process
    right here, other actions are returned to the caller to act on. Unset in normal use.
    """
    spec = os.environ.get("PIPELINE_TEST_FAULTS")
    if not spec:
        return False
    for entry in spec.split(","):
        action, _, where = entry.strip().partition("@")
        name, *rest = where.split(":")
        if name != point or not rest or int(rest[0]) != batch:
            continue
        if len(rest) > 1 and rank is not None and int(rest[1]) != rank:
            continue
        if action == "kill":
            log.warning("test fault: SIGKILL at %s, batch %d", point, batch)
            os.kill(os.getpid(), signal.SIGKILL)
        return True
    return False


# -- shared save folders across nodes --------------------------------------------------------
def node_unique_signal_files() -> None:
    """Give each node its own name for Composer's "local rank 0 is done" signal file.

    Composer 0.32.1 broadcasts one name from rank 0 (``._signal_file_node0_XXXXXX``) and every
    node's local rank 0 writes, waits on and deletes that file in ``save_folder``. On a folder shared
    by several nodes the second delete fails (FileNotFoundError at autoresume), or a node stops
    waiting early. Appending the node rank keeps the collective (the broadcast) and separates them.
    """
    from composer.utils import dist

    from pipeline.trainer.seams import node_signal_file_namer, set_node_signal_file_namer

    if getattr(node_signal_file_namer(), "_per_node", False):
        return
    shared_name = node_signal_file_namer()

    def per_node(rng=None) -> str:
        return f"{shared_name(rng)}_of_node{dist.get_node_rank()}"

    per_node._per_node = True
    set_node_signal_file_namer(per_node)


# -- atomic files ---------------------------------------------------------------------------------
def atomic_checkpoint_files() -> None:
    """Make Composer write each checkpoint file under a temporary name and rename it when complete."""
    from pipeline.trainer.seams import checkpoint_file_writer, set_checkpoint_file_writer

    if getattr(checkpoint_file_writer(), "_atomic", False):
        return
    write = checkpoint_file_writer()

    def write_then_rename(state_dict, filename: str) -> None:
        path = Path(filename)
        tmp = path.with_name(partial_file(path.name))
        write(state_dict, str(tmp))  # the suffix (compression, tar) is kept
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        batch = batch_of(path.name)
        if batch is not None:
            test_fault("composer_tmp", batch)
        os.replace(tmp, path)

    write_then_rename._atomic = True
    set_checkpoint_file_writer(write_then_rename)


# -- DeepSpeed partitions ---------------------------------------------------------------------
def save_deepspeed_partitions(engine, ds_dir: Path, batch: int, remote: str | None = None) -> None:
    """Every rank writes its ZeRO partition to ``ba{N}.partial``; rank 0 renames it to ``ba{N}`` (collective).

    With a ``remote`` save_folder, ``ds_dir`` is this rank's local staging folder: each rank writes
    its files there, uploads them to ``remote/deepspeed/ba{N}/`` and deletes them; the barrier after
    it lets Composer write its file (and then the latest symlink) only once every partition is in
    the bucket, so a tag without its Composer file is never resumed from.
    """
    from composer.utils import dist

    tag = ds_tag(batch)
    if remote is not None:
        engine.save_checkpoint(str(ds_dir), tag=tag, save_latest=False)
        upload_ds_tag(remote, ds_dir, tag)
        shutil.rmtree(ds_dir / tag, ignore_errors=True)
        test_fault("deepspeed_upload", batch, dist.get_global_rank())
        dist.barrier()  # every rank's partition is in the bucket
        return
    engine.save_checkpoint(str(ds_dir), tag=partial_tag(tag), save_latest=False)
    test_fault("deepspeed_tmp", batch, dist.get_global_rank())
    dist.barrier()  # every partition is on disk
    if dist.get_global_rank() == 0:
        final = ds_dir / tag
        if final.exists():  # left by a run killed before its Composer file was written
            shutil.rmtree(final)
        os.replace(ds_dir / partial_tag(tag), final)
    dist.barrier()


# -- never save non-finite weights ------------------------------------------------------------
class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or parameter; the message says where to resume from."""


def check_finite_parameters(model: torch.nn.Module, batch: int, save_folder: str | None) -> None:
    """Raise ``NonFiniteError`` on every rank when any rank holds a NaN/Inf parameter (collective).

    Under ZeRO-3 each rank checks its own partition (``ds_tensor``).
    """
    from composer.utils import dist

    from pipeline.trainer.seams import zero3_partition

    bad = False
    with torch.no_grad():
        for p in model.parameters():
            t = zero3_partition(p)
            t = p if t is None else t
            if hasattr(t, "to_local"):  # FSDP2 DTensor: this rank's shard
                t = t.to_local()
            if t.numel() and not torch.isfinite(t).all():
                bad = True
                break
    flag = torch.tensor([float(bad)], device=next(model.parameters()).device)
    dist.all_reduce(flag, reduce_operation="MAX")
    if flag.item() > 0:
        raise NonFiniteError(
            f"parameters are NaN/Inf after batch {batch}: not writing a checkpoint. {resume_hint(save_folder)}"
        )


def resume_hint(save_folder: str | None) -> str:
    """Where the last good checkpoint is, in words, for error messages."""
    if not save_folder:
        return "No save_folder is set, so there is no checkpoint to resume from."
    files = composer_checkpoints(save_folder) if not is_remote(save_folder) else {}
    if not files:
        return f"No checkpoint in {save_folder} yet."
    batch = max(files)
    return (
        f"The last good checkpoint is {files[batch]} (batch {batch}); rerun with autoresume: true to "
        "continue from it (lower optimizer.lr or check the data first)."
    )


def install_safe_saves(trainer, save_folder: str | None, ds_dir: Path | None = None) -> None:
    """Wrap the Trainer's checkpoint saver: finite check, DeepSpeed partitions first, rotation last.

    Raises ``pipeline.seams.SeamError`` when the Trainer's saver cannot be found.
    """
    from composer.utils import dist

    from pipeline.trainer.seams import checkpoint_saver, saver_save_step, set_saver_save_step

    saver = checkpoint_saver(trainer, save_folder)
    if saver is None:
        return
    composer_save = saver_save_step(saver)
    local = save_folder is not None and not is_remote(save_folder)

    def save(state, logger):
        batch = int(state.timestamp.batch)
        check_finite_parameters(state.model, batch, save_folder)
        if ds_dir is not None:
            save_deepspeed_partitions(trainer.ds_engine, ds_dir, batch, None if local else save_folder)
        composer_save(state, logger)
        test_fault("after_save", batch)
        if ds_dir is not None and local and dist.get_global_rank() == 0 and saver.num_checkpoints_to_keep > 0:
            rotate_deepspeed_partitions(Path(save_folder), batch)

    set_saver_save_step(saver, save)
    if save_folder is not None and is_remote(save_folder):
        _install_remote_rotation(saver, save_folder, dist.get_global_rank() == 0)


class RemoteSaveError(RuntimeError):
    """Writing a checkpoint to a remote save_folder failed after the retries of boto3/Composer."""


def _install_remote_rotation(saver, save_folder: str, rank_zero: bool) -> None:
    """Composer rotates only its local staging copies of a remote save_folder: rank 0 deletes the
    remote checkpoints beyond ``save_num_checkpoints_to_keep`` once the latest symlink names a newer
    complete one (after each save, and at the end of fit once every upload has finished). Any
    failure of the object store while saving becomes one ``RemoteSaveError``."""
    from pipeline.trainer.seams import (
        saver_save_step,
        set_saver_save_step,
        set_symlink_upload_wait,
        upload_on_threads,
    )

    upload_on_threads(saver)
    # Composer polls for a finished upload every 30 s before writing the latest symlink; a short
    # run would spend most of its time waiting.
    set_symlink_upload_wait(saver, 1.0)
    keep = saver.num_checkpoints_to_keep if rank_zero else 0
    composer_save, composer_batch_end, composer_fit_end = (
        saver_save_step(saver),
        saver.batch_end,
        saver.fit_end,
    )

    def guarded(step):
        def run(state, logger):
            try:
                step(state, logger)
            except (NonFiniteError, RemoteSaveError):
                raise
            except Exception as e:
                cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise RemoteSaveError(
                    f"saving to {save_folder} failed after retries ({type(e).__name__}: {cause}); the "
                    f"checkpoint its {REMOTE_LATEST} names is still complete: rerun the same "
                    "command (autoresume) once the object store is reachable"
                ) from e

        return run

    def save(state, logger):
        composer_save(state, logger)
        rotate_remote_checkpoints(save_folder, keep)

    def fit_end(state, logger):
        composer_fit_end(state, logger)
        if saver.remote_uploader is not None:
            saver.remote_uploader.wait()  # the latest symlink's upload
        rotate_remote_checkpoints(save_folder, keep)

    set_saver_save_step(saver, guarded(save))
    saver.batch_end, saver.fit_end = guarded(composer_batch_end), guarded(fit_end)


def safe_trainer_class():
    """``SafeTrainer``: Composer's ``Trainer`` with crash-safe checkpoint writes (Composer imported lazily)."""
    from composer import Trainer

    class SafeTrainer(Trainer):
        """Composer's Trainer with crash-safe checkpoint writes (see ``safe_saves``)."""

        def __init__(self, *, save_folder=None, **kwargs):
            super().__init__(save_folder=save_folder, **kwargs)
            install_safe_saves(self, save_folder)

    return SafeTrainer
