"""Two processes with the real launcher (``composer -n 2``, gloo on CPU) train exactly like one.

Each sample's data and noise depend only on its position in the global training stream, DDP
averages the two halves' gradients, and Composer averages the two ranks' row-weighted losses: the
per-batch loss curve of 2 processes equals the 1-process curve up to float summation order.
"""

from __future__ import annotations

import pytest
import torch

from tests.pipeline.train.launch import assert_same_curve, launch, one_process_run, records

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    return one_process_run(tiny_data, tmp_path_factory.mktemp("one"))


def test_ddp_two_processes_match_one_process(tiny_data, tmp_path, one_process):
    launch(tiny_data, tmp_path)
    assert (tmp_path / "ckpt" / "latest-rank0.pt").exists()  # DDP: rank 0 writes the monolithic checkpoint
    assert_same_curve(one_process[0], records(tmp_path / "loss.jsonl"))


def test_composer_launch_file_trains_like_the_module(tiny_data, tmp_path):
    """``composer -n 2 launch yamls/bd3_tiny.yaml ...`` (the repository's ``launch`` file) is
    ``composer -n 2 -m pipeline.train yamls/bd3_tiny.yaml ...``: the same losses, bit for bit."""
    launch(tiny_data, tmp_path / "file", entry=("launch",))
    launch(tiny_data, tmp_path / "module")
    by_file, by_module = (
        records(tmp_path / "file" / "loss.jsonl"),
        records(tmp_path / "module" / "loss.jsonl"),
    )
    assert [r["batch"] for r in by_file] == list(range(1, 21))
    assert [r["loss/train/total"] for r in by_file] == [r["loss/train/total"] for r in by_module]
    assert (tmp_path / "file" / "ckpt" / "latest-rank0.pt").exists()


def test_fsdp2_two_processes_resume_and_match_one_process(tiny_data, tmp_path, one_process):
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
