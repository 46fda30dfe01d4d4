"""Soak: thousands of steps with checkpoints every 50 and SIGKILLs at random moments.

Two sizes: 1,000 steps with 4 kills of one training process in the default suite, 3,000 steps with 8
kills of a random rank of 2 processes behind ``-m soak`` (deselected by default: ``pytest -m soak``
runs it). (A rank killed among several, and the other ranks stopping, is also what the fault tests'
random kills do under ZeRO-2 and ZeRO-3.) The kills draw from a printed seed (``PIPELINE_TEST_SEED``
replays one).

The killed-and-resumed run must end like the uninterrupted one: every batch's rows and losses equal,
every row once per epoch, the same final weights. The figures (kills, replayed batches, time) are
printed for the closing note of a change that touches training or checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.pipeline.trainer.launch import (
    kill_a_rank_after,
    last_batch,
    rank_logs,
    records,
    started,
    train_command,
    weights,
)

ROWS, BATCH = 256, 16  # tiny_data: one epoch is 16 global batches
SIZES = [  # steps, kills, processes (0: python -m pipeline.train)
    pytest.param(1000, 4, 0, id="1000steps-4kills"),
    pytest.param(3000, 8, 2, id="3000steps-8kills-2proc", marks=pytest.mark.soak),
]


def soak_command(tiny_data, out: Path, steps: int, nproc: int):
    return train_command(
        tiny_data,
        out,
        f"max_duration={steps}ba",
        f"scheduler.t_max={steps}ba",
        "scheduler.t_warmup=20ba",
        "optimizer.lr=1.0e-3",
        "eval_loader=null",
        "run_name=soak",
        "save_interval=50ba",
        # one microbatch per process and step: the same arithmetic per step
        f"device_train_microbatch_size={BATCH // max(nproc, 1)}",
        "callbacks.loss_log.sample_ids=true",
        f"callbacks.hf_export.folder={out}/hf",
        "callbacks.speed_monitor=null",
        "callbacks.runtime_estimator=null",
        nproc=nproc,
        common=[],
    )


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("steps, num_kills, nproc", SIZES)
def test_soak_random_kills_end_like_an_uninterrupted_run(
    tiny_data, tmp_path, kill_rng, steps, num_kills, nproc
):
    rng = kill_rng
    # The uninterrupted reference runs beside the killed run: the two use the cores each other's
    # launches leave idle (imports, launcher start-up, the waits around each kill).
    ref = tmp_path / "reference"
    ref_cmd, ref_env = soak_command(tiny_data, ref, steps, nproc)
    out = tmp_path / "killed"
    cmd, env = soak_command(tiny_data, out, steps, nproc)
    kills, launches, t0 = 0, 0, time.monotonic()
    with started(ref_cmd, ref_env, ref) as ref_proc:
        # The killed run starts once the reference trains: two jobs that create their Streaming
        # datasets at the same instant can collide on Streaming's shared-memory names.
        deadline = time.monotonic() + 300
        while last_batch(ref / "loss.jsonl") < 1:
            assert ref_proc.poll() is None, (ref / "launcher.log").read_text()[-3000:] + rank_logs(ref)
            assert time.monotonic() < deadline, "the reference logged no batch in 300 s"
            time.sleep(0.05)
        while True:
            launches += 1
            assert launches <= num_kills + 3, "the run does not finish"
            start = last_batch(out / "loss.jsonl")
            with started(cmd, env, out) as proc:
                if kills < num_kills:
                    # within the run, 20 batches before its end at the latest: every kill lands
                    target = min(start + rng.randint(20, steps // num_kills), steps - 20)
                    logged = kill_a_rank_after(proc, out, target, rng, max_delay=0.1, nproc=nproc)
                    if logged is not None:
                        kills += 1
                        print(f"kill {kills}: {'a rank' if nproc else 'the process'} near batch {logged}")
                code = proc.wait(timeout=900)
            if code == 0:
                break
        soak_s = time.monotonic() - t0
        ref_code = ref_proc.wait(timeout=900)
    assert ref_code == 0, (ref / "launcher.log").read_text()[-3000:] + rank_logs(ref)

    got = records(out / "loss.jsonl")
    want = records(ref / "loss.jsonl")
    final = {r["batch"]: r for r in got}
    assert [r["batch"] for r in want] == sorted(final) == list(range(1, steps + 1))
    for r in want:
        f = final[r["batch"]]
        assert f["rows"] == r["rows"], r["batch"]
        assert f["loss/train/total"] == r["loss/train/total"], r["batch"]
    # Replayed batches (between a checkpoint and a kill) reproduce what was logged the first time.
    seen: dict[int, float] = {}
    for r in got:
        assert seen.setdefault(r["batch"], r["loss/train/total"]) == r["loss/train/total"], r["batch"]
    for epoch in range(steps // (ROWS // BATCH)):
        batches = range(epoch * ROWS // BATCH + 1, (epoch + 1) * ROWS // BATCH + 1)
        assert sorted(row for b in batches for row in final[b]["rows"]) == list(range(ROWS)), epoch
    w_ref, w_got = weights(ref / "hf"), weights(out / "hf")
    assert all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)
    assert want[-1]["loss/train/total"] < want[0]["loss/train/total"] - 0.5  # it trained
    print(
        f"\nsoak: {steps} steps, {kills} kills, {launches} launches, {len(got) - steps} batches replayed; "
        f"{soak_s:.0f} s (the uninterrupted reference beside it)"
    )
    assert kills == num_kills
