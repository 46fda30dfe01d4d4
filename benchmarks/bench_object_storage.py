"""Object storage cost on CPU, against moto's S3 server on 127.0.0.1 (loopback: no network latency).

    python -m benchmarks.bench_object_storage [--steps 30] [--skip 5]

(a) ``bd3_tiny`` under DeepSpeed ZeRO-2, ``composer -n 2``: wall time of a run that trains
    ``--save-at`` batches and writes one checkpoint (uploads included), and of the autoresumed run
    that loads it and trains one more batch; save_folder local vs ``s3://``. Both include the
    process start-up, which is the same for both backends; the ratio is remote / local.
(b) One process: seconds per batch with ``data_remote=s3://...`` after the node cache is warm (a
    first run filled it) against the same data read from a local folder; the ratio is
    local / remote throughput-wise (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_train import REPO, launch, make_data, overrides, step_seconds
from data_prep import mds
from tests.s3 import MotoS3

ZERO2 = ["parallelism.deepspeed.zero_optimization.stage=2"]


def save_and_resume(data, tok, out: Path, save_folder: str, save_at: int) -> tuple[float, float]:
    """(seconds of a ZeRO-2 run to ``save_at`` batches with one save, seconds of its autoresume + 1 batch)."""
    common = [*ZERO2, f"variables.save_folder={save_folder}", f"save_interval={save_at}ba", "autoresume=true"]
    common += [f"scheduler.t_max={save_at + 1}ba"]
    t = time.perf_counter()
    launch(data, tok, out, save_at, common)
    first = time.perf_counter() - t
    t = time.perf_counter()
    launch(data, tok, out, save_at + 1, [*common, f"max_duration={save_at + 1}ba"])
    return first, time.perf_counter() - t


def one_process(data, tok, out: Path, steps: int, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "pipeline.train", str(REPO / "yamls" / "bd3_tiny.yaml")]
    cmd += [*overrides(data, tok, out, steps), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=env)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--save-at", type=int, default=5)
    args = p.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MotoS3().start()
    os.environ.update(server.env())
    bucket = server.new_bucket()
    print(f"moto S3 server at {server.endpoint}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, tok = make_data(root / "data")
        mds.upload_tree(data, f"s3://{bucket}/data")
        rows = {}
        for name, folder in (("local", str(root / "local-run" / "ckpt")), ("s3", f"s3://{bucket}/runs/b")):
            rows[name] = save_and_resume(data, tok, root / f"{name}-run", folder, args.save_at)
            print(
                f"ZeRO-2 x2 {name:5s}: train {args.save_at} + save {rows[name][0]:6.1f} s, "
                f"autoresume + 1 batch {rows[name][1]:6.1f} s",
                flush=True,
            )
        print(
            f"ratio s3/local: save run {rows['s3'][0] / rows['local'][0]:.2f}, "
            f"resume run {rows['s3'][1] / rows['local'][1]:.2f}"
        )
        remote = [f"variables.data_remote=s3://{bucket}/data", f"variables.data_local={root / 'cache'}"]
        for out, extra in (
            ("data-local", []),
            ("warm", remote),
            ("data-remote", remote),
        ):  # warm fills the cache
            one_process(data, tok, root / out, args.steps, extra)
        local_s = step_seconds(root / "data-local" / "loss.jsonl", args.skip)
        remote_s = step_seconds(root / "data-remote" / "loss.jsonl", args.skip)
        print(
            f"1 process, s/batch: local data {local_s:.4f}, remote data (warm cache) {remote_s:.4f}; "
            f"throughput ratio remote/local {local_s / remote_s:.3f}"
        )
        print(json.dumps({"save": rows, "local_s": local_s, "remote_s": remote_s}))
    server.stop()


if __name__ == "__main__":
    main()
