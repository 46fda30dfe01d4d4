"""Every GPU figure in one call: ``python -m benchmarks.gpu_check --out gpu.json`` (one H100/H200).

Imports only torch, ``pipeline.model`` and ``pipeline.diffusion`` (a GPU box has a newer torch and none
of Composer, Streaming or DeepSpeed). ``--tiny --device cpu`` runs the same code paths on a tiny shape
in well under a minute (the test suite does). Writes JSON with:

(a) ``train``: forward + backward of the TinyLlama-1.1B shape (random weights, bf16 autocast, activation
    checkpointing and per-layer compile as in bd3_1b) at L=2048, L'=16, microbatch 8 (halved until it
    fits): tokens/s, MFU in both FLOP conventions, measured peak memory beside the plan's prediction
    for the same shape (``pipeline.diffusion.footprint`` on fake tensors: weights + gradients +
    activations, no optimizer here; ``planned_peak_bytes_fused`` traces the fused attention of the
    GPU path, also on CPU); the same for ``ar`` at L and the bd3/ar step-time ratio;
(b) ``precision``: NELBO of a small model in bf16 autocast vs fp32 (same weights, same noise);
(c) ``sampling``: tokens/s at batch 1 and 16, AR with the KV cache vs BD3 L'=16 confidence decoding
    (random model with a sharpened head, as bench_sampler), NFE per token;
(d) ``flash_attn``: whether flash-attn is importable and ran, and its causal speed against SDPA;
(e) ``torch``, ``device_name``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from benchmarks.random_models import TINYLLAMA_SHAPE, small_config
from pipeline.diffusion.footprint import LiveBytes, trace_train_step, train_flops_per_sample
from pipeline.diffusion.objective import DiffusionConfig, ar_nll, compute_nelbo, eval_nelbo
from pipeline.diffusion.sampler import SamplerConfig, generate
from pipeline.model import ModelConfig, apply_compile
from pipeline.model.attention import flash_available
from tests.factories import random_model

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 (SXM)
TRAIN = DiffusionConfig(block_size=16, noise_interval=(0.3, 0.8), loss_chunk_size=4096)


def peak_tflops(device: torch.device, override: float | None) -> float:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return 989.0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps: int, warmup: int) -> float:
    """Mean seconds per call after ``warmup`` calls (compilation happens there)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def measure_peak(fn, device) -> tuple[int, str]:
    """Peak bytes of one call of ``fn`` with the model already on ``device``."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    live = LiveBytes()
    with live:
        fn()
    resident = sum(p.numel() * p.element_size() for p in fn.model.parameters())
    return live.peak + resident, "live tensor bytes (dispatch mode) + weights"


class Step:
    """One training microbatch, forward + backward, in bd3_train (BD3) or causal (AR) form."""

    def __init__(self, model, x0, kind: str, device):
        self.model, self.x0, self.kind, self.device = model, x0, kind, device
        self.ids = torch.arange(x0.shape[0])
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def __call__(self):
        self.model.zero_grad(set_to_none=True)
        with self.autocast:
            if self.kind == "bd3":
                loss = compute_nelbo(self.model, self.x0, TRAIN, self.ids).loss
            else:
                nll, n = ar_nll(self.model, self.x0)
                loss = nll.sum() / n.sum()
        loss.backward()


def check_train(config: ModelConfig, L: int, microbatch: int, device, tflops: float, steps: int) -> dict:
    """(a): BD3 and AR training steps at the bd3_1b settings, and the plan's memory for the same shape."""
    model = random_model(config, device=device, attn_backend="auto", activation_checkpointing=True).train()
    if device.type == "cuda":
        apply_compile(model)
    out = {"L": L, "block_size": TRAIN.block_size, "compiled": device.type == "cuda"}
    mb = microbatch
    while True:
        try:
            x0 = torch.randint(0, config.base_vocab_size, (mb, L), device=device)
            bd3, ar = Step(model, x0, "bd3", device), Step(model, x0, "ar", device)
            t_bd3 = timed(bd3, device, steps, warmup=2)
            t_ar = timed(ar, device, steps, warmup=2)
            peak, method = measure_peak(bd3, device)
            break
        except torch.OutOfMemoryError:
            if mb == 1:
                raise
            mb //= 2
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    trace = trace_train_step(
        config, TRAIN, batch=mb, seq_len=L, activation_checkpointing=True, autocast_dtype=torch.bfloat16,
        attention="fused" if device.type == "cuda" else "sdpa", count_flops=True,
    )  # fmt: skip
    # The plan's own trace (the GPU's fused attention) on CPU too: the same bytes on every torch, while
    # CPU SDPA's memory depends on the release (torch 2.7 materializes masked scores, 2.11 does not).
    fused = trace if device.type == "cuda" else trace_train_step(
        config, TRAIN, batch=mb, seq_len=L, activation_checkpointing=True, autocast_dtype=torch.bfloat16,
        attention="fused",
    )  # fmt: skip
    allowed = mb * train_flops_per_sample(config, TRAIN, L)
    ar_cfg = DiffusionConfig(block_size=1)
    ar_allowed = mb * train_flops_per_sample(config, ar_cfg, L)
    out.update(
        microbatch=mb,
        bd3_step_s=t_bd3,
        bd3_tokens_per_s=mb * L / t_bd3,
        bd3_mfu_allowed_pairs=allowed / t_bd3 / (tflops * 1e12),
        bd3_mfu_flop_counter=trace.flops / t_bd3 / (tflops * 1e12),
        peak_bytes=peak,
        peak_method=method,
        planned_peak_bytes=trace.peak_bytes,
        planned_over_measured=trace.peak_bytes / peak,
        planned_peak_bytes_fused=fused.peak_bytes,
        ar_step_s=t_ar,
        ar_tokens_per_s=mb * L / t_ar,
        ar_mfu_allowed_pairs=ar_allowed / t_ar / (tflops * 1e12),
        step_time_ratio_bd3_over_ar=t_bd3 / t_ar,
    )
    del model
    return out


def check_precision(device) -> dict:
    """(b): the same weights and noise, NELBO under bf16 autocast and in fp32."""
    config = small_config(hidden=256, layers=4)
    model = random_model(config, device=device, attn_backend="auto").eval()
    x0 = torch.randint(0, config.base_vocab_size, (8, 256), generator=torch.Generator().manual_seed(1)).to(
        device
    )
    ids = torch.arange(8)
    fp32 = eval_nelbo(model, x0, 16, ids, TRAIN).nelbo.item()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        bf16 = eval_nelbo(model, x0, 16, ids, TRAIN).nelbo.item()
    return {"nelbo_fp32": fp32, "nelbo_bf16": bf16, "rel_diff": abs(bf16 - fp32) / abs(fp32)}


def check_sampling(config: ModelConfig, device, new_tokens: int) -> dict:
    """(c): AR (L'=1, one cached forward per token) vs BD3 L'=16 confidence decoding, batch 1 and 16."""
    model = random_model(config, device=device, attn_backend="auto", logit_scale=60.0).eval()
    out = {"new_tokens": new_tokens}
    for batch in (1, 16):
        prompt = torch.full((batch, 1), config.eos_token_id or 0, device=device)
        for name, bs in (("ar", 1), ("bd3_L16", 16)):
            cfg = SamplerConfig(block_size=bs, max_new_tokens=new_tokens, stop_at_eos=False, seed=0)
            generate(model, prompt, SamplerConfig(**{**cfg.__dict__, "max_new_tokens": 2 * bs}))  # warm-up
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                r = generate(model, prompt, cfg)
            tokens = sum(r.lengths)
            out[f"{name}_batch{batch}_tokens_per_s"] = r.tokens_per_s
            out[f"{name}_batch{batch}_nfe_per_token"] = (r.nfe + r.cache_writes) / tokens * batch
    return out


def check_flash(device, shape) -> dict:
    """(d): causal attention, flash-attn (when importable) vs SDPA, (B, H, L, hd) bf16."""
    import torch.nn.functional as F

    B, H, L, hd = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(B, H, L, hd, device=device, dtype=dtype) for _ in range(3))
    sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, 10, 2)
    out = {"available": flash_available(), "ran": False, "sdpa_causal_ms": sdpa * 1e3, "shape": list(shape)}
    if flash_available():  # pragma: no cover - needs CUDA and flash-attn
        from flash_attn import flash_attn_func

        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        flash = timed(lambda: flash_attn_func(qt, kt, vt, causal=True), device, 10, 2)
        out.update(ran=True, flash_causal_ms=flash * 1e3, flash_speedup=sdpa / flash)
    return out


def run(tiny: bool, device: torch.device, tflops_override: float | None = None) -> dict:
    tflops = peak_tflops(device, tflops_override)
    if tiny:
        config, L, mb, new_tokens, attn = (
            small_config(hidden=64, layers=2, vocab=256, context=256),
            64,
            2,
            32,
            (2, 4, 64, 16),
        )
    else:
        config, L, mb, new_tokens, attn = ModelConfig(**TINYLLAMA_SHAPE), 2048, 8, 256, (8, 32, 2048, 64)
    started = time.perf_counter()
    result = {
        "torch": torch.__version__,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "peak_tflops": tflops,
        "shape": "tiny" if tiny else "TinyLlama-1.1B",
        "train": check_train(config, L, mb, device, tflops, steps=2 if tiny else 5),
        "precision": check_precision(device),
        "sampling": check_sampling(config, device, new_tokens),
        "flash_attn": check_flash(device, attn),
    }
    result["seconds"] = time.perf_counter() - started
    return result


def finite_numbers(obj) -> bool:
    """Every number in a nested dict/list is finite."""
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite_numbers(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny shape (CPU test of the code paths)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of the device (default: from its name)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible; use --device cpu (with --tiny)")
    torch.manual_seed(0)
    result = run(args.tiny, torch.device(args.device), args.peak_tflops)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
