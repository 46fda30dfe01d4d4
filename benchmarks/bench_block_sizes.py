"""One checkpoint for every block size: four specialists (L' = 2, 4, 8, 16) against one model trained
on the list [2, 4, 8, 16], all from the same AR checkpoint with equal steps and data.

    python -m benchmarks.bench_block_sizes [--steps 300] [--out benchmarks/results/block_sizes]

Data: the demo's corpus, tokenizer and shards (``pipeline.demo.prepare_ar`` stages 1-2, reused when
present). AR init: ``--init`` (a Hugging Face folder, e.g. ``demo_out/runs/ar-tiny/hf``) or, when
absent, the demo's AR recipe (``yamls/ar_tiny.yaml``: its shape, L'=1 objective, lr 3e-3, batch 16)
trained here for ``--ar-steps``. Every BD3 model then trains ``--steps`` optimizer steps on the same
rows in the same order (sample s of step k is training row perm[16k + s], noise id 16k + s), with
the bd3_tiny optimizer (AdamW lr 3e-3, cosine to 0.1x, clipping 1.0) and t ~ U[1e-3, 1] for every
size (the paper gives clipped intervals only for some sizes; one interval keeps the comparison to
block size alone). The mixed model draws one L' per step from (seed, step), uniform over the list.

Result: the NELBO bound (perplexity exp(NELBO), nats per token under t ~ U[1e-3, 1]) of each model
at L' = 1, 2, 4, 8, 16 and L on the validation rows, fixed noise (EVAL_SEED), ``--draws`` draws per
row; written to ``<out>/results.json`` and printed as a Markdown table. A plain PyTorch loop over the
library's objective (``compute_nelbo``), no Composer: on 2 shared CPU cores the trainer's overhead
would dominate a model this small.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SPECIALISTS = (2, 4, 8, 16)
BATCH = 16
LR, WARMUP, ALPHA_F, CLIP = 3e-3, 2, 0.1, 1.0


def lr_at(step: int, total: int) -> float:
    """The yamls' cosine_with_warmup: linear warmup over WARMUP steps, cosine down to ALPHA_F x LR."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    frac = (step - WARMUP) / max(total - WARMUP, 1)
    return LR * (ALPHA_F + (1 - ALPHA_F) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model, rows, order, cfg, steps: int, log) -> dict[int, int]:
    """``steps`` optimizer steps of the BD3 objective; returns how many steps used each block size."""
    from pipeline.diffusion.objective import compute_nelbo

    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    used: dict[int, int] = {}
    start = time.time()
    for step in range(steps):
        idx = order[step * BATCH : (step + 1) * BATCH]
        batch = [rows[i] for i in idx.tolist()]
        x0 = torch.stack([b["input_ids"] for b in batch])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps)
        out = compute_nelbo(model, x0, cfg, torch.arange(step * BATCH, (step + 1) * BATCH), step=step)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        used[out.block_size] = used.get(out.block_size, 0) + 1
        if step % 50 == 0 or step == steps - 1:
            log(
                f"  step {step:4d}  L'={out.block_size:<3d} nelbo {out.nelbo.item():.4f}  {time.time() - start:.0f}s"
            )
    return used


def evaluate(model, val_batches, sizes, draws: int) -> dict[int, dict]:
    from pipeline.diffusion.metrics import evaluate_block_sizes
    from pipeline.diffusion.objective import DiffusionConfig

    cfg = DiffusionConfig(block_size=sizes[0])
    return {r.block_size: r.as_dict() for r in evaluate_block_sizes(model, val_batches, sizes, cfg, draws)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_block_sizes", description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/block_sizes")
    ap.add_argument(
        "--data", default=None, help="prepared data folder (default: the demo's stages 1-2 in --out)"
    )
    ap.add_argument(
        "--init", default=None, help="AR Hugging Face folder (default: train the demo's AR recipe)"
    )
    ap.add_argument("--ar-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pipeline.demo import prepare_data
    from pipeline.diffusion.objective import DiffusionConfig
    from pipeline.model import BD3LM, from_pretrained
    from pipeline.model.config import ModelConfig
    from pipeline.model.hf_io import save_pretrained, with_mask_token
    from pipeline.rows import RowReader

    out = Path(args.out).resolve()
    data, tok = (
        (Path(args.data), Path(args.data).parent / "tokenizer.json") if args.data else prepare_data(out)
    )
    log_path = out / "bench.log"

    def log(msg: str) -> None:
        print(msg, flush=True)
        with log_path.open("a") as f:
            f.write(msg + "\n")

    train_rows = RowReader(data, "train").dataset
    val = RowReader(data, "val")
    L = val.seq_len
    n_val = min(len(val), args.eval_rows)
    val_batches = list(val.batches(list(range(n_val)), BATCH))
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(0))
    need = max(args.steps, args.ar_steps) * BATCH
    if need > len(order):
        raise SystemExit(f"{need} training rows needed, the split has {len(order)}")
    sizes = [1, 2, 4, 8, 16, L]
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["setup"] = {
        "steps": args.steps,
        "batch": BATCH,
        "seq_len": L,
        "eval_rows": n_val,
        "draws": args.draws,
        "threads": args.threads,
    }

    init = Path(args.init) if args.init else out / "ar_init"
    if not (init / "config.json").exists():
        log(f"AR init: the demo's AR recipe (yamls/ar_tiny.yaml shape), {args.ar_steps} steps -> {init}")
        config = with_mask_token(
            ModelConfig(
                vocab_size=val.manifest["tokenizer"]["vocab_size"],
                hidden_size=64,
                intermediate_size=176,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=L,
                eos_token_id=0,
                block_size=1,
            ),
            None,
        )
        ar = BD3LM(config)
        ar.init_weights(torch.Generator().manual_seed(17))  # as pipeline.train from scratch (ar_tiny's seed)
        train(ar, train_rows, order, DiffusionConfig(block_size=1), args.ar_steps, log)
        save_pretrained(ar, init, tokenizer_dir=Path(tok).parent)
    log(f"AR init: {init}")

    runs = {f"specialist L'={b}": b for b in SPECIALISTS} | {"mixed [2,4,8,16]": list(SPECIALISTS)}
    if "AR init" not in results:
        results["AR init"] = {"eval": evaluate(from_pretrained(init), val_batches, sizes, args.draws)}
        results_path.write_text(json.dumps(results, indent=2))
    for name, block_size in runs.items():
        if name in results:
            log(f"{name}: reusing {results_path}")
            continue
        log(f"{name}: {args.steps} steps")
        model = from_pretrained(init)
        t0 = time.time()
        used = train(
            model,
            train_rows,
            order,
            DiffusionConfig(block_size=block_size, stratify_group=BATCH),
            args.steps,
            log,
        )
        results[name] = {
            "train_seconds": time.time() - t0,
            "steps_per_block_size": used,
            "eval": evaluate(model, val_batches, sizes, args.draws),
        }
        results_path.write_text(json.dumps(results, indent=2))
    print(format_table(results, sizes))
    return 0


def format_table(results: dict, sizes: list[int]) -> str:
    """Markdown table of the perplexity bound per model and evaluation block size, plus the mean
    over L' in {2, 4, 8, 16}."""
    head = "| model | " + " | ".join(f"L'={s}" for s in sizes[:-1]) + f" | L={sizes[-1]} | mean 2-16 |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for name, r in results.items():
        if "eval" not in r:
            continue
        ev = {int(k): v for k, v in r["eval"].items()}
        mean = sum(ev[s]["ppl_bound"] for s in SPECIALISTS) / len(SPECIALISTS)
        cells = " | ".join(f"{ev[s]['ppl_bound']:.2f}" for s in sizes)
        lines.append(f"| {name} | {cells} | {mean:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
