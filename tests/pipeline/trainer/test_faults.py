"""Faults a long run must survive, with real processes: SIGKILL at a random batch or inside a
checkpoint write, a dying rank, NaN/Inf losses, an unwritable or full save_folder.

The reference of every kill test is the same command run once without faults. A resumed run must
log, for every batch, exactly the reference's rows (no row seen twice or skipped) and losses, and
end with the same weights.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.save_folder import composer_checkpoints
from pipeline.trainer import ConfigError, load_config, run
from pipeline.trainer.safe_saves import NonFiniteError
from tests.factories import REPO, YAMLS, tiny_overrides
from tests.pipeline.trainer.launch import (
    VARIANTS,
    assert_same_run,
    command,
    kill_a_rank_after,
    kill_group,
    last_batch,
    mixture,
    rank_logs,
    records,
    run_to_end,
    same_reference,
    started,
)


def kill_at_random_batch(cmd, env, out: Path, rng: random.Random, nproc: int) -> tuple[int, float]:
    """Start the run, SIGKILL one training process once the log passes a random batch.

    Returns (the batch it had logged, seconds the launcher took to exit after the kill).
    """
    # leaves 10 batches (with checkpoint writes) to land the kill in, even on a loaded machine
    target = rng.randint(2, 10)
    with started(cmd, env, out) as proc:
        # anywhere inside the next batch (or its checkpoint write)
        logged = kill_a_rank_after(proc, out, target, rng, max_delay=0.3, nproc=nproc)
        assert logged is not None, (out / "launcher.log").read_text()[-3000:] + rank_logs(out)
        t0 = time.monotonic()
        proc.wait(timeout=120)
        return logged, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", [pytest.param(v, marks=same_reference(v)) for v in VARIANTS])
def test_sigkill_at_a_random_batch_then_autoresume_matches(tiny_data, tmp_path, reference, variant, kill_rng):
    ref = reference(variant)
    nproc = VARIANTS[variant][0]
    cmd, env = command(tiny_data, tmp_path, variant)
    logged, exit_s = kill_at_random_batch(cmd, env, tmp_path, kill_rng, nproc)
    print(f"\n{variant}: killed after batch {logged}; the launcher exited {exit_s:.1f} s later")
    assert last_batch(tmp_path / "loss.jsonl") < 20, "finished before the kill"
    if nproc:  # the launcher notices the dead rank and stops the others: bounded, not a hang
        assert exit_s < 60
        assert "crashed" in (tmp_path / "launcher.log").read_text()
    p = run_to_end(cmd, env, tmp_path)  # the same command again (autoresume: true in the YAML)
    assert p.returncode == 0, p.stderr[-3000:] + rank_logs(tmp_path)
    assert_same_run(ref, tmp_path)


@same_reference("1proc")
@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_at_a_random_batch_with_data_and_checkpoints_on_s3_matches(
    tiny_data, tmp_path, reference, s3, kill_rng
):
    """The same kill with the mixture's stream ``a`` read from the S3 server (node cache; ``web`` stays
    local) and save_folder in it: the resumed run equals the uninterrupted local run, rows, losses and
    final weights. (ZeRO-2's, after
    a kill in the middle of an upload: test_object_storage.py.)"""
    from data_prep.remote import upload_tree

    variant = "1proc"
    ref = reference(variant)
    nproc = VARIANTS[variant][0]
    upload_tree(tiny_data[0], f"{s3.uri}/owt")
    cmd, env = command(
        tiny_data,
        tmp_path,
        variant,
        *mixture(tiny_data, local_a=tmp_path / "cache", remote_a=f"{s3.uri}/owt"),
        f"variables.save_folder={s3.uri}/runs/kill",
        "loggers.tensorboard=null",  # its default log dir is under the working directory
    )
    logged, _ = kill_at_random_batch(cmd, env, tmp_path, kill_rng, nproc)
    print(f"\n{variant} on S3: killed after batch {logged}; objects {sorted(s3.keys('runs/kill/'))}")
    assert last_batch(tmp_path / "loss.jsonl") < 20, "finished before the kill"
    p = run_to_end(cmd, env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:] + rank_logs(tmp_path)
    assert_same_run(ref, tmp_path)
    # (the mixture's epoch is 320 rows: batch 20 is still in epoch 0)
    assert s3.get("runs/kill/latest-rank0.pt.symlink").decode().endswith("ep0-ba20-rank0.pt")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "variant, fault, leftover",
    [
        # killed with the Composer file half written: latest still points at batch 6
        pytest.param(
            "1proc", "kill@composer_tmp:9", ".partial.ep0-ba9-rank0.pt", marks=same_reference("1proc")
        ),
        # killed after the file is complete, before anything else: resumes from batch 9 itself
        pytest.param("1proc", "kill@after_save:9", "ep0-ba9-rank0.pt", marks=same_reference("1proc")),
        # one rank killed while DeepSpeed partitions are written: ba9 stays .partial
        pytest.param(
            "zero2", "kill@deepspeed_tmp:9:1", "deepspeed/ba9.partial", marks=same_reference("zero2")
        ),
    ],
)
def test_sigkill_during_checkpoint_write_resumes_from_a_complete_checkpoint(
    tiny_data, tmp_path, reference, variant, fault, leftover
):
    ref = reference(variant)
    cmd, env = command(tiny_data, tmp_path, variant)
    p = run_to_end(cmd, env, tmp_path, fault=fault)
    assert p.returncode != 0
    assert (tmp_path / "ckpt" / leftover).exists()  # the kill really happened inside the save
    assert last_batch(tmp_path / "loss.jsonl") == 9
    p = run_to_end(cmd, env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:] + rank_logs(tmp_path)
    assert not list((tmp_path / "ckpt").rglob(".partial*")) and not list(
        (tmp_path / "ckpt").rglob("*.partial")
    )
    assert_same_run(ref, tmp_path)
    replayed = [r["batch"] for r in records(tmp_path / "loss.jsonl")].count(7)
    assert replayed == (2 if "tmp" in fault else 1)  # resumed from batch 6 only when batch 9 was partial


# -- in-process faults (1 process, fast) ------------------------------------------------------------
def tiny_cfg(tiny_data, out: Path, *extra: str):
    data, tok = tiny_data
    overrides = tiny_overrides(
        data, tok, out / "ckpt", "eval_loader=null", f"callbacks.loss_log.path={out}/loss.jsonl", *extra
    )
    return load_config(YAMLS / "bd3_tiny.yaml", overrides, world_size=1)


def test_missing_latest_symlink_resumes_from_the_newest_complete_checkpoint(tiny_data, tmp_path, one_thread):
    # The state a kill leaves between Composer's removal of latest-rank0.pt and its new symlink.
    run(tiny_cfg(tiny_data, tmp_path, "max_duration=6ba", "scheduler.t_max=9ba", "save_interval=3ba"))
    (tmp_path / "ckpt" / "latest-rank0.pt").unlink()
    run(tiny_cfg(tiny_data, tmp_path, "max_duration=9ba", "scheduler.t_max=9ba", "save_interval=3ba"))
    assert [r["batch"] for r in records(tmp_path / "loss.jsonl")] == list(range(1, 10))


def test_nan_loss_stops_before_the_update_and_names_the_checkpoint(
    tiny_data, tmp_path, one_thread, monkeypatch
):
    from pipeline.train import main

    monkeypatch.setenv("PIPELINE_TEST_FAULTS", "nan@nan_loss:8")
    data, tok = tiny_data
    args = tiny_overrides(
        data, tok, tmp_path / "ckpt", "eval_loader=null", "save_interval=3ba", "save_num_checkpoints_to_keep=-1",
        f"callbacks.loss_log.path={tmp_path}/loss.jsonl",
    )  # fmt: skip
    code = main([str(YAMLS / "bd3_tiny.yaml"), *args])
    assert code == 3
    ckpts = composer_checkpoints(tmp_path / "ckpt")
    assert sorted(ckpts) == [3, 6]  # nothing written at or after the bad batch
    assert [r["batch"] for r in records(tmp_path / "loss.jsonl")] == list(range(1, 8))
    blob = torch.load(ckpts[6], map_location="cpu", weights_only=False)
    assert all(torch.isfinite(t).all() for t in blob["state"]["model"].values())
    with pytest.raises(NonFiniteError, match=r"batch 8 .*ep0-ba6-rank0\.pt \(batch 6\).*autoresume"):
        run(tiny_cfg(tiny_data, tmp_path / "again", "save_interval=3ba"))


def test_nan_loss_skip_drops_exactly_that_update(tiny_data, tmp_path, one_thread, monkeypatch):
    common = ["nonfinite_loss=skip", "scheduler.t_max=20ba", "save_folder=null", "autoresume=false"]
    common += ["loggers.tensorboard=null"]
    monkeypatch.setenv("PIPELINE_TEST_FAULTS", "nan@nan_loss:5")
    skipped = run(tiny_cfg(tiny_data, tmp_path / "a", *common, "max_duration=5ba"))
    monkeypatch.delenv("PIPELINE_TEST_FAULTS")
    before = run(tiny_cfg(tiny_data, tmp_path / "b", *common, "max_duration=4ba"))
    losses = [r["loss/train/total"] for r in records(tmp_path / "a" / "loss.jsonl")]
    assert len(losses) == 5 and math.isnan(losses[4]) and all(math.isfinite(x) for x in losses[:4])
    got = skipped.state.model.model.state_dict()
    want = before.state.model.model.state_dict()
    for k in want:  # the batch with the NaN changed no weight
        assert torch.equal(got[k], want[k]), k
    # ... and training goes on afterwards with finite losses
    monkeypatch.setenv("PIPELINE_TEST_FAULTS", "nan@nan_loss:5")
    longer = run(tiny_cfg(tiny_data, tmp_path / "c", *common, "max_duration=8ba"))
    losses = [r["loss/train/total"] for r in records(tmp_path / "c" / "loss.jsonl")]
    assert all(math.isfinite(x) for x in losses[5:])
    assert all(torch.isfinite(p).all() for p in longer.state.model.parameters())


def test_nonfinite_weights_are_never_saved(tiny_data, tmp_path, one_thread):
    from composer.core import Callback

    from pipeline.trainer.build import build_trainer

    class PoisonAfter6(Callback):  # a corrupted update: weights become NaN with a finite loss
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == 6:
                with torch.no_grad():
                    next(state.model.parameters()).fill_(float("nan"))

    cfg = tiny_cfg(tiny_data, tmp_path, "save_interval=3ba", "save_num_checkpoints_to_keep=1")
    trainer = build_trainer(cfg)
    trainer.state.callbacks.insert(0, PoisonAfter6())
    with pytest.raises(NonFiniteError, match=r"after batch 6.*not writing.*ep0-ba3-rank0\.pt"):
        trainer.fit()
    trainer.close()
    assert sorted(composer_checkpoints(tmp_path / "ckpt")) == [3]
    assert os.readlink(tmp_path / "ckpt" / "latest-rank0.pt") == "ep0-ba3-rank0.pt"


def test_skip_is_refused_under_deepspeed(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="nonfinite_loss"):
        tiny_cfg(
            tiny_data, tmp_path, "nonfinite_loss=skip", "parallelism.deepspeed.zero_optimization.stage=2"
        )


def test_save_folder_under_a_file_fails_before_training(tiny_data, tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = tiny_cfg(tiny_data, tmp_path, f"save_folder={tmp_path}/file/ckpt")
    with pytest.raises(ConfigError, match=r"save_folder: .*file/ckpt is not writable.*choose a folder"):
        run(cfg)
    assert not (tmp_path / "loss.jsonl").exists()


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.parametrize("readonly", [False, True], ids=["full", "read-only"])
def test_full_or_read_only_filesystem_fails_before_training(tiny_data, tmp_path, readonly):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "64k", readonly):
        pytest.skip("needs permission to mount a small tmpfs (root in a container that allows it)")
    try:
        if not readonly:  # fill it up, as a disk with other jobs' data
            (mnt / "other").write_bytes(b"\0" * (56 << 10))
        cfg = tiny_cfg(tiny_data, tmp_path, f"save_folder={mnt}/ckpt")
        words = (
            r"not writable.*(Read-only|No space)"
            if readonly
            else r"(MiB free but one checkpoint needs|not writable)"
        )
        with pytest.raises(ConfigError, match=words):
            run(cfg)
        assert not (tmp_path / "loss.jsonl").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- stale shared memory of a killed run ------------------------------------------------------------
HOLD_DATASET = """
import sys, time
from pipeline.rows import packed_rows_dataset_class
ds = packed_rows_dataset_class()(seq_len=32, local=sys.argv[1], remote=sys.argv[2], split="train", batch_size=4)
next(iter(ds))
print("ready", flush=True)
time.sleep(600)
"""


HOLD_ARGV = [sys.executable, "-c", HOLD_DATASET]


def hold_dataset(local: Path, remote: Path) -> subprocess.Popen:
    """A process (own session) that opens the streaming dataset (remote -> local cache) and keeps it open."""
    p = subprocess.Popen(
        [*HOLD_ARGV, str(local), str(remote)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read()[-3000:]
    return p


def streaming_shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name[:6].isdigit()}


def mapped_shm(proc: subprocess.Popen) -> set[str]:
    """The Streaming segments ``proc`` maps (whatever other jobs on the machine hold)."""
    maps = Path(f"/proc/{proc.pid}/maps").read_text().splitlines()
    names = {line.split("/dev/shm/", 1)[1].split()[0] for line in maps if "/dev/shm/" in line}
    return {n for n in names if n[:6].isdigit()}


@pytest.mark.multiprocess
def test_stale_streaming_memory_of_a_killed_run_is_removed_and_live_runs_are_not(tiny_data, tmp_path):
    from pipeline.rows import machine_lock
    from pipeline.trainer.data import clean_stale_streaming_memory

    data, _ = tiny_data
    killed = hold_dataset(tmp_path / "cache-a", data)
    killed_shm = mapped_shm(killed)
    live = hold_dataset(tmp_path / "cache-b", data)
    try:
        live_shm = mapped_shm(live)
        # Under the machine-wide lock no job of this pipeline registers or cleans Streaming's memory
        # (a training run that another test starts meanwhile waits): the clean-up below is the only one.
        with machine_lock():
            # The whole process group dies (preemption, OOM of the job): Python's resource tracker,
            # which would unlink the segments of a lone killed process, dies with it.
            kill_group(killed)
            newest = max((Path("/dev/shm") / n).stat().st_mtime for n in killed_shm)
            time.sleep(max(0.0, newest + 3.5 - time.time()))  # a restarted job comes seconds after the kill
            assert killed_shm and live_shm and killed_shm <= streaming_shm()  # the kill leaked its segments
            removed = set(clean_stale_streaming_memory(lock=False))
        prefix = next(iter(killed_shm))[:6]
        assert killed_shm <= removed  # its segments and its file locks (which make Streaming skip the prefix)
        assert {f"{prefix}_barrier_filelock", f"{prefix}_cache_filelock"} & removed
        assert not (live_shm & removed) and live_shm <= streaming_shm()  # the running job keeps its memory
        hold_dataset(tmp_path / "cache-a", data).kill()  # and the restarted job starts
    finally:
        live.kill()
        live.wait()


def test_a_starting_jobs_lock_and_memory_are_left_alone():
    """A job takes Streaming's lock file, then creates its memory, then maps it: another job's clean-up
    in those moments must not take them away. Unmapped memory goes once it is a few seconds old (a
    killed job's), orphan locks once they are a minute old."""
    from pipeline.rows import machine_lock
    from pipeline.trainer.data import clean_stale_streaming_memory

    with machine_lock():  # no other clean-up of this pipeline meanwhile (a run another test starts)
        taken = {p.name[:6] for p in Path("/dev/shm").iterdir()} | {
            p.name[:6] for p in Path(tempfile.gettempdir()).glob("[0-9]*_*_filelock")
        }
        prefix = next(
            f"{n:06d}" for n in range(900000, 999998, 2) if not {f"{n:06d}", f"{n + 1:06d}"} & taken
        )
        young, old = (Path(tempfile.gettempdir()) / f"{prefix}_{k}_filelock" for k in ("cache", "barrier"))
        young.touch()
        old.touch()
        os.utime(old, (time.time() - 120, time.time() - 120))
        segment = Path("/dev/shm") / f"{int(prefix) + 1:06d}_locals"  # created, not mapped yet
        segment.touch()
        try:
            removed = clean_stale_streaming_memory(lock=False)
            assert old.name in removed and not old.exists()
            assert young.name not in removed and young.exists()
            assert segment.name not in removed and segment.exists()
            os.utime(
                segment, (time.time() - 10, time.time() - 10)
            )  # nobody mapped it in 10 s: a killed job's
            assert segment.name in clean_stale_streaming_memory(lock=False) and not segment.exists()
        finally:
            for f in (young, old, segment):
                f.unlink(missing_ok=True)
