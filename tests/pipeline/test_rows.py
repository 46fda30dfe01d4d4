"""``pipeline.rows``: the machine-wide lock around a StreamingDataset's shared-memory registration."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pipeline.rows import shm_prefix_lock
from tests.factories import REPO, packed_rows, write_data_folder

RANK = """
import os, sys
import torch.distributed as dist
import streaming.base.shared.prefix as prefix

looks = prefix._check_and_find  # (Streaming's search for a free prefix: each rank runs it)


def logged(*args, **kwargs):
    print("looking", flush=True)
    return looks(*args, **kwargs)


prefix._check_and_find = logged
dist.init_process_group("gloo", init_method=sys.argv[2], rank=int(os.environ["RANK"]), world_size=2)
from pipeline.rows import RowReader

reader = RowReader(sys.argv[1], "val")
print("built", len(reader), flush=True)
dist.destroy_process_group()
"""

JOB = {"WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2, "NODE_RANK": 0, "OMP_NUM_THREADS": 1}  # one node, 2 ranks


def test_a_jobs_ranks_look_for_shared_memory_only_under_their_leaders_lock(tmp_path):
    """Streaming finds a free shared-memory prefix, then the local leader creates it, while each other
    rank looks for it on its own beforehand: two jobs starting at once could pick the same prefix
    (FileExistsError; measured: 1 of 24 processes, 8 started at once, 3 rounds, without a lock), or a
    rank could see another job's memory as its own (seen in the suite). Two ranks of one job (gloo,
    LOCAL_RANK 0 and 1) while another job holds the machine-wide lock: neither looks (the leader waits
    for the lock, the other rank for its leader); once it is released, both build the dataset."""
    data = write_data_folder(tmp_path / "data", {"val": packed_rows(8, 1, 32)})
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks, logs = [], [tmp_path / f"rank{r}.out" for r in (0, 1)]
    with shm_prefix_lock():
        for rank in (0, 1):
            env = {
                **os.environ,
                **{k: str(v) for k, v in JOB.items()},
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
            }
            with open(logs[rank], "w") as out:
                ranks.append(
                    subprocess.Popen(
                        [sys.executable, "-c", RANK, str(data), init],
                        cwd=REPO,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )  # fmt: skip
                )
        time.sleep(10)  # long enough to import torch and Streaming and reach the registration
        for p, log in zip(ranks, logs):
            assert p.poll() is None, log.read_text()  # blocked: on the lock, or on its leader
            assert "looking" not in log.read_text()
    for p, log in zip(ranks, logs):
        p.wait(timeout=120)
        out = log.read_text()
        assert p.returncode == 0 and out.splitlines()[-1] == "built 8", out
        assert "looking" in out


def test_a_resume_state_removed_from_shared_memory_is_written_again(tmp_path, caplog):
    """A dataset resumed at row 32 whose resume state another program removes from /dev/shm (e.g.
    Streaming's clean_stale_shared_memory in another job) still starts at row 32, not at row 0."""
    from streaming.base.shared.memory import SharedMemory

    from pipeline.rows import packed_rows_dataset_class

    data = write_data_folder(tmp_path / "data", {"train": packed_rows(64, 0)}, None)
    cls = packed_rows_dataset_class()
    kwargs = dict(seq_len=32, local=str(data), split="train", shuffle=False, batch_size=8)
    first = cls(**kwargs)
    read = [int(row["dataset_index"]) for row, _ in zip(first, range(32))]  # a run's first 4 batches
    state = first.state_dict(num_samples=32, from_beginning=True)
    assert read == list(range(32)) and state["epoch"] == 0
    resumed = cls(**kwargs)
    resumed.load_state_dict(state)
    SharedMemory(name=resumed._resume_shm.shm.name, create=False, auto_cleanup=False).shm.unlink()

    assert [int(row["dataset_index"]) for row, _ in zip(resumed, range(4))] == [32, 33, 34, 35]
    assert "resume state of this dataset was removed" in caplog.text
