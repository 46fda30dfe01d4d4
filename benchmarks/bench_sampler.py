"""Sampling throughput: KV cache vs recomputation, and BD3 confidence decoding vs AR decoding.

    python -m benchmarks.bench_sampler [--checkpoint DIR] [--new-tokens 1024] [--batch 1]

(a) tokens/s of block sampling with and without the KV cache (same tokens, checked);
(b) tokens/s and NFEs/token of confidence decoding at L'=4 and 16 against AR decoding of the same
weights with the KV cache (L'=1 with the shift: one cached forward per token, no denoising call).
Without --checkpoint a random model is used, with its output layer scaled up so that its
distributions are peaked (a random model's flat distributions never pass a confidence threshold);
parallel-decoding figures are only meaningful on a trained checkpoint.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.random_models import small_config
from pipeline.diffusion.sampler import SamplerConfig, generate
from pipeline.model import BD3LM
from tests.factories import random_model


def build_model(args) -> BD3LM:
    if args.checkpoint:
        from pipeline.save_folder import load_for_inference

        return load_for_inference(args.checkpoint)
    config = small_config(hidden=args.hidden, layers=args.layers)
    return random_model(config, logit_scale=args.logit_scale, attn_backend="sdpa").eval()


def run(model, prompt, **kw):
    cfg = SamplerConfig(stop_at_eos=False, **kw)
    generate(model, prompt, SamplerConfig(**{**cfg.__dict__, "max_new_tokens": 8}))  # warm-up
    return generate(model, prompt, cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--logit-scale", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    prompt = torch.full((args.batch, 1), model.config.eos_token_id or 0)
    n = args.new_tokens
    print(
        f"model: {model.num_params(False) / 1e6:.1f}M params, batch {args.batch}, {n} new tokens, "
        f"{torch.get_num_threads()} threads, device cpu"
    )

    print("\n(a) KV cache vs recomputing the prefix (confidence sampler, L'=4, threshold 0.9)")
    cached = run(model, prompt, block_size=4, max_new_tokens=n, sampler="confidence", seed=0)
    nocache = run(
        model, prompt, block_size=4, max_new_tokens=n, sampler="confidence", seed=0, use_kv_cache=False
    )
    same = torch.equal(cached.tokens, nocache.tokens)
    print(f"  with cache    {cached.tokens_per_s:9.1f} tok/s  ({cached.seconds:.2f} s)")
    print(f"  without cache {nocache.tokens_per_s:9.1f} tok/s  ({nocache.seconds:.2f} s)")
    print(f"  speed-up {cached.tokens_per_s / nocache.tokens_per_s:.1f}x; identical tokens: {same}")

    print("\n(b) BD3 confidence decoding vs AR decoding of the same weights (both with the KV cache)")
    ar = run(model, prompt, block_size=1, max_new_tokens=n, sampler="confidence", seed=0)
    rows = [("AR (L'=1)", ar)]
    for bs in (4, 16):
        rows.append(
            (
                f"BD3 L'={bs} conf 0.9",
                run(model, prompt, block_size=bs, max_new_tokens=n, sampler="confidence", seed=0),
            )
        )
    print(f"  {'decoder':22s} {'tok/s':>9s} {'vs AR':>6s} {'NFE/tok':>8s} {'writes/tok':>10s}")
    for name, r in rows:
        tokens = sum(r.lengths)
        print(
            f"  {name:22s} {r.tokens_per_s:9.1f} {r.tokens_per_s / ar.tokens_per_s:6.2f} "
            f"{r.nfe / tokens:8.3f} {r.cache_writes / tokens:10.3f}"
        )


if __name__ == "__main__":
    main()
