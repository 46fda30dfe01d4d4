"""What a world-size switch costs under DeepSpeed: converting one checkpoint's ZeRO partitions into
DeepSpeed's universal checkpoint (``pipeline.trainer.elastic.convert_to_universal``, run once per
switch by rank 0, or by each node's local rank 0 for a remote save_folder).

    python -m benchmarks.bench_universal [--shape 127m] [--stages 2,3] [--world 2] [--out DIR]

Input: the project's ``BD3LM`` of the given shape (``benchmarks.random_models.small_config``, random
fp32 weights; ``127m``: hidden 768, 12 layers, MLP 2048, 8 query / 4 key-value heads, vocabulary
32,000 plus the mask token and padding, untied embeddings; ``tiny`` for a smoke run) wrapped in a real
DeepSpeed engine on ``--world`` CPU processes (gloo), torch AdamW, one optimizer step on 8 random
tokens per rank, then ``save_checkpoint``: the same files a training run writes at a checkpoint
(fp32 master weights and both Adam moments partitioned over the ranks; ZeRO-3 also partitions the
weights). The conversion is timed in this process, as the trainer runs it (one extract worker, one
merge worker), and extrapolated linearly to the 1B shape (TinyLlama, 1.1B parameters): the work is
reading, slicing and writing every parameter's fp32 state, proportional to the parameter count.

Printed and written to ``<out>/results.json``: parameters, checkpoint size, seconds, seconds per
100M parameters and the 1.1B estimate, per ZeRO stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

SHAPES = {  # name: benchmarks.random_models.small_config's arguments
    "tiny": {"hidden": 64, "layers": 2, "vocab": 512, "context": 128},
    "127m": {"hidden": 768, "layers": 12, "vocab": 32000, "context": 128},
}
PARAMS_1B = 1.1e9  # TinyLlama-1.1B, the flagship's shape (yamls/bd3_1b.yaml)


def build_model(shape: str):
    """The project's ``BD3LM`` of ``shape`` with random weights (what the trainer wraps)."""
    from benchmarks.random_models import small_config
    from tests.factories import random_model

    return random_model(small_config(**SHAPES[shape]))


def write_checkpoint(rank: int, world: int, port: int, shape: str, stage: int, folder: str) -> None:
    """One rank of the DeepSpeed engine that writes ``folder/ba1`` (spawned)."""
    import deepspeed
    import torch
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "zero_optimization": {"stage": stage},
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=config, dist_init_required=False
    )
    ids = torch.randint(0, SHAPES[shape]["vocab"], (1, 8), generator=torch.Generator().manual_seed(rank))
    logits = engine(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(folder, tag="ba1")
    tdist.barrier()
    tdist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(shape: str, stage: int, world: int, scratch: Path) -> dict:
    import torch.multiprocessing as mp

    from pipeline.trainer.elastic import convert_to_universal

    folder = scratch / f"zero{stage}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    mp.spawn(write_checkpoint, args=(world, free_port(), shape, stage, str(folder)), nprocs=world)
    written = time.perf_counter() - start
    tag = folder / "ba1"
    size = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    params = sum(p.numel() for p in build_model(shape).parameters())
    start = time.perf_counter()
    out = convert_to_universal(tag)
    seconds = time.perf_counter() - start
    converted = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    per_100m = seconds * 1e8 / params
    return {
        "shape": shape,
        "zero_stage": stage,
        "world_size": world,
        "parameters": params,
        "checkpoint_gb": size / 1e9,
        "universal_gb": converted / 1e9,
        "write_seconds": written,
        "convert_seconds": seconds,
        "seconds_per_100m_params": per_100m,
        "estimate_1b_seconds": per_100m * PARAMS_1B / 1e8,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="127m")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages, comma separated (1, 2, 3)")
    ap.add_argument("--world", type=int, default=2, help="processes that write the partitions")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/universal"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-universal-") as scratch:
        for stage in (int(s) for s in args.stages.split(",")):
            row = measure(args.shape, stage, args.world, Path(scratch))
            rows.append(row)
            print(
                f"ZeRO-{stage}, {row['parameters'] / 1e6:.0f}M parameters, {args.world} partitions "
                f"({row['checkpoint_gb']:.2f} GB): converted in {row['convert_seconds']:.1f} s = "
                f"{row['seconds_per_100m_params']:.1f} s per 100M parameters; 1.1B estimate "
                f"{row['estimate_1b_seconds']:.0f} s",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
