from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_intra_op_thread():
    # The model tests run thousands of tiny (64-wide) ops: intra-op threads only add synchronization,
    # and on a busy 2-core machine their spin-waits made a forward 90x slower (4.3 s vs 0.05 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
