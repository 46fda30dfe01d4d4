"""``pipeline.rows``: the machine-wide lock around a StreamingDataset's shared-memory registration."""

from __future__ import annotations

import subprocess
import sys
import time

from pipeline.rows import shm_prefix_lock
from tests.factories import REPO, packed_rows, write_data_folder

CHILD = """
import sys
from pipeline.rows import RowReader
reader = RowReader(sys.argv[1], "val")
print("built", len(reader), flush=True)
"""


def test_a_dataset_is_registered_under_the_machine_wide_lock(tmp_path):
    """Streaming finds a free shared-memory prefix, then creates it; two jobs starting at once can pick the
    same one (FileExistsError; measured here: 1 of 24 processes, 8 started at once, 3 rounds, without the
    lock; 0 of 24 with it). A process that wants to register waits while another holds the lock, and
    goes on as soon as it is released."""
    data = write_data_folder(tmp_path / "data", {"val": packed_rows(8, 1, 32)})
    with shm_prefix_lock():
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        time.sleep(8)  # long enough to import Streaming and reach the registration
        assert child.poll() is None, child.communicate()  # blocked on the lock
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and out.strip() == "built 8"
