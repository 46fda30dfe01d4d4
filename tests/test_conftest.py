"""The suite's own shared-memory release (``tests.conftest.release_streaming_shared_memory``) must never
take memory that is not its own: once a name is released, another job (another xdist worker, a
launch) may create it again, and unlinking it a second time pulls it from under that job."""

from __future__ import annotations

import os
import uuid
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import release_streaming_shared_memory

pytest.importorskip("streaming")


def test_a_released_name_taken_again_by_another_job_is_left_alone():
    from streaming.base.shared.memory import SharedMemory

    name = f"bd3test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    ours = SharedMemory(name=name, create=True, size=4096)  # as a dataset of this process makes it
    view = np.frombuffer(ours.buf, dtype=np.int64)  # a live array over it: it cannot close yet
    release_streaming_shared_memory()
    assert (Path("/dev/shm") / name).exists()  # left for a later release, not half released
    del view
    release_streaming_shared_memory()
    assert not (Path("/dev/shm") / name).exists()

    theirs = shared_memory.SharedMemory(name=name, create=True, size=4096)  # another job's, same name
    resource_tracker.unregister(theirs._name, "shared_memory")  # (its owner unlinks it, not ours)
    try:
        release_streaming_shared_memory()  # the next module's release
        ours.cleanup()  # and the one atexit runs
        assert (Path("/dev/shm") / name).exists()
    finally:
        theirs.close()
        theirs.unlink()
