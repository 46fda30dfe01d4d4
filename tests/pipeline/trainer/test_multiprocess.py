"""Two processes with the real launcher (``composer -n 2``, gloo on CPU) train exactly like one.

Each sample's data and noise depend only on its position in the global training stream, DDP
averages the two halves' gradients, and Composer averages the two ranks' row-weighted losses: the
per-batch loss curve of 2 processes equals the 1-process curve up to float summation order.

The runs here use ``launch.FULL``: several block sizes (``diffusion.block_size: [2, 4, 8]`` with an
interval per size; every step draws one L' from (seed, step), the same on both ranks) and the
evaluation callbacks, so that each launch also proves those under its parallelism (ZeRO's:
test_deepspeed.py; FSDP2's, with a resume on another world size and sharding strategy from a bucket:
test_object_storage.py).
"""

from __future__ import annotations

import pytest

from tests.pipeline.trainer.launch import (
    assert_block_sizes_drawn,
    assert_downstream_split,
    assert_same_curve,
    assert_same_downstream,
    assert_same_evaluation,
    records,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.xdist_group("ddp_run")
def test_ddp_two_processes_match_one_process(tiny_data, ddp_run, one_process_full):
    out, output = ddp_run
    assert (out / "ckpt" / "latest-rank0.pt").exists()  # DDP: rank 0 writes the monolithic checkpoint
    one, two = one_process_full[0], records(out / "loss.jsonl")
    assert_same_curve(one, two)
    assert_block_sizes_drawn(one, two)
    assert_same_evaluation(one_process_full[3], out, output)
    assert_same_downstream(tiny_data, out)
    assert_downstream_split(output)  # replicated weights: each rank scores its share on the live model
