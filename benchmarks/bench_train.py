"""Training step cost on CPU: Composer overhead and DeepSpeed ZeRO vs DDP.

    python -m benchmarks.bench_train [--steps 30] [--skip 5]

(a) ``yamls/bd3_tiny.yaml`` on synthetic MDS data, one process: seconds per batch of the Composer
    Trainer against a plain PyTorch loop over the same model, objective, optimizer and data
    (the same StreamingDataset); the difference is the trainer's overhead.
(b) ``composer -n 2``: seconds per batch under DDP and DeepSpeed ZeRO-1/2/3 (gloo), from the
    per-batch wall-clock times the ``loss_log`` callback records.
Steady state: the first ``--skip`` batches (start-up, first-touch allocation) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.factories import write_data_folder, write_tokenizer

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
VOCAB = 512


def make_data(root: Path) -> tuple[Path, Path]:
    """Random-token rows (one document start each) in a data_prep-style folder, and its tokenizer."""
    tok = write_tokenizer(root / "tokenizer.json", n_words=VOCAB - 1)
    rng = np.random.default_rng(0)
    splits = {}
    for split, rows in (("train", 2048), ("val", 64)):
        splits[split] = rng.integers(0, VOCAB, (rows, SEQ_LEN)).astype(np.uint16), [[0]] * rows
    return write_data_folder(root, splits, tok, size_limit=1 << 26), tok


def overrides(data: Path, tok: Path, out: Path, steps: int) -> list[str]:
    return [
        f"variables.data_local={data}",
        f"variables.tokenizer={tok}",
        f"variables.max_seq_len={SEQ_LEN}",
        f"variables.save_folder={out}/ckpt",
        f"max_duration={steps}ba",
        f"scheduler.t_max={steps}ba",
        "eval_loader=null",
        "loggers.progress_bar=null",
        "loggers.tensorboard=null",
        "save_interval=1000ba",
        f"callbacks.loss_log.path={out}/loss.jsonl",
        "callbacks.runtime_estimator=null",
        "autoresume=false",
    ]


def step_seconds(loss_log: Path, skip: int) -> float:
    times = [json.loads(line)["time"] for line in loss_log.read_text().splitlines()]
    return (times[-1] - times[skip - 1]) / (len(times) - skip)


def composer_run(data, tok, out: Path, steps: int, skip: int) -> float:
    from pipeline.trainer import load_config, run

    run(load_config(REPO / "yamls" / "bd3_tiny.yaml", overrides(data, tok, out, steps), world_size=1))
    return step_seconds(out / "loss.jsonl", skip)


def plain_loop(data, tok, out: Path, steps: int, skip: int) -> float:
    """The same work without Composer: dataloader -> compute_nelbo -> backward -> clip -> AdamW step."""
    from composer.optim import DecoupledAdamW

    from pipeline.diffusion.objective import compute_nelbo
    from pipeline.rows import packed_rows_dataset_class
    from pipeline.trainer import load_config
    from pipeline.trainer.build import build_model
    from pipeline.trainer.config import diffusion_config
    from pipeline.trainer.run_inputs import resolve_run_inputs

    cfg = load_config(REPO / "yamls" / "bd3_tiny.yaml", overrides(data, tok, out, steps), world_size=1)
    model = build_model(cfg, resolve_run_inputs(cfg))
    dcfg = diffusion_config(cfg)
    opt = DecoupledAdamW(model.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas))
    bsz, micro = cfg.global_train_batch_size, cfg.device_train_microbatch_size
    ds = packed_rows_dataset_class()(
        seq_len=SEQ_LEN,
        local=str(data / "train"),
        split=None,
        shuffle=True,
        batch_size=bsz,
        shuffle_seed=9176,
        num_canonical_nodes=1,
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=bsz, num_workers=0, drop_last=True)
    times = []
    seen = 0
    for step, batch in enumerate(loader):
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        for s in range(0, bsz, micro):
            x = batch["input_ids"][s : s + micro]
            ids = torch.arange(seen + s, seen + s + micro)
            out_ = compute_nelbo(
                model, x, dcfg, ids, step=step, doc_starts=batch["doc_starts"][s : s + micro]
            )
            (out_.loss * (micro / bsz)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += bsz
        times.append(time.time())
    return (times[-1] - times[skip - 1]) / (len(times) - skip)


def launch(data, tok, out: Path, steps: int, extra: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(Path(sys.executable).with_name("composer")),
        "-n",
        "2",
        "--master_port",
        str(port),
        "-m",
        "pipeline.train",
        str(REPO / "yamls" / "bd3_tiny.yaml"),
        *overrides(data, tok, out, steps),
        *extra,
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--no-distributed", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_train."))
    data, tok = make_data(root / "data")
    print(
        f"bd3_tiny.yaml, seq_len {SEQ_LEN}, global batch 16 (microbatch 4), {args.steps} steps "
        f"(first {args.skip} untimed), torch threads 1, CPU"
    )
    comp = composer_run(data, tok, root / "composer", args.steps, args.skip)
    plain = plain_loop(data, tok, root / "plain", args.steps, args.skip)
    tokens = 16 * SEQ_LEN
    print("\n(a) one process")
    print(f"  Composer Trainer  {comp * 1e3:8.1f} ms/batch  {tokens / comp:9.0f} tokens/s")
    print(f"  plain PyTorch     {plain * 1e3:8.1f} ms/batch  {tokens / plain:9.0f} tokens/s")
    print(f"  Composer overhead {100 * (comp / plain - 1):+.1f}%")
    if args.no_distributed:
        return
    print("\n(b) 2 processes (composer -n 2, gloo), ms per batch")
    base = None
    for name, extra in [
        ("DDP", []),
        ("ZeRO-1", ["parallelism.deepspeed.zero_optimization.stage=1"]),
        ("ZeRO-2", ["parallelism.deepspeed.zero_optimization.stage=2"]),
        ("ZeRO-3", ["parallelism.deepspeed.zero_optimization.stage=3"]),
    ]:
        out = root / name
        launch(data, tok, out, args.steps, extra)
        sec = step_seconds(out / "loss.jsonl", args.skip)
        base = base or sec
        print(f"  {name:7s} {sec * 1e3:8.1f} ms/batch   {sec / base:5.2f}x DDP")


if __name__ == "__main__":
    main()
