"""Two processes with the real launcher (``composer -n 2``, gloo on CPU) train exactly like one.

Each sample's data and noise depend only on its position in the global training stream, DDP
averages the two halves' gradients, and Composer averages the two ranks' row-weighted losses: the
per-batch loss curve of 2 processes equals the 1-process curve up to float summation order.

The runs here use ``launch.FULL``: several block sizes (``diffusion.block_size: [2, 4, 8]`` with an
interval per size; every step draws one L' from (seed, step), the same on both ranks) and the
evaluation callbacks, so that each launch also proves those under its parallelism (ZeRO's:
test_deepspeed.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.pipeline.trainer.launch import (
    FULL,
    assert_block_sizes_drawn,
    assert_downstream_split,
    assert_same_curve,
    assert_same_downstream,
    assert_same_evaluation,
    downstream,
    launch,
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


def test_fsdp2_two_processes_resume_and_match_one_process(tiny_data, tmp_path, one_process_full, capsys):
    """FSDP2 FULL_SHARD, stopped at batch 10 and autoresumed from its sharded checkpoint to 20: the
    curve, the block sizes drawn and the evaluations at batch 20 (likelihood; downstream tasks split over
    the ranks) are those of 1 process; the exported
    Hugging Face folder (gathered full state dict) holds the 1-process weights and records the trained
    sizes. (SHARD_GRAD_OP: the object-storage test.)"""
    import json

    from pipeline.model import from_pretrained

    fsdp = [
        "parallelism.fsdp.sharding_strategy=FULL_SHARD",
        "save_interval=10ba",
        *downstream(tiny_data, tmp_path),  # with the hf_export of tmp_path/hf
    ]
    launch(tiny_data, tmp_path, *fsdp, "max_duration=10ba", common=FULL)
    assert (tmp_path / "ckpt" / "ep0-ba10").is_dir()  # sharded checkpoint: one folder, a shard per rank
    p = launch(tiny_data, tmp_path, *fsdp, common=FULL)  # the same command with the full max_duration
    one, two = one_process_full[0], records(tmp_path / "loss.jsonl")
    assert_same_curve(one, two)
    assert_block_sizes_drawn(one, two)
    assert_same_evaluation(one_process_full[3], tmp_path, p.stdout + p.stderr)
    assert_same_downstream(tiny_data, tmp_path)
    assert_downstream_split(p.stdout + p.stderr)  # on a copy of the full weights, gathered once
    bd3 = json.loads((tmp_path / "hf" / "config.json").read_text())["bd3"]
    assert bd3["block_size"] == 2 and bd3["trained_block_sizes"] == [2, 4, 8]
    exported = from_pretrained(tmp_path / "hf").state_dict()
    reference = one_process_full[1]
    for k, v in reference.items():
        torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=1e-5)
    # pipeline.export gathers the shards of the latest sharded checkpoint (batch 20) in one process:
    # the weights the callback gathered from the live model, bit for bit; --batch picks another one.
    from pipeline.export import main as export_main

    args = ["--checkpoint", str(tmp_path / "ckpt"), "--trust-checkpoint", "--out"]
    assert export_main([*args, str(tmp_path / "export")]) == 0
    from_shards = from_pretrained(tmp_path / "export").state_dict()
    assert from_shards.keys() == exported.keys()
    assert all(torch.equal(from_shards[k], exported[k]) for k in exported)
    assert export_main([*args, str(tmp_path / "export10"), "--batch", "10"]) == 0  # the first run's
    at10 = from_pretrained(tmp_path / "export10").state_dict()
    assert not all(torch.equal(at10[k], exported[k]) for k in exported)
    assert export_main([*args, str(tmp_path / "export7"), "--batch", "7"]) == 2
    assert "no checkpoint of batch 7" in capsys.readouterr().err
