"""Cost of the BD3 training forward: vectorized 2L pass vs AR vs the per-block loop.

    python -m benchmarks.bench_model [--layers 4 --hidden 256 --seq-len 512 --block-size 16
                                      --batch 4 --repeats 5]

One step = forward + backward of a cross-entropy on the x_t-half logits, timed side by side on a
random-init model (``ModelConfig``, no download):
  (a) ar          causal forward over L tokens (the AR baseline);
  (b) bd3_train   one forward over concat(x_t, x_0), 2L tokens, SDPA with a dense mask;
  (b') bd3 flex   the same with FlexAttention (eager on CPU: exact, not fast);
  (c) loop        for each block b, a forward over [x_0 blocks < b, x_t block b] with block_causal
                  attention; the per-block losses add up to (b)'s loss, which the run checks.
The output head is applied to the scored positions only (x_t half; last block in the loop), as a
trainer would. With CUDA, also tokens/s and MFU of the compiled-flex bd3_train step for a
TinyLlama-shaped 1B model at L=2048 in bf16 autocast.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pipeline.model.config import TINYLLAMA_1B_CONFIG
from pipeline.model.masks import AttentionMask, check_block_size, dense_mask
from tests.factories import random_model, tiny_model_config

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
TINYLLAMA = {**TINYLLAMA_1B_CONFIG, "base_vocab_size": TINYLLAMA_1B_CONFIG["vocab_size"]}


def build_model(hidden, layers, heads, kv_heads, intermediate, base_vocab, max_len, backend, device, seed=0):
    cfg = tiny_model_config(
        base_vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
    )  # fmt: skip
    return random_model(cfg, seed, attn_backend=backend, device=device).train()


def make_batch(model, batch, seq_len, device, seed=0):
    """x_0 uniform over the base vocabulary; x_t masks each token with a per-block t ~ U[0, 1]."""
    c = model.config
    g = torch.Generator(device).manual_seed(seed)
    x0 = torch.randint(0, c.base_vocab_size, (batch, seq_len), generator=g, device=device)
    t = torch.rand(batch, seq_len, generator=g, device=device)
    xt = torch.where(torch.rand(batch, seq_len, generator=g, device=device) < t, c.mask_token_id, x0)
    return x0, xt


def _ce(model, hidden, targets):
    logits = model.lm_head(hidden)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def step_ar(model, x0, xt, bs):
    """(a) causal LM over L tokens: hidden at l predicts x_0 at l + 1."""
    h = model(x0, return_hidden=True)
    loss = _ce(model, h[:, :-1], x0[:, 1:]) / x0.numel()
    loss.backward()
    return loss.detach()


def step_bd3(model, x0, xt, bs):
    """(b) one vectorized forward over concat(x_t, x_0); loss on the x_t half."""
    L = x0.shape[1]
    h = model(torch.cat([xt, x0], dim=1), attn=AttentionMask("bd3_train", bs), return_hidden=True)
    loss = _ce(model, h[:, :L], x0) / x0.numel()
    loss.backward()
    return loss.detach()


def step_loop(model, x0, xt, bs):
    """(c) the per-block reference: B forwards of growing length, backward per block (same gradient
    as backward of the summed loss, without holding every block's graph at once)."""
    L = x0.shape[1]
    mask = AttentionMask("block_causal", bs)
    total = torch.zeros(())
    for b in range(L // bs):
        s, e = b * bs, (b + 1) * bs
        h = model(torch.cat([x0[:, :s], xt[:, s:e]], dim=1), attn=mask, return_hidden=True)
        loss = _ce(model, h[:, -bs:], x0[:, s:e]) / x0.numel()
        loss.backward()
        total = total + loss.detach().cpu()
    return total


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(step, model, x0, xt, bs):
    model.zero_grad(set_to_none=True)
    _sync(x0.device)
    t0 = time.perf_counter()
    loss = step(model, x0, xt, bs)
    _sync(x0.device)
    return time.perf_counter() - t0, float(loss)


def time_steps(steps, x0, xt, bs, repeats, warmup=1):
    """Median and min wall seconds and last loss of each ``(step, model)``, zero_grad excluded.

    Repeats are interleaved round-robin so that load from other processes on the machine hits every
    variant alike instead of whichever happened to run during a busy spell.
    """
    times = [[] for _ in steps]
    losses = [None] * len(steps)
    for i in range(warmup + repeats):
        this_round = []
        for j, (step, model) in enumerate(steps):
            sec, losses[j] = _timed(step, model, x0, xt, bs)
            this_round.append(sec)
            if i >= warmup:
                times[j].append(sec)
        label = "warm-up" if i < warmup else f"round {i - warmup + 1}/{repeats}"
        print(f"  {label}: " + " ".join(f"{t:.2f}s" for t in this_round), file=sys.stderr)
    return [(statistics.median(t), min(t), loss) for t, loss in zip(times, losses)]


def attention_pairs(mask: AttentionMask, seq_len: int) -> int:
    """Allowed (query, key) pairs of ``mask`` for a half-length ``seq_len`` (work a sparse kernel does)."""
    n = 2 * seq_len if mask.kind == "bd3_train" else seq_len
    return int(dense_mask(mask, n, n, seq_len).sum())


def step_flops(model, batch, seq_len, bs) -> tuple[float, str]:
    """Training FLOPs of one bd3_train step (forward + backward = 3x forward)."""
    c = model.config
    n_head = model.lm_head.weight.numel()
    n_body = model.num_params(exclude_embeddings=False) - model.model.embed_tokens.weight.numel()
    if not c.tie_word_embeddings:
        n_body -= n_head
    pairs = attention_pairs(AttentionMask("bd3_train", bs), seq_len)
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * pairs * batch
    flops = 6 * n_body * batch * 2 * seq_len + 6 * n_head * batch * seq_len + attn
    formula = (
        f"FLOPs/step = 6*N_body*B*2L + 6*N_head*B*L + 12*layers*H*hd*pairs*B with N_body={n_body / 1e6:.1f}M "
        f"(all weights but embeddings and output head), N_head={n_head / 1e6:.1f}M (output head, x_t half "
        f"only), pairs={pairs} allowed (q, k) of the 2L bd3_train mask per row (QK^T and PV: 4*hd "
        "FLOPs per pair and head forward, x3 with backward)"
    )
    return flops, formula


def cpu_table(args):
    torch.manual_seed(0)
    check_block_size(args.seq_len, args.block_size)
    heads = max(1, args.hidden // 64)
    kw = dict(
        hidden=args.hidden, layers=args.layers, heads=heads, kv_heads=max(1, heads // 2),
        intermediate=args.hidden * 8 // 3, base_vocab=args.vocab, max_len=2 * args.seq_len, device="cpu",
    )  # fmt: skip
    sdpa = build_model(backend="sdpa", **kw)
    flex = build_model(backend="flex", **kw)
    flex.load_state_dict(sdpa.state_dict())
    x0, xt = make_batch(sdpa, args.batch, args.seq_len, "cpu")
    L, bs = args.seq_len, args.block_size
    print(
        f"model: {sdpa.num_params(False) / 1e6:.2f}M params ({args.layers} layers, hidden {args.hidden}, "
        f"{heads} heads, vocab {sdpa.config.vocab_size}); batch {args.batch}, L={L}, L'={bs}; "
        f"{torch.get_num_threads()} threads; median of {args.repeats} (+1 warm-up), interleaved"
    )
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    rows = [
        ("(a)  ar, L, sdpa", step_ar, sdpa, L),
        ("(b)  bd3_train, 2L, sdpa", step_bd3, sdpa, 2 * L),
        ("(b') bd3_train, 2L, flex (eager)", step_bd3, flex, 2 * L),
    ]
    if not args.skip_loop:
        rows.append(("(c)  per-block loop, block_causal, sdpa", step_loop, sdpa, L * (L // bs + 1) // 2))
    timed = time_steps([(step, model) for _, step, model, _ in rows], x0, xt, bs, args.repeats)
    print(
        f"\n{'step (forward + backward)':42s} {'tokens fwd':>10s} {'median s':>9s} {'min s':>7s} {'tokens/s':>9s}"
    )
    results = {}
    for (name, _, _, n_fwd), (sec, best, loss) in zip(rows, timed):
        results[name[:4].strip()] = (sec, best, loss)
        print(f"{name:42s} {n_fwd * args.batch:10d} {sec:9.3f} {best:7.3f} {args.batch * L / sec:9.0f}")

    def ratio(a, b):
        return f"{results[a][0] / results[b][0]:5.2f}x  (from the min times: {results[a][1] / results[b][1]:.2f}x)"

    print(f"\nbd3_train / ar          = {ratio('(b)', '(a)')}")
    flex_key = "(b')"
    print(f"bd3_train flex / sdpa   = {ratio(flex_key, '(b)')}")
    if "(c)" in results:
        print(f"loop / bd3_train        = {ratio('(c)', '(b)')}")
        diff = abs(results["(c)"][2] - results["(b)"][2])
        print(f"|loss(loop) - loss(bd3_train)| = {diff:.2e} (the vectorized objective is the loop's)")
    print("tokens/s counts the L training tokens of each row (not the 2L of the doubled input).")
    print("load average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


def gpu_report(args, device="cuda", shape=TINYLLAMA, seq_len=2048):
    """Compiled-flex bd3_train step of a TinyLlama-shaped model in bf16 autocast: tokens/s and MFU."""
    bs = args.block_size
    model = build_model(
        hidden=shape["hidden_size"], layers=shape["num_hidden_layers"], heads=shape["num_attention_heads"],
        kv_heads=shape["num_key_value_heads"], intermediate=shape["intermediate_size"],
        base_vocab=shape["base_vocab_size"], max_len=seq_len, backend="flex", device=device,
    )  # fmt: skip

    def step(m, a, b, s):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return step_bd3(m, a, b, s)

    batch = args.gpu_batch
    while True:
        x0, xt = make_batch(model, batch, seq_len, device)
        try:  # the warm-up steps compile flex and build the block masks
            ((sec, _, loss),) = time_steps([(step, model)], x0, xt, bs, args.repeats, warmup=2)
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"out of memory: retrying with batch {batch}")
    flops, formula = step_flops(model, batch, seq_len, bs)
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else str(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(
        f"\n{name}: TinyLlama-shaped BD3 ({model.num_params(False) / 1e9:.2f}B params), bf16 autocast, "
        f"compiled flex, L={seq_len}, L'={bs}, batch {batch}, forward + backward (no optimizer step)"
    )
    print(f"step {sec:.3f} s, loss {loss:.3f}, {batch * seq_len / sec:,.0f} tokens/s (L tokens per row)")
    print(f"achieved {flops / sec / 1e12:.1f} TFLOP/s", end="")
    print(
        f", MFU {flops / sec / 1e12 / peak:.1%} of {peak:.0f} TFLOP/s bf16 peak"
        if peak
        else " (peak unknown)"
    )
    print(formula)
    if torch.device(device).type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", type=int, default=8192, help="base vocabulary of the CPU model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-loop", action="store_true", help="omit (c), the slowest row")
    p.add_argument("--gpu-batch", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU")
    p.add_argument("--no-gpu", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu_table(args)
    if torch.cuda.is_available() and not args.no_gpu:
        gpu_report(args)


if __name__ == "__main__":
    main()
