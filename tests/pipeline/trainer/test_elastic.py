"""Elastic resumption: a run continues on another number of processes (real launches, gloo on CPU).

Each test takes an uninterrupted run (``reference(variant)``, tests/pipeline/trainer/conftest.py) as it
was after batch 10 (``launch.copy_run_until``) and continues it with the other world size to batch 15,
then switches back to the starting world size up to batch 20. So one chain proves both switches: a
checkpoint written by 2 processes resumed by 1, and one written by 1 process resumed by 2. Against
the uninterrupted run, every global batch after the switch holds the same rows (exact), its losses
agree to ``LOSS_RTOL``, and Adam's state at batch 20 equals the uninterrupted run's (consolidated from
the partitions or shards).

ZeRO-1 and FSDP2 switch on a save_folder in the S3 server (test_object_storage.py).
"""

from __future__ import annotations

import pytest

from tests.pipeline.trainer.launch import (
    UNIVERSAL_LINE,
    VARIANTS,
    assert_continues,
    assert_same_optimizer_state,
    command,
    copy_run_until,
    optimizer_state,
    rank_logs,
    run_to_end,
    same_reference,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def other(nproc: int) -> int:
    """The other world size of a chain: 2 processes for one (``python -m``: 0), one for two."""
    return 2 if nproc == 0 else 0


def resume(tiny_data, out, variant, nproc, *extra, fault=None):
    cmd, env = command(tiny_data, out, variant, *extra, nproc=nproc)
    p = run_to_end(cmd, env, out, fault)
    return p, p.stdout + p.stderr + rank_logs(out)


@pytest.mark.parametrize(
    "variant", [pytest.param(v, marks=same_reference(v)) for v in ("1proc", "zero2", "zero3")]
)
def test_a_run_switches_world_size_and_back_and_continues_exactly(tiny_data, tmp_path, reference, variant):
    """DDP (``1proc`` starts on 1 process: 1 -> 2 -> 1), ZeRO-2 and ZeRO-3 (2 -> 1 -> 2).

    ZeRO-3 first meets a partition DeepSpeed cannot convert (exit code 7, one line naming the tag and
    the command to convert it by hand, nothing converted left behind), then the intact one.

    ZeRO-2 also proves the rest of the issue on the way: a kill during the conversion leaves the
    partitions usable and the next start converts again; rerunning the command of the segment that
    finished (a scheduler's requeue) exits 0 with one line; raising max_duration continues the run.
    """
    ref = reference(variant)
    start = VARIANTS[variant][0]
    copy_run_until(ref, tmp_path, 10)
    deepspeed = variant.startswith("zero")
    ds = tmp_path / "ckpt" / "deepspeed"
    if variant == "zero3":  # a partition DeepSpeed cannot read: one line, exit 7, nothing left converted
        part = ds / "ba10" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        good = part.read_bytes()
        part.write_bytes(b"not a checkpoint")
        p, _ = resume(tiny_data, tmp_path, variant, other(start), "max_duration=15ba")
        assert p.returncode == 7, p.stderr[-3000:]
        lines = [line for line in p.stderr.splitlines() if line.startswith("resuming stopped:")]
        assert len(lines) == 1 and f"DeepSpeed cannot convert {ds / 'ba10'}" in lines[0], p.stderr[-3000:]
        assert "python -m deepspeed.checkpoint.ds_to_universal --input_folder" in lines[0]
        assert sorted(q.name for q in ds.iterdir()) == ["ba10"]
        part.write_bytes(good)
    if variant == "zero2":  # killed while converting: the partial conversion is left, the tag intact
        p, _ = resume(tiny_data, tmp_path, variant, other(start), fault="kill@universal:10")
        assert p.returncode != 0
        assert (ds / "ba10.universal.partial").is_dir() and not (ds / "ba10.universal").exists()
        assert sorted(q.name for q in (ds / "ba10").iterdir())[-2:] == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    p, output = resume(tiny_data, tmp_path, variant, other(start), "max_duration=15ba")
    assert p.returncode == 0, output[-4000:]
    assert (UNIVERSAL_LINE in output) == deepspeed
    if variant == "zero2":
        assert (ds / "ba10.universal").is_dir() and not (ds / "ba10.universal.partial").exists()
        # The requeue of the finished segment: one line, exit 0, no traceback, nothing trained.
        p, output = resume(tiny_data, tmp_path, variant, other(start), "max_duration=15ba")
        assert p.returncode == 0, output[-4000:]
        lines = [line for line in p.stdout.splitlines() if "is complete" in line]
        assert lines == [
            f"run fault-test is complete: it reached max_duration 15ba at batch 15; its last checkpoint is "
            f"{(tmp_path / 'ckpt' / 'ep0-ba15-rank0.pt').resolve()} (raise max_duration to train on)"
        ], p.stdout[-2000:]
        assert "Traceback" not in output
    # Back to the starting world size, with max_duration raised to 20: it continues from batch 15.
    p, output = resume(tiny_data, tmp_path, variant, start)
    assert p.returncode == 0, output[-4000:]
    assert (UNIVERSAL_LINE in output) == deepspeed
    assert_continues(ref, tmp_path, after=10)
    assert_same_optimizer_state(
        optimizer_state(ref / "ckpt", 20, tmp_path), optimizer_state(tmp_path / "ckpt", 20, tmp_path)
    )
