"""Offline likelihood across block sizes: ``python -m pipeline.eval --checkpoint PATH --data DIR``.

Prints a table (block size, NELBO/token, PPL bound, std error, tokens), writes it as JSON
(``--out``) and plots the PPL bound against the block size (``--plot``). ``--data NAME=DIR`` repeated
evaluates each stream of a mixture alone (a PPL column and a plotted line each) and their
token-weighted total. Several processes
(``composer -n N -m pipeline.eval ...``) split the rows; sums are reduced exactly.

With ``--tasks a,b`` (lm-evaluation-harness tasks, ``--include-path`` for local ones) it runs those
tasks instead, at every ``--block-sizes`` entry: one table task x metric x block size, ``--out`` JSON
and ``--plot`` PNG (``pipeline.lm_eval.sweep``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from pipeline.diffusion.metrics import (
    EVAL_BLOCK_SIZES,
    EVAL_SEED,
    GENPPL_SAMPLER,
    GENPPL_TOP_P,
    resolve_block_sizes,
)
from pipeline.diffusion.sampler import SAMPLERS, SamplerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="an exported or AR Hugging Face folder (an AR checkpoint is the AR-init baseline), a training "
        "save_folder (its latest checkpoint; DeepSpeed partitions of any world size) or a Composer checkpoint",
    )
    p.add_argument(
        "--data",
        action="append",
        help="data_prep output folder (with manifest.json) or an MDS split folder; NAME=DIR, repeated, "
        "evaluates each stream of a mixture alone (a column each) and their token-weighted total "
        "(required without --tasks)",
    )
    p.add_argument("--tasks", help="lm-eval tasks, comma list: run them at each block size instead of --data")
    p.add_argument("--include-path", help="folder of lm-eval task YAMLs (local files, offline)")
    p.add_argument("--limit", type=float, help="lm-eval: documents per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples")
    p.add_argument("--mc-samples", type=int, default=32, help="lm-eval: noise draws per request at L' > 1")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--block-sizes",
        help="comma list; L means the full sequence length (MDLM) (default: "
        f"{','.join(map(str, EVAL_BLOCK_SIZES))} and every size the checkpoint was trained for; with --tasks 1,4,8,16)",
    )
    p.add_argument("--max-rows", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--draws", type=int, default=1, help="noise draws per row")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument(
        "--no-shift", action="store_true", help="position l predicts l (default: the checkpoint's setting)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write results JSON here")
    p.add_argument("--plot", help="write a PNG plot of the PPL bound vs block size here")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow unpickling Composer .pt checkpoints (only files your own runs wrote)",
    )
    p.add_argument("--genppl", action="store_true", help="also sample and score the samples with --reference")
    p.add_argument(
        "--reference",
        help="Hugging Face folder of the AR model that scores samples (with its tokenizer.json)",
    )
    p.add_argument("--num-samples", type=int, help="--genppl samples (default 8; bd3lm protocol 300)")
    p.add_argument(
        "--genppl-protocol",
        choices=("project", "bd3lm"),
        default="project",
        help="bd3lm: BD3-LM's generative perplexity (pipeline.genppl): fixed-length 1,024-token samples (start + 1,023) x 300, "
        "entropy filter, any transformers causal LM as --reference (e.g. gpt2-large), mean of per-sample "
        "perplexities and the pooled one",
    )
    p.add_argument(
        "--gen-block-size",
        type=int,
        help="block size for --genppl sampling (default: the checkpoint's smallest trained block size)",
    )
    p.add_argument(
        "--gen-tokens",
        type=int,
        help=f"tokens per sample for --genppl (default {SamplerConfig.max_new_tokens}; bd3lm 1023 after the start token)",
    )
    p.add_argument(
        "--gen-sampler",
        choices=SAMPLERS,
        default=GENPPL_SAMPLER,
        help="in-block denoiser for --genppl (default: BD3-LM's protocol, one token per step)",
    )
    p.add_argument(
        "--gen-top-p", type=float, default=GENPPL_TOP_P, help="nucleus for --genppl (default: BD3-LM's 0.9)"
    )
    return p


def run_name(checkpoint: str | Path) -> str:
    """A plot's title: the run's ``run_name`` (``run_config.json`` of the save_folder that holds the
    checkpoint, or of the folder above an export such as ``SAVE_FOLDER/hf``), else the folder's name."""
    from pipeline.save_folder import run_config_file

    p = Path(checkpoint)
    for candidate in (p, p.parent):
        f = run_config_file(candidate)
        if f.exists():
            name = json.loads(f.read_text()).get("run_name")
            if name:
                return str(name)
    return p.parent.name if p.name == "hf" else p.name


def close_distributed() -> None:
    """On every rank after the last collective: wait for the others, then destroy the process group. A
    rank that exits while its last gloo send is still in flight (lm-eval gathers its results on rank 0)
    can be aborted at interpreter exit (seen once: rank 1 ended with SIGABRT under load)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _init_distributed(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def parse_block_sizes(spec: str, seq_len: int) -> list[int]:
    """``--block-sizes`` ("1,4,L") as sorted distinct integers dividing ``seq_len``."""
    try:
        return sorted(set(resolve_block_sizes([item.strip() for item in spec.split(",")], seq_len)))
    except ValueError as e:
        raise ValueError(f"--block-sizes: {e}") from None


def default_block_sizes(config, seq_len: int) -> str:
    """``EVAL_BLOCK_SIZES`` and every trained size of ``config`` that divides ``seq_len`` (L'=2 is not among
    the defaults, and a checkpoint trained at 2 should be evaluated there)."""
    trained = config.trained_block_sizes or ([config.block_size] if config.block_size else [])
    return ",".join(map(str, [*EVAL_BLOCK_SIZES, *(b for b in trained if seq_len % b == 0)]))


def format_table(results, streams: dict | None = None) -> str:
    """One line per block size: NELBO, PPL bound, std error and tokens of ``results``; with ``streams``
    ({name: results}) first a PPL-bound column per stream (``results`` is then their total)."""
    names = list(streams or {})
    width = [max(10, len(n) + 1) for n in names]
    head = "".join(f" {n + ' PPL':>{w + 4}}" for n, w in zip(names, width))
    total = "total " if names else ""
    lines = [
        f"{'block size':>10}{head} {total + 'NELBO/token':>{12 + len(total)}} {total + 'PPL bound':>{10 + len(total)}}"
        f" {'std err':>9} {'tokens':>10}"
    ]
    for i, r in enumerate(results):
        cols = "".join(f" {streams[n][i].ppl_bound:>{w + 4}.2f}" for n, w in zip(names, width))
        lines.append(
            f"{r.block_size:>10}{cols} {r.nelbo:>{12 + len(total)}.4f} {r.ppl_bound:>{10 + len(total)}.2f}"
            f" {r.stderr:>9.4f} {r.tokens:>10}"
        )
    return "\n".join(lines)


def parse_streams(items: list[str]) -> dict[str, str]:
    """``--data`` values as {name: folder}: one plain DIR is the stream "data"; several need NAME=DIR."""
    if len(items) == 1 and "=" not in items[0]:
        return {"data": items[0]}
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--data {item!r}: with several --data, give each as NAME=DIR")
        if name in out:
            raise ValueError(f"--data names stream {name!r} twice")
        out[name] = folder
    return out


def _genppl(args, model, checkpoint: Path) -> dict:
    from tokenizers import Tokenizer

    from pipeline.diffusion.metrics import generation_protocol, generative_perplexity
    from pipeline.diffusion.sampler import SamplerConfig
    from pipeline.genppl import BD3LM_PROTOCOL
    from pipeline.save_folder import TOKENIZER_FILE, load_for_inference

    def tokenizer_of(folder):
        folder = Path(folder) if Path(folder).is_dir() else Path(folder).parent
        path = folder / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: --genppl needs the tokenizer beside each model")
        return Tokenizer.from_file(str(path))

    bd3lm = args.genppl_protocol == "bd3lm"
    if args.num_samples is None:
        args.num_samples = BD3LM_PROTOCOL["num_samples"] if bd3lm else 8
    if args.gen_tokens is None:
        args.gen_tokens = BD3LM_PROTOCOL["max_new_tokens"] if bd3lm else SamplerConfig.max_new_tokens
    block = args.gen_block_size or model.config.block_size
    if block is None:
        raise ValueError("the checkpoint records no block size: pass --gen-block-size")
    cfg = SamplerConfig(
        block_size=block,
        max_new_tokens=args.gen_tokens,
        sampler=args.gen_sampler,
        top_p=args.gen_top_p,
        eos_token_id=model.config.eos_token_id,
        shift=model.config.shift,
        seed=args.seed,
    )
    protocol = {
        **generation_protocol(cfg, args.num_samples, args.reference),
        "protocol": args.genppl_protocol,
    }
    if bd3lm:
        from pipeline.genppl import generative_perplexity as bd3lm_genppl

        out = bd3lm_genppl(model, tokenizer_of(checkpoint), args.reference, cfg, args.num_samples)
        return {**out, "protocol": protocol}
    reference = load_for_inference(args.reference, device=args.device)
    out = generative_perplexity(
        model, tokenizer_of(checkpoint), reference, tokenizer_of(args.reference), cfg, args.num_samples
    )
    return {**out, "protocol": protocol}


def _downstream(args) -> int:
    """``--tasks``: lm-eval's tasks at each block size; one table, JSON and plot."""
    from pipeline.lm_eval.sweep import format_table, plot_downstream, run_tasks

    try:
        sizes = sorted({int(b) for b in args.block_sizes.split(",")})
    except ValueError:
        print(f"error: --block-sizes with --tasks takes integers, got {args.block_sizes!r}", file=sys.stderr)
        return 2
    model_args = dict(
        mc_samples=args.mc_samples, seed=args.seed, batch_size=args.batch_size, device=args.device
    )
    model_args["trust_checkpoint"] = args.trust_checkpoint
    results = run_tasks(
        args.checkpoint,
        [t.strip() for t in args.tasks.split(",")],
        sizes,
        include_path=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        model_args=model_args,
    )
    close_distributed()
    if not results:  # ranks other than 0 of several processes
        return 0
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"checkpoint": str(args.checkpoint), "tasks": args.tasks, "mc_samples": args.mc_samples}
        payload.update(seed=args.seed, limit=args.limit, num_fewshot=args.num_fewshot)
        payload["results"] = [r.as_dict() for r in results]
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        plot_downstream(results, args.plot, title=run_name(args.checkpoint))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tasks:
        args.block_sizes = args.block_sizes or "1,4,8,16"
        return _downstream(args)
    if not args.data:
        print("error: --data is required (or --tasks to run lm-eval tasks)", file=sys.stderr)
        return 2
    from pipeline.diffusion.metrics import combine_results, evaluate_block_sizes, plot_ppl_bounds
    from pipeline.diffusion.objective import DiffusionConfig
    from pipeline.rows import RowReader
    from pipeline.save_folder import load_for_inference, local_checkpoint

    rank, world = _init_distributed(args.device)
    try:
        readers = {name: RowReader(folder, args.split) for name, folder in parse_streams(args.data).items()}
        checkpoint = local_checkpoint(args.checkpoint)
        model = load_for_inference(checkpoint, device=args.device, trust_checkpoint=args.trust_checkpoint)
        for name, reader in readers.items():
            reader.check_vocab(model.config.base_vocab_size)
            if reader.seq_len != next(iter(readers.values())).seq_len:
                raise ValueError(f"--data {name}: rows of {reader.seq_len} tokens, unlike the first stream's")
        block_sizes = parse_block_sizes(
            args.block_sizes or default_block_sizes(model.config, reader.seq_len), reader.seq_len
        )
        if args.genppl and not args.reference:
            raise ValueError(
                "--genppl needs --reference PATH (an AR Hugging Face folder with tokenizer.json)"
            )
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = DiffusionConfig(block_size=block_sizes[0], shift=model.config.shift and not args.no_shift)
    per_stream, rows = {}, 0
    for name, reader in readers.items():  # each stream alone: its rows' noise ids are its own indices
        n = min(len(reader), args.max_rows or len(reader))
        batches = reader.batches(list(range(rank, n, world)), args.batch_size)
        per_stream[name] = evaluate_block_sizes(
            model, batches, block_sizes, cfg, draws=args.draws, seed=args.seed
        )
        rows += n
    several = len(per_stream) > 1
    results = combine_results(list(per_stream.values())) if several else per_stream["data"]
    close_distributed()  # the sums are all-reduced: what follows runs on rank 0 alone
    if rank != 0:
        return 0
    print(format_table(results, per_stream if several else None))
    payload = {
        "checkpoint": str(args.checkpoint),
        "data": args.data[0] if not several else dict(parse_streams(args.data)),
        "split": args.split,
        "rows": rows,
        "draws": args.draws,
        "seed": args.seed,
        "shift": cfg.shift,
        "results": [r.as_dict() for r in results],
    }
    if several:
        payload["streams"] = {name: [r.as_dict() for r in rs] for name, rs in per_stream.items()}
    if args.genppl:
        payload["generation"] = _genppl(args, model, checkpoint)
        g = payload["generation"]
        pr = g["protocol"]
        if "gen_ppl_mean" in g:
            print(
                f"generative perplexity (BD3-LM's protocol) under {args.reference}: mean of per-sample "
                f"{g['gen_ppl_mean']:.2f}, pooled {g['gen_ppl_pooled']:.2f} over {g['scored_tokens']} tokens; "
                f"entropy {g['entropy_mean']:.3f} nats; {g['redraws']} samples redrawn"
            )
        else:
            print(
                f"generative perplexity under {args.reference}: {g['gen_ppl']:.2f} over {g['scored_tokens']} tokens; "
                f"unigram entropy {g['unigram_entropy']:.3f} nats; {g['nfe_per_token']:.2f} NFE/token "
                f"({pr['sampler']}, top-p {pr['top_p']}, L'={pr['block_size']}, {pr['max_new_tokens']} tokens)"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        ar = next((r.ppl_bound for r in results if r.block_size == 1), None)
        streams = per_stream if several else None
        plot_ppl_bounds(results, args.plot, title=run_name(args.checkpoint), ar_ppl=ar, streams=streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
