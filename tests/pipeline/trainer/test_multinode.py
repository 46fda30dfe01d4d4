"""A real 2-node job on one machine: two composer launchers (--world_size 4 --nproc 2 --node_rank 0/1),
gloo, DeepSpeed ZeRO-2, one shared save_folder; and what happens when a whole node dies.

Each "node" gets what a separate machine has: its own /dev/shm (a private tmpfs in its own mount
namespace, via ``unshare``) and its own temp dir. Streaming keeps node-local state there, and two
node leaders sharing one /dev/shm would claim the same segment names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.save_folder import composer_checkpoints
from tests.factories import REPO, YAMLS, tiny_overrides
from tests.pipeline.trainer.launch import COMMON, assert_same_curve, free_port, kill_group, records

ZERO2 = "parallelism.deepspeed.zero_optimization.stage=2"


def node_command(tiny_data, out: Path, node_rank: int, port: int, *extra: str) -> list[str]:
    """The command one node of a 2 x 2 job runs (what docker/slurm/bd3_1b.sbatch runs per node)."""
    data, tok = tiny_data
    args = tiny_overrides(
        data, tok, out / "ckpt", *COMMON, f"callbacks.loss_log.path={out}/loss.jsonl", *extra
    )
    launcher = str(Path(sys.executable).with_name("composer"))
    return [
        launcher, "--world_size", "4", "--nproc", "2", "--node_rank", str(node_rank),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "--stdout", f"{out}/node{node_rank}-rank{{rank}}.out", "--stderr", f"{out}/node{node_rank}-rank{{rank}}.err",
        "-m", "pipeline.train", str(YAMLS / "bd3_tiny.yaml"), *args,
    ]  # fmt: skip


PRIVATE_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
MOUNT_AND_RUN = 'mount -t tmpfs -o size=512m tmpfs /dev/shm && exec "$@"'


@pytest.fixture(scope="module")
def private_shm():
    p = subprocess.run([*PRIVATE_SHM, MOUNT_AND_RUN, "sh", "true"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"a private /dev/shm per simulated node needs unshare + mount (root): {p.stderr.strip()}")


def start_nodes(tiny_data, out: Path, *extra: str) -> list[subprocess.Popen]:
    out.mkdir(exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    procs = []
    for node in (0, 1):
        tmp = out / f"tmp-node{node}"
        tmp.mkdir()
        log = open(out / f"node{node}.log", "w")
        cmd = [*PRIVATE_SHM, MOUNT_AND_RUN, "sh", *node_command(tiny_data, out, node, port, *extra)]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env={**env, "TMPDIR": str(tmp)}, stdout=log, stderr=log, start_new_session=True
            )
        )
    return procs


def logs(out: Path) -> str:
    return "\n".join(
        f"--- {p.name} ---\n{p.read_text()[-1500:]}" for p in sorted(out.glob("node*")) if p.is_file()
    )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_nodes_match_one_process(tiny_data, tmp_path, private_shm, one_process):
    """2 nodes x 2 processes (ZeRO-2) read the global batches of the session's 1-process run of the
    same recipe, row for row, and their losses agree (another summation order). (Any number of
    processes on one node reading those batches is test_deepspeed.py's and test_multiprocess.py's.)"""
    two = tmp_path / "two-nodes"
    procs = start_nodes(tiny_data, two, ZERO2)
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    assert codes == [0, 0], logs(two)
    got = records(two / "loss.jsonl")
    assert [r["rows"] for r in got] == [r["rows"] for r in one_process[0]]
    assert_same_curve(one_process[0], got)
    # One checkpoint per save (keep 1): one Composer file written by global rank 0 and one
    # DeepSpeed tag holding the partitions of all four ranks, in the shared save_folder.
    ckpt = two / "ckpt"
    assert sorted(composer_checkpoints(ckpt)) == [20]
    assert sorted(p.name for p in (ckpt / "deepspeed").iterdir() if p.is_dir()) == ["ba20"]
    optim = sorted(p.name for p in (ckpt / "deepspeed" / "ba20").glob("*optim_states.pt"))
    assert len(optim) == 4, optim
    assert not list(ckpt.rglob("*partial*")) and not list(ckpt.glob(".write-probe*"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_dead_node_stops_the_other_in_bounded_time(tiny_data, tmp_path, private_shm):
    """SIGKILL node 1 (its launcher and ranks, as a lost machine): node 0 must exit with an error, not hang."""
    out = tmp_path / "run"
    timeout = 30
    procs = start_nodes(tiny_data, out, "dist_timeout=30", "max_duration=2000ba", "scheduler.t_max=2000ba")
    try:
        deadline = time.monotonic() + 300
        while not (out / "loss.jsonl").exists() or len((out / "loss.jsonl").read_text().splitlines()) < 3:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs(out)
            time.sleep(0.05)
        kill_group(procs[1])
        t0 = time.monotonic()
        code = procs[0].wait(timeout=timeout + 90)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            kill_group(p)
    print(f"\nnode 0 exited with {code} {elapsed:.1f} s after node 1 was killed")
    assert code != 0
    assert elapsed < timeout + 60
    errors = "".join(p.read_text() for p in out.glob("node0-rank*.err"))
    assert any(
        w in errors for w in ("Connection closed", "Connection reset", "timed out", "Timeout", "Gloo")
    ), errors[-3000:]


DOWNLOAD_ORDER = """
import json, sys, time
from pathlib import Path

from composer.utils import dist, get_device

import pipeline.trainer.run_inputs as resources
from pipeline.trainer import load_config
from pipeline.trainer.startup import inputs_local_rank_zero_first

log, folder, yaml, *overrides = sys.argv[1:]


def hub(name):  # stands in for the hub download: who fetched it, when
    start = time.time()
    if dist.get_local_rank() == 0:
        time.sleep(2.0)  # a slow first download; the cache answers the others at once
    with open(log, "a") as f:
        f.write(json.dumps({"rank": dist.get_global_rank(), "start": start, "end": time.time()}) + "\\n")
    return Path(folder)


resources.resolve_checkpoint_dir = hub
dist.initialize_dist(get_device("cpu"))
res = inputs_local_rank_zero_first(load_config(yaml, overrides))
assert res.init_dir == Path(folder)
"""


@pytest.mark.multiprocess
def test_local_rank_zero_downloads_first_and_the_others_wait(tiny_data, tmp_path, tiny_hf_checkpoint):
    data, tok = tiny_data
    ckpt, _ = tiny_hf_checkpoint(tmp_path / "ckpt", vocab_size=64, hidden_size=64, intermediate_size=176)
    script = tmp_path / "order.py"
    script.write_text(DOWNLOAD_ORDER)
    log = tmp_path / "downloads.jsonl"
    overrides = tiny_overrides(data, tok, tmp_path / "run", "variables.init_from=some-org/tiny-llama")
    launcher = str(Path(sys.executable).with_name("composer"))
    cmd = [launcher, "-n", "2", str(script), str(log), str(ckpt), str(YAMLS / "bd3_tiny.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    calls = sorted(records(log), key=lambda r: r["rank"])
    assert [c["rank"] for c in calls] == [0, 1]
    assert calls[1]["start"] >= calls[0]["end"]  # rank 1 asked only after rank 0's download finished
