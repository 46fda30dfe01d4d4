"""Two processes with the real launcher (``composer -n 2``, gloo on CPU) train exactly like one.

Each sample's data and noise depend only on its position in the global training stream, DDP
averages the two halves' gradients, and Composer averages the two ranks' row-weighted losses: the
per-batch loss curve of 2 processes equals the 1-process curve up to float summation order.
"""

from __future__ import annotations

import pytest
import torch

from tests.pipeline.trainer.launch import assert_same_curve, launch, records

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_ddp_two_processes_match_one_process(ddp_run, one_process):
    assert (ddp_run / "ckpt" / "latest-rank0.pt").exists()  # DDP: rank 0 writes the monolithic checkpoint
    assert_same_curve(one_process[0], records(ddp_run / "loss.jsonl"))


def test_composer_launch_file_trains_like_the_module(tiny_data, tmp_path, ddp_run):
    """``composer -n 2 launch yamls/bd3_tiny.yaml ...`` (the repository's ``launch`` file) is
    ``composer -n 2 -m pipeline.train yamls/bd3_tiny.yaml ...`` (the session's ``ddp_run``): the same
    losses, bit for bit."""
    launch(tiny_data, tmp_path / "file", entry=("launch",))
    by_file, by_module = records(tmp_path / "file" / "loss.jsonl"), records(ddp_run / "loss.jsonl")
    assert [r["batch"] for r in by_file] == list(range(1, 21))
    assert [r["loss/train/total"] for r in by_file] == [r["loss/train/total"] for r in by_module]
    assert (tmp_path / "file" / "ckpt" / "latest-rank0.pt").exists()


def test_fsdp2_two_processes_resume_and_match_one_process(tiny_data, tmp_path, one_process, capsys):
    """FSDP2 SHARD_GRAD_OP, stopped at batch 10 and autoresumed from its sharded checkpoint to 20;
    the exported Hugging Face folder (gathered full state dict) holds the 1-process weights."""
    from pipeline.model import from_pretrained

    fsdp = [
        "parallelism.fsdp.sharding_strategy=SHARD_GRAD_OP",
        "save_interval=10ba",
        f"callbacks.hf_export.folder={tmp_path}/hf",
    ]
    launch(tiny_data, tmp_path, *fsdp, "max_duration=10ba")
    assert (tmp_path / "ckpt" / "ep0-ba10").is_dir()  # sharded checkpoint: one folder, a shard per rank
    launch(tiny_data, tmp_path, *fsdp)  # the same command with the full max_duration
    assert_same_curve(one_process[0], records(tmp_path / "loss.jsonl"))
    exported = from_pretrained(tmp_path / "hf").state_dict()
    reference = one_process[1]
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


MIXED = [
    "diffusion.block_size=[2, 4, 8]",
    "diffusion.noise_interval={2: [0.001, 1.0], 4: [0.45, 0.95], 8: [0.3, 0.8]}",
    "callbacks.loss_log.sample_ids=true",
]
PARALLELISM = {
    "ddp": [],
    "fsdp2": ["parallelism.fsdp.sharding_strategy=SHARD_GRAD_OP"],
    "zero2": ["parallelism.deepspeed.zero_optimization.stage=2"],
}


@pytest.fixture(scope="module")
def one_process_mixed(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed-one")
    launch(tiny_data, out, *MIXED, nproc=0)
    return records(out / "loss.jsonl")


@pytest.mark.parametrize("parallelism", sorted(PARALLELISM))
def test_several_block_sizes_two_processes_match_one_process(
    tiny_data, tmp_path, one_process_mixed, parallelism
):
    """diffusion.block_size: [2, 4, 8] with an interval per size: every step draws one L' from
    (seed, step), the same on both ranks; 1 and 2 processes (DDP, FSDP2, ZeRO-2) train the same curve,
    each step's NELBO is logged under its size, and the export records the trained sizes."""
    import json

    from pipeline.diffusion.objective import DiffusionConfig

    launch(
        tiny_data, tmp_path, *MIXED, *PARALLELISM[parallelism], f"callbacks.hf_export.folder={tmp_path}/hf"
    )
    one, two = one_process_mixed, records(tmp_path / "loss.jsonl")
    assert_same_curve(one, two)
    cfg = DiffusionConfig(block_size=[2, 4, 8], seed=0)
    for r1, r2 in zip(one, two):
        bs = cfg.block_size_at(r2["batch"] - 1)  # the step counter before the batch
        assert r1["block_size_by_rank"] == [bs] and r2["block_size_by_rank"] == [bs, bs]
        per_size = {k: v for k, v in r2.items() if k.startswith("loss/train/nelbo/bs")}
        assert per_size == {f"loss/train/nelbo/bs{bs}": r2["loss/train/nelbo"]}
    assert {r["block_size_by_rank"][0] for r in two} == {2, 4, 8}
    bd3 = json.loads((tmp_path / "hf" / "config.json").read_text())["bd3"]
    assert bd3["block_size"] == 2 and bd3["trained_block_sizes"] == [2, 4, 8]
