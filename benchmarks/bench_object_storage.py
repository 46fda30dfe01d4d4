"""Object storage cost on CPU, against moto's S3 server on 127.0.0.1 (loopback: no network latency).

    python -m benchmarks.bench_object_storage [--steps 30] [--skip 5] [--repeats 3]

(a) ``bd3_tiny`` under DeepSpeed ZeRO-2, ``composer -n 2``: wall time of a run that trains
    ``--save-at`` batches and writes one checkpoint (uploads included), and of the autoresumed run
    that loads it and trains one more batch; save_folder local vs ``s3://``. Both include the
    process start-up, which is the same for both backends; the ratio is remote / local.
(b) One process: seconds per batch with ``data_remote=s3://...`` after the node cache is warm (a
    first run filled it) against the same data read from a local folder; the ratio is
    local / remote throughput-wise (goal >= 0.95).

Each round runs both backends back to back, alternating which goes first; the medians over rounds
are the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_train import REPO, launch, make_data, overrides, step_seconds
from data_prep.remote import upload_tree
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
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs local and S3 back to back")
    args = p.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MotoS3().start()
    os.environ.update(server.env())
    bucket = server.new_bucket()
    print(f"moto S3 server at {server.endpoint}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, tok = make_data(root / "data")
        upload_tree(data, f"s3://{bucket}/data")
        remote = [f"variables.data_remote=s3://{bucket}/data", f"variables.data_local={root / 'cache'}"]
        one_process(data, tok, root / "warm", args.steps, remote)  # fills the node cache once
        for r in range(args.repeats):
            # Alternate which backend goes first, so a drift in the machine's load favours neither.
            order = ("local", "s3") if r % 2 == 0 else ("s3", "local")
            row = {}
            for name in order:
                folder = (
                    str(root / f"local-run{r}" / "ckpt") if name == "local" else f"s3://{bucket}/runs/b{r}"
                )
                row[f"save_{name}"], row[f"resume_{name}"] = save_and_resume(
                    data, tok, root / f"{name}-run{r}", folder, args.save_at
                )
            for name in order:
                out = root / f"data-{name}{r}"
                one_process(data, tok, out, args.steps, remote if name == "s3" else [])
                row[f"step_{name}"] = step_seconds(out / "loss.jsonl", args.skip)
            rounds.append(row)
            print(
                f"round {r + 1}: train {args.save_at} + save local {row['save_local']:.1f} s / "
                f"S3 {row['save_s3']:.1f} s; autoresume + 1 batch local {row['resume_local']:.1f} s / "
                f"S3 {row['resume_s3']:.1f} s; s/batch local data {row['step_local']:.4f} / "
                f"remote data {row['step_s3']:.4f}",
                flush=True,
            )
    server.stop()
    ratios = {
        "save s3/local": [x["save_s3"] / x["save_local"] for x in rounds],
        "resume s3/local": [x["resume_s3"] / x["resume_local"] for x in rounds],
        "throughput remote/local": [x["step_local"] / x["step_s3"] for x in rounds],
    }
    for name, values in ratios.items():
        print(
            f"{name}: median {statistics.median(values):.3f} (rounds: {', '.join(f'{v:.3f}' for v in values)})"
        )
    print(json.dumps({"rounds": rounds, "ratios": ratios}))


if __name__ == "__main__":
    main()
