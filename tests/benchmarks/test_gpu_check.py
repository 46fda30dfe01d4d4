"""``python -m benchmarks.gpu_check --tiny --device cpu``: the GPU check's code paths on CPU, fast, with
only torch + ``pipeline.model``/``pipeline.diffusion`` imported (a GPU box has no Composer stack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import finite_numbers

REPO = Path(__file__).resolve().parents[2]
# `make test` names the interpreter of the other torch (.venv-compat's, torch 2.11) for the comparison.
OTHER_PYTHON = "BD3_COMPAT_PYTHON"
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
        "planned_peak_bytes_fused",
        "ar_step_s", "ar_tokens_per_s", "ar_mfu_allowed_pairs", "step_time_ratio_bd3_over_ar",
    },
    "precision": {"nelbo_fp32", "nelbo_bf16", "rel_diff"},
    "sampling": {"new_tokens"} | {
        f"{name}_batch{b}_{what}"
        for name in ("ar", "bd3_L16") for b in (1, 16) for what in ("tokens_per_s", "nfe_per_token")
    },
    "flash_attn": {"available", "ran", "sdpa_causal_ms", "shape"},
}  # fmt: skip


def run_tiny(python: str, out: Path) -> tuple[dict, float, list[str]]:
    """(gpu_check --tiny --device cpu's JSON, seconds, heavy modules imported) under ``python``."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [python, "-c", RUN, "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), seconds, json.loads(p.stdout.rsplit("HEAVY ", 1)[1])


def key_paths(obj, prefix="") -> set[str]:
    """Every key path of a nested dict."""
    if not isinstance(obj, dict):
        return set()
    return {f"{prefix}{k}" for k in obj} | {p for k, v in obj.items() for p in key_paths(v, f"{prefix}{k}.")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny(sys.executable, tmp_path_factory.mktemp("gpu_check") / "gpu.json")


def test_tiny_cpu_run_writes_every_key_finite_in_under_a_minute(tiny_run):
    result, seconds, heavy = tiny_run
    assert heavy == [], f"gpu_check imported {heavy}: a GPU box has none of them"
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


def test_the_same_keys_and_memory_plan_on_the_gpu_machines_torch(tiny_run, tmp_path):
    """gpu_check under the other environment's torch (``make test``: 2.11 in .venv-compat, beside 2.7
    here): the same keys, every number finite, and the plan's trace of the GPU path (fused attention)
    within 2%. The traces with CPU SDPA differ by design: torch 2.7 materializes the masked scores,
    2.11's fused CPU kernel does not."""
    other = os.environ.get(OTHER_PYTHON)
    if not other:
        pytest.skip(f"{OTHER_PYTHON} is unset: `make test` sets it to .venv-compat's python")
    ours, _, _ = tiny_run
    theirs, _, heavy = run_tiny(other, tmp_path / "other.json")
    assert heavy == []
    assert ours["torch"] != theirs["torch"], "the same torch twice: nothing compared"
    assert key_paths(theirs) == key_paths(ours)
    assert finite_numbers(ours) and finite_numbers(theirs)
    a, b = ours["train"]["planned_peak_bytes_fused"], theirs["train"]["planned_peak_bytes_fused"]
    assert abs(a - b) <= 0.02 * max(a, b), (ours["torch"], a, theirs["torch"], b)
    for result in (ours, theirs):  # each plan against the real step under its own torch
        assert 0.9 < result["train"]["planned_over_measured"] < 1.1
