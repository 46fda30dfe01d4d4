"""Two processes with the real launcher (``composer -n 2``, gloo on CPU) train exactly like one.

Each sample's data and noise depend only on its position in the global training stream, DDP
averages the two halves' gradients, and Composer averages the two ranks' row-weighted losses: the
per-batch loss curve of 2 processes equals the 1-process curve up to float summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.trainer import load_config, run
from tests.pipeline.train.conftest import REPO, YAMLS, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# float32 on CPU: the runs differ only in summation order (all-reduce, microbatch grouping).
LOSS_RTOL = 1e-5  # measured: at most 1.2e-7 over 12 batches
COMMON = ["max_duration=12ba", "scheduler.t_max=12ba", "eval_loader=null", "run_name=dist-test"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _launch(tiny_data, out: Path, *extra: str) -> None:
    """``composer -n 2 -m pipeline.train yamls/bd3_tiny.yaml ...`` logging losses to out/loss.jsonl."""
    data, tok = tiny_data
    out.mkdir(exist_ok=True)
    args = tiny_overrides(
        data, tok, out / "ckpt", *COMMON, f"callbacks.loss_log.path={out}/loss.jsonl", *extra
    )
    launcher = str(Path(sys.executable).with_name("composer"))
    logs = ["--stdout", f"{out}/rank{{rank}}.out", "--stderr", f"{out}/rank{{rank}}.err"]
    cmd = [launcher, "-n", "2", *logs, "-m", "pipeline.train", str(YAMLS / "bd3_tiny.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    rank1 = (out / "rank1.err").read_text() if (out / "rank1.err").exists() else ""
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n--- rank 1 ---\n{rank1[-3000:]}"


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    """The reference: the same config trained in this process; (loss records, final weights)."""
    out = tmp_path_factory.mktemp("one")
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
    return _records(out / "loss.jsonl"), trainer.state.model.model.state_dict()


def _assert_same_curve(one: list[dict], two: list[dict]) -> None:
    assert [r["batch"] for r in one] == [r["batch"] for r in two] == list(range(1, 13))
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


def test_ddp_two_processes_match_one_process(tiny_data, tmp_path, one_process):
    _launch(tiny_data, tmp_path)
    assert (tmp_path / "ckpt" / "latest-rank0.pt").exists()  # DDP: rank 0 writes the monolithic checkpoint
    _assert_same_curve(one_process[0], _records(tmp_path / "loss.jsonl"))


def test_fsdp2_two_processes_resume_and_match_one_process(tiny_data, tmp_path, one_process):
    """FSDP2 SHARD_GRAD_OP, stopped at batch 6 and autoresumed from its sharded checkpoint to 12;
    the exported Hugging Face folder (gathered full state dict) holds the 1-process weights."""
    from pipeline.model import from_pretrained

    fsdp = [
        "parallelism.fsdp.sharding_strategy=SHARD_GRAD_OP",
        "save_interval=6ba",
        f"callbacks.hf_export.folder={tmp_path}/hf",
    ]
    _launch(tiny_data, tmp_path, *fsdp, "max_duration=6ba")
    assert (tmp_path / "ckpt" / "ep0-ba6").is_dir()  # sharded checkpoint: one folder, a shard per rank
    _launch(tiny_data, tmp_path, *fsdp)  # the same command with the full max_duration
    _assert_same_curve(one_process[0], _records(tmp_path / "loss.jsonl"))
    exported = from_pretrained(tmp_path / "hf").state_dict()
    reference = one_process[1]
    for k, v in reference.items():
        torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=1e-5)
