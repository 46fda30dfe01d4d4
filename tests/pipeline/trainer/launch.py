"""Helpers of the multi-process training tests: the composer launcher, killing a run and cleaning up
after it, and loss-curve checks."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pipeline.trainer import load_config, run
from tests.factories import REPO, YAMLS, tiny_overrides

# float32 on CPU: the runs differ only in summation order (all-reduce, microbatch grouping).
LOSS_RTOL = 1e-5  # measured: at most 1.2e-7 over 12 batches (1 vs 2 processes)
COMMON = ["max_duration=20ba", "scheduler.t_max=20ba", "eval_loader=null", "run_name=dist-test"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_command(
    tiny_data, out: Path, *extra: str, nproc: int = 2, common=COMMON, entry=("-m", "pipeline.train")
) -> tuple[list[str], dict]:
    """(argv, env) of ``composer -n N -m pipeline.train`` on bd3_tiny (``python -m`` when nproc is 0);
    ``entry=("launch",)`` runs the repository's ``launch`` file instead of the module.

    Losses go to out/loss.jsonl, checkpoints to out/ckpt, rank logs to out/rank{r}.{out,err}.
    """
    data, tok = tiny_data
    out.mkdir(exist_ok=True)
    args = tiny_overrides(
        data, tok, out / "ckpt", *common, f"callbacks.loss_log.path={out}/loss.jsonl", *extra
    )
    yaml = str(YAMLS / "bd3_tiny.yaml")
    if nproc == 0:
        cmd = [sys.executable, "-m", "pipeline.train", yaml, *args]
    else:
        launcher = str(Path(sys.executable).with_name("composer"))
        logs = ["--stdout", f"{out}/rank{{rank}}.out", "--stderr", f"{out}/rank{{rank}}.err"]
        cmd = [launcher, "-n", str(nproc), *logs, *entry, yaml, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return cmd, env


def launch(tiny_data, out: Path, *extra: str, nproc: int = 2, entry=("-m", "pipeline.train")) -> None:
    """``composer -n 2 -m pipeline.train yamls/bd3_tiny.yaml ...`` logging losses to out/loss.jsonl."""
    cmd, env = train_command(tiny_data, out, *extra, nproc=nproc, entry=entry)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    rank1 = (out / "rank1.err").read_text() if (out / "rank1.err").exists() else ""
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n--- rank 1 ---\n{rank1[-3000:]}"


def last_batch(loss_log: Path) -> int:
    """The last batch ``loss_log`` (a loss_log callback's JSON lines) has recorded; 0 before any."""
    if not loss_log.exists():
        return 0
    lines = [line for line in loss_log.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["batch"] if lines else 0


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group ``proc`` leads (started with ``start_new_session``),
    and reap ``proc``: no rank or launcher outlives the test holding ports, files or shared memory."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def started(cmd: list[str], env: dict, out: Path) -> Iterator[subprocess.Popen]:
    """``cmd`` running in its own session, its output appended to out/launcher.log; on leaving, its
    whole process group is killed (``kill_group``)."""
    with open(out / "launcher.log", "a") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            kill_group(proc)


def kill_a_rank_after(
    proc: subprocess.Popen, out: Path, batch: int, rng: random.Random, max_delay: float, nproc: int = 2
) -> int | None:
    """SIGKILL one training process of ``proc`` once out/loss.jsonl has logged ``batch``, after a random
    delay of up to ``max_delay`` seconds (to land anywhere inside the next batch or checkpoint write).

    The victim is a random rank of the composer launcher ``proc``, or ``proc`` itself when ``nproc``
    is 0 (``python -m``). Returns the batch logged when the signal went, None if the run ended first.
    """
    import psutil

    deadline = time.monotonic() + 300
    while last_batch(out / "loss.jsonl") < batch:
        if proc.poll() is not None:
            return None
        assert time.monotonic() < deadline, f"batch {batch} not logged in 300 s"
        time.sleep(0.02)
    time.sleep(rng.uniform(0, max_delay))
    if proc.poll() is not None:
        return None
    victim = proc.pid if nproc == 0 else rng.choice(psutil.Process(proc.pid).children()).pid
    logged = last_batch(out / "loss.jsonl")
    os.kill(victim, signal.SIGKILL)
    return logged


def one_process_run(tiny_data, out: Path):
    """The reference: the same config trained in this process; (loss records, final weights)."""
    data, tok = tiny_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(
            YAMLS / "bd3_tiny.yaml",
            tiny_overrides(data, tok, out / "ckpt", *COMMON, f"callbacks.loss_log.path={out}/loss.jsonl"),
            world_size=1,
        )
        trainer = run(cfg)
    finally:
        torch.set_num_threads(threads)
    return records(out / "loss.jsonl"), trainer.state.model.model.state_dict(), out / "ckpt"


def assert_same_curve(one: list[dict], two: list[dict]) -> None:
    assert [r["batch"] for r in one] == [r["batch"] for r in two] == list(range(1, 21))
    print("\nbatch  1 process   2 processes  rel. diff")
    for ra, rb in zip(one, two):
        la, lb = ra["loss/train/total"], rb["loss/train/total"]
        print(f"{ra['batch']:5d}  {la:.7f}  {lb:.7f}  {abs(la - lb) / la:.1e}")
    for ra, rb in zip(one, two):
        # (loss/train/masked_ce is a per-microbatch ratio averaged by rows: it depends on the grouping.)
        for key in ("loss/train/total", "loss/train/nelbo"):
            assert rb[key] == pytest.approx(ra[key], rel=LOSS_RTOL), (ra["batch"], key)
    # The curve must move: matching a flat line would prove nothing.
    assert one[-1]["loss/train/total"] < one[0]["loss/train/total"] - 0.2
