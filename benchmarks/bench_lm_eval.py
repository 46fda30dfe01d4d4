"""lm-eval throughput of the ``bd3`` model: block size 1 against lm-eval's ``hf`` backend, and the cost of
one Monte-Carlo sample at block sizes 4 and 16.

    python -m benchmarks.bench_lm_eval [--docs 16] [--question-words 40 80] [--mc-samples 4] [--tiny]

A LLaMA of real shape (hidden 768, 12 layers, 32,000-token vocabulary: about 134M parameters, random
weights) saved with ``transformers`` beside a 32,000-word tokenizer; a local multiple-choice task
(``tests.factories.write_lm_eval_tasks``: 4 choices of 1-3 words after a question of
``--question-words`` words). (a) requests/s of ``loglikelihood`` over every choice of every question,
``hf`` vs ``bd3`` at block size 1, the same batch size, the numbers checked equal. (b) at block sizes 4
and 16: seconds per (request x MC sample), without and with the greedy check, against the block-size-1
seconds per request; the goal is one forward over 2 x (context + continuation) per sample, i.e. about 2x.
``--tiny`` runs the same code on a tiny shape in seconds (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tests.factories import write_lm_eval_tasks, write_tokenizer

REAL_SHAPE = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=12, max_position_embeddings=1024,
)  # fmt: skip
TINY_SHAPE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


def write_model(folder: Path, shape: dict) -> Path:
    """A random ``transformers`` LLaMA of ``shape`` with a word-level tokenizer of its vocabulary."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok = write_tokenizer(folder / "tokenizer.json", n_words=shape["vocab_size"] - 1)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token="<|endoftext|>").save_pretrained(
        folder
    )
    return folder


def requests_of(task_dir: Path):
    from lm_eval.api.instance import Instance

    docs = [json.loads(line) for line in (task_dir / "mc.jsonl").read_text().splitlines()]
    pairs = [(d["question"], c) for d in docs for c in d["choices"]]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=16, help="questions (4 requests each)")
    p.add_argument("--question-words", type=int, nargs=2, default=(40, 80))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mc-samples", type=int, default=4)
    p.add_argument("--mc-requests", type=int, default=8, help="requests timed at block sizes 4 and 16")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", help="write the figures as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from pipeline.lm_eval.model import BD3EvalLM

    shape = TINY_SHAPE if args.tiny else REAL_SHAPE
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "model", shape)
        tasks = write_lm_eval_tasks(
            Path(tmp) / "tasks", args.docs, shape["vocab_size"] - 1, question_words=tuple(args.question_words)
        )
        reqs = requests_of(tasks)
        hf = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=args.batch_size)
        n_params = sum(q.numel() for q in hf.model.parameters())
        tokens = sum(len(hf.tok_encode(c + x)) for c, x in (r.args for r in reqs)) / len(reqs)
        print(
            f"model: {n_params / 1e6:.1f}M params, vocab {shape['vocab_size']}, {len(reqs)} requests of "
            f"{tokens:.0f} tokens on average, batch {args.batch_size}, {torch.get_num_threads()} threads, cpu"
        )
        hf.loglikelihood(reqs[: args.batch_size], disable_tqdm=True)  # warm-up
        hf_out, hf_s = timed(hf.loglikelihood, reqs, True)
        bd3 = BD3EvalLM(pretrained=str(folder), block_size=1, batch_size=args.batch_size, device="cpu")
        bd3.loglikelihood(reqs[: args.batch_size], disable_tqdm=True)
        bd3_out, bd3_s = timed(bd3.loglikelihood, reqs, True)
        diff = max(abs(a[0] - b[0]) for a, b in zip(hf_out, bd3_out))
        same_greedy = all(a[1] == b[1] for a, b in zip(hf_out, bd3_out))
        res = {
            "params": n_params,
            "requests": len(reqs),
            "mean_tokens": tokens,
            "hf_requests_per_s": len(reqs) / hf_s,
            "bd3_bs1_requests_per_s": len(reqs) / bd3_s,
            "bd3_over_hf": hf_s / bd3_s,
            "max_abs_loglik_diff": diff,
            "same_is_greedy": same_greedy,
        }
        print(
            f"(a) block size 1: hf {res['hf_requests_per_s']:.2f} requests/s, bd3 {res['bd3_bs1_requests_per_s']:.2f} "
            f"requests/s ({res['bd3_over_hf']:.2f}x); max |loglik diff| {diff:.2e}, is_greedy equal: {same_greedy}"
        )
        per_request_bs1 = bd3_s / len(reqs)
        sub = reqs[: args.mc_requests]
        for bs in (4, 16):
            for check in (False, True):
                lm = BD3EvalLM(
                    pretrained=str(folder), block_size=bs, mc_samples=args.mc_samples, greedy_check=check,
                    batch_size=max(1, args.batch_size // args.mc_samples), device="cpu",
                )  # fmt: skip
                _, s = timed(lm.loglikelihood, sub, True)
                per_sample = s / (len(sub) * args.mc_samples)
                key = f"bs{bs}_{'with' if check else 'without'}_greedy_check"
                res[f"{key}_s_per_sample"] = per_sample
                res[f"{key}_over_bs1_request"] = per_sample / per_request_bs1
                print(
                    f"(b) block size {bs:>2}, greedy check {'on ' if check else 'off'}: {per_sample * 1e3:.1f} ms per "
                    f"request x sample = {per_sample / per_request_bs1:.2f}x a block-size-1 request "
                    f"({args.mc_samples} samples, {len(sub)} requests)"
                )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
