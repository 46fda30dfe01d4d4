"""``python -m benchmarks.gpu_check --tiny --device cpu``: the GPU check's code paths on CPU, fast, with
only torch + ``pipeline.model``/``pipeline.diffusion`` imported (a GPU box has no Composer stack)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check import finite_numbers

REPO = Path(__file__).resolve().parents[2]
RUN = """
import json, sys
from benchmarks.gpu_check import main
main(sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"composer", "streaming", "deepspeed", "omegaconf",
                                                          "transformers", "data_prep", "torchmetrics"})
heavy += sorted(m for m in sys.modules if m.startswith("pipeline.trainer"))
print("HEAVY " + json.dumps(heavy))
"""

KEYS = {
    "train": {
        "L", "block_size", "compiled", "microbatch", "bd3_step_s", "bd3_tokens_per_s", "bd3_mfu_allowed_pairs",
        "bd3_mfu_flop_counter", "peak_bytes", "peak_method", "planned_peak_bytes", "planned_over_measured",
        "ar_step_s", "ar_tokens_per_s", "ar_mfu_allowed_pairs", "step_time_ratio_bd3_over_ar",
    },
    "precision": {"nelbo_fp32", "nelbo_bf16", "rel_diff"},
    "sampling": {"new_tokens"} | {
        f"{name}_batch{b}_{what}"
        for name in ("ar", "bd3_L16") for b in (1, 16) for what in ("tokens_per_s", "nfe_per_token")
    },
    "flash_attn": {"available", "ran", "sdpa_causal_ms", "shape"},
}  # fmt: skip


def test_tiny_cpu_run_writes_every_key_finite_in_under_a_minute(tmp_path):
    out = tmp_path / "gpu.json"
    start = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", RUN, "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert p.returncode == 0, p.stderr[-3000:]
    heavy = json.loads(p.stdout.rsplit("HEAVY ", 1)[1])
    assert heavy == [], f"gpu_check imported {heavy}: a GPU box has none of them"
    result = json.loads(out.read_text())
    assert {"torch", "device_name", "train", "precision", "sampling", "flash_attn"} <= set(result)
    for section, keys in KEYS.items():
        assert keys <= set(result[section]), (section, keys - set(result[section]))
    assert finite_numbers(result)
    assert seconds < 60, f"took {seconds:.0f} s"
    train = result["train"]
    assert train["bd3_tokens_per_s"] > 0 and train["ar_tokens_per_s"] > 0 and train["peak_bytes"] > 0
    # The plan's fake-tensor trace against the real step of the same shape (tensor bytes on CPU).
    assert 0.9 < train["planned_over_measured"] < 1.1
    assert result["precision"]["rel_diff"] < 0.05  # bf16 autocast keeps the loss within a few percent
    s = result["sampling"]
    assert s["ar_batch1_nfe_per_token"] == 1.0  # one cached forward per token
    assert s["bd3_L16_batch1_nfe_per_token"] < 1.0  # the sharpened head lets blocks decode in parallel
    assert result["flash_attn"]["ran"] is False  # no CUDA here
