"""DeepSpeed ZeRO under the Composer Trainer, with real processes (``composer -n 2``, gloo on CPU).

The 2-process DeepSpeed runs see the same data order and noise as a 1-process run, so their
per-batch losses must equal the 1-process curve up to float summation order (ZeRO reduces
gradients in buckets, in another order than DDP).
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.export import main as export_main
from pipeline.model import from_pretrained
from pipeline.trainer import ConfigError, load_config
from pipeline.trainer.deepspeed_config import build_ds_config
from tests.factories import YAMLS, tiny_overrides
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
    same_reference,
)

multiprocess = [pytest.mark.slow, pytest.mark.multiprocess]
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5  # 20 Adam steps of fp32 reductions in another order


def ds(stage: int, *extra: str) -> list[str]:
    return [f"parallelism.deepspeed.zero_optimization.stage={stage}", *extra]


@same_reference("zero2")
@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero2_reads_the_global_batches_of_one_process_and_matches_it(reference):
    """The fault tests' uninterrupted runs (test_faults.py) on a two-stream mixture with a fixed
    num_canonical_nodes: ZeRO-2 on 2 processes reads the same global batches as 1 process, row for
    row, and its curve equals the 1-process curve up to summation order. (ZeRO-1 and ZeRO-3 with a
    save_folder in the bucket: test_object_storage.py.)"""
    two, one = reference("zero2"), reference("1proc")
    assert (two / "ckpt" / "deepspeed" / "ba20").is_dir()
    one, two = records(one / "loss.jsonl"), records(two / "loss.jsonl")
    assert [r["rows"] for r in one] == [r["rows"] for r in two]  # the mixture's sample ids, in order
    assert_same_curve(one, two)


@same_reference("zero3")
@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_matches_one_process_and_its_partitions_export(tiny_data, tmp_path, reference, one_process):
    """ZeRO-3 (the fault tests' uninterrupted run; its kill and autoresume: test_faults.py): the curve
    and the weights that ``pipeline.export`` gathers from the partitions written by 2 processes equal
    1 process; the callback's export (gathered at the end of training) holds the same weights, and
    ``pipeline.eval`` reads the save_folder like the exported folder."""
    run = reference("zero3")
    assert_same_curve(one_process[0], records(run / "loss.jsonl"))
    # Export the ZeRO-3 partitions written by 2 processes, in this one process.
    assert export_main(["--checkpoint", str(run / "ckpt"), "--out", str(tmp_path / "export")]) == 0
    exported = from_pretrained(tmp_path / "export")
    reference_weights = one_process[1]
    for k, v in reference_weights.items():
        torch.testing.assert_close(exported.state_dict()[k], v, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    gathered = from_pretrained(run / "hf")
    for k, v in exported.state_dict().items():
        assert torch.equal(gathered.state_dict()[k], v), k
    # And the logits of the exported model are those of the callback's.
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x), gathered.eval()(x))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["bd3"]["mask_token_id"] is not None
    from pipeline.eval import main as eval_main

    data = tiny_data[0]
    results = []
    for ckpt in (run / "ckpt", tmp_path / "export"):
        out = tmp_path / f"{ckpt.name}.json"
        common = ["--data", str(data), "--block-sizes", "1,4", "--max-rows", "8", "--out", str(out)]
        assert eval_main(["--checkpoint", str(ckpt), *common]) == 0
        results.append(json.loads(out.read_text())["results"])
    assert results[0] == results[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_with_cpu_optimizer_offload_and_several_block_sizes(tiny_data, tmp_path, one_process_full):
    """ZeRO-3 with the optimizer offloaded to the CPU, on ``launch.FULL`` with the downstream (lm-eval)
    callback: the curve, the block sizes drawn and the evaluations at batch 20 (parameters gathered
    for every forward; the downstream tasks split over the ranks on a gathered copy) are 1 process's."""
    offload = "parallelism.deepspeed.zero_optimization.offload_optimizer.device=cpu"
    p = launch(tiny_data, tmp_path, *ds(3, offload), *downstream(tiny_data, tmp_path), common=FULL)
    one, two = one_process_full[0], records(tmp_path / "loss.jsonl")
    assert_same_curve(one, two)
    assert_block_sizes_drawn(one, two)
    assert_same_evaluation(one_process_full[3], tmp_path, p.stdout + p.stderr)
    assert_same_downstream(tiny_data, tmp_path)
    assert_downstream_split(p.stdout + p.stderr)  # on a gathered copy of the partitioned weights


def test_batch_keys_are_derived_and_checked():
    cfg = build_ds_config(
        {"zero_optimization": {"stage": 2}},
        global_batch=16,
        micro_batch=4,
        world_size=2,
        precision="amp_bf16",
        grad_clip=1.0,
    )
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    shorthand = build_ds_config(
        {"zero_optimization": {"stage": 3, "offload_optimizer": "cpu"}},
        global_batch=8,
        micro_batch=4,
        world_size=2,
        precision="fp32",
        grad_clip=None,
    )
    assert shorthand["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("parallelism.deepspeed.train_batch_size=32", "parallelism.deepspeed.train_batch_size", "derived"),
        (
            "parallelism.deepspeed.gradient_accumulation_steps=3",
            "parallelism.deepspeed.gradient_accumulation_steps",
            "derived",
        ),
        (
            "parallelism.deepspeed.zero_optimization.stage=5",
            "parallelism.deepspeed.zero_optimization.stage",
            "0, 1, 2 or 3",
        ),
        ("parallelism.deepspeed.bf16.enabled=true", "parallelism.deepspeed.bf16.enabled", "precision"),
        (
            "parallelism.deepspeed.gradient_clipping=5.0",
            "parallelism.deepspeed.gradient_clipping",
            "clipping_threshold",
        ),
        ("parallelism.fsdp.sharding_strategy=FULL_SHARD", "parallelism", "not both"),
        ("callbacks.ema.half_life=10ba", "callbacks.ema", "EMA"),
    ],
)
def test_deepspeed_config_errors_name_the_key(tiny_data, tmp_path, override, key, words):
    data, tok = tiny_data
    base = [
        "parallelism.deepspeed.zero_optimization.stage=2",
        "algorithms.gradient_clipping.clipping_threshold=1.0",
    ]
    with pytest.raises(ConfigError) as e:
        load_config(
            YAMLS / "bd3_tiny.yaml", tiny_overrides(data, tok, tmp_path, *base, override), world_size=2
        )
    assert e.value.key == key
    assert words in str(e.value)


@pytest.mark.slow
def test_export_refuses_composer_pickles_unless_trusted(one_process, tmp_path, capsys):
    save_folder = one_process[2]
    assert (save_folder / "latest-rank0.pt").exists()
    assert export_main(["--checkpoint", str(save_folder), "--out", str(tmp_path / "x")]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()
    args = ["--checkpoint", str(save_folder), "--out", str(tmp_path / "x"), "--trust-checkpoint"]
    assert export_main(args) == 0
    exported = from_pretrained(tmp_path / "x").state_dict()
    for k, v in one_process[1].items():
        assert torch.equal(exported[k], v), k
