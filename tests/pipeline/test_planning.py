"""``python -m pipeline.plan``: model-state bytes against DeepSpeed's estimators, the CLI's contract
(exit codes 0/2/3, JSON keys, data checks only when the data exists), and on CPU the planned peak of a
real ~36M-parameter training run against its measured peak."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from pipeline.diffusion.footprint import trace_train_step
from pipeline.diffusion.objective import DiffusionConfig
from pipeline.model import BD3LM
from pipeline.model.config import TINYLLAMA_1B_CONFIG
from pipeline.model.memory import model_state_bytes, param_counts
from pipeline.plan import main as plan_main
from pipeline.planning import plan_run
from pipeline.trainer import load_config
from tests.factories import REPO, YAMLS, tiny_data_folder, tiny_model_config, tiny_overrides, write_tokenizer

GIB = 2**30


# ------------------------------------------------------------------------------ DeepSpeed agreement
@pytest.fixture(scope="module")
def mid_model():
    """A real (allocated) 16.6M-parameter model: DeepSpeed counts parameters by data pointer."""
    torch.manual_seed(0)
    return BD3LM(tiny_model_config(32000, hidden_size=256))


def printed_gpu_gib(text: str) -> list[float]:
    """The per-GPU column of DeepSpeed's estimate table, in GiB, in printed order."""
    return [float(m[1]) for m in re.finditer(r"\|\s*([\d.]+)GB\s*\|", text)]


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero2_and_offload_equal_deepspeeds_estimator(mid_model, gpus, capsys):
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_live,
    )

    P, largest = param_counts(mid_model)
    estimate_zero2_model_states_mem_needs_all_live(mid_model, num_gpus_per_node=gpus)
    printed = printed_gpu_gib(capsys.readouterr().out)  # offload first, then no offload
    for offload, shown in zip((True, False), printed):
        ours = model_state_bytes(P, largest, gpus, "zero2", offload_optimizer=offload).total
        _, theirs = estimate_zero2_model_states_mem_needs(P, gpus, 1, cpu_offload=offload)
        assert abs(ours - theirs) <= 2  # integer division of 18P/N in parts
        assert ours / GIB == pytest.approx(shown, abs=0.006)
    # ZeRO-1 (no estimator of its own) keeps the 16-bit gradients whole: the ZeRO-2 estimate at N = 1.
    zero1 = model_state_bytes(P, largest, gpus, "zero1").total
    assert zero1 == 2 * P + 2 * P + 16 * P // gpus
    assert zero1 >= model_state_bytes(P, largest, gpus, "zero2").total
    # DDP under Composer (fp32 weights, fp32 grads, Adam): the single-GPU ZeRO-2 estimate minus the
    # 16-bit weight and gradient copies that only DeepSpeed's bf16 engine keeps.
    _, single = estimate_zero2_model_states_mem_needs(P, 1, 1, cpu_offload=False)
    assert model_state_bytes(P, largest, gpus, "ddp").total == single - 4 * P


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero3_and_offloads_equal_deepspeeds_estimator(mid_model, gpus, capsys):
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_live,
    )

    P, largest = param_counts(mid_model)
    assert largest == 32064 * 256  # the embedding (or head): DeepSpeed's largest layer
    estimate_zero3_model_states_mem_needs_all_live(mid_model, num_gpus_per_node=gpus)
    printed = printed_gpu_gib(capsys.readouterr().out)
    # DeepSpeed prints (offload_param, offload_optimizer) = (cpu, cpu) x2, (none, cpu) x2, (none, none) x2.
    cases = [(True, True), (True, True), (False, True), (False, True), (False, False), (False, False)]
    for (param, opt), shown in zip(cases, printed):
        ours = model_state_bytes(P, largest, gpus, "zero3", offload_optimizer=opt, offload_param=param).total
        _, theirs, _ = estimate_zero3_model_states_mem_needs(P, largest, gpus, 1, opt, param)
        assert abs(ours - theirs) <= 2
        assert ours / GIB == pytest.approx(shown, abs=0.006)


def test_param_counts_match_the_allocated_model_and_count_tied_weights_once(mid_model):
    with torch.device("meta"):
        meta = BD3LM(mid_model.config)
        tied = BD3LM(mid_model.config.replace(tie_word_embeddings=True))
    assert param_counts(meta) == param_counts(mid_model)
    assert param_counts(meta)[0] == sum(p.numel() for p in mid_model.parameters())
    assert param_counts(tied)[0] == param_counts(meta)[0] - 32064 * 256


# --------------------------------------------------------------------------------------- the trace
def test_trace_activations_grow_with_the_microbatch_and_shrink_with_checkpointing():
    c = tiny_model_config(num_hidden_layers=4)
    d = DiffusionConfig(block_size=4, noise_interval=(0.3, 0.8))
    kw = dict(seq_len=64, param_dtype=torch.float32)
    one = trace_train_step(c, d, batch=1, activation_checkpointing=False, **kw).activations_bytes
    four = trace_train_step(c, d, batch=4, activation_checkpointing=False, **kw).activations_bytes
    ckpt = trace_train_step(c, d, batch=4, activation_checkpointing=True, **kw).activations_bytes
    assert 3.0 < four / one <= 4.0  # linear in rows, plus a fixed part (masks, weight copies)
    assert ckpt < 0.6 * four
    # The layer inputs kept under checkpointing alone: 4 layers x (4, 2L, D) float32.
    assert ckpt > 4 * 4 * 128 * 64 * 4


def test_trace_follows_the_objectives_switches():
    """Complementary masks run a second copy whose graph lives until backward; the auxiliary AR loss
    a causal pass."""
    import dataclasses

    c = tiny_model_config(num_hidden_layers=2)
    base = DiffusionConfig(block_size=4, noise_interval=(0.3, 0.8))
    kw = dict(batch=4, seq_len=64, activation_checkpointing=False, attention="sdpa")

    def act(**switches):
        return trace_train_step(c, dataclasses.replace(base, **switches), **kw).activations_bytes

    plain = act()
    assert 1.6 < act(complementary_mask=True) / plain < 2.2
    assert act(aux_ar_weight=0.5) > 1.2 * plain


# -------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def tinyllama_dir(tmp_path):
    folder = tmp_path / "tinyllama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINYLLAMA_1B_CONFIG))
    return folder


def bd3_1b(tinyllama_dir, *extra):
    return [
        str(YAMLS / "bd3_1b.yaml"),
        "variables.data_local=/nonexistent/owt",
        f"variables.init_from={tinyllama_dir}",
        *extra,
    ]


def test_plan_bd3_1b_offline_from_config_json_alone(tinyllama_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan_main([*bd3_1b(tinyllama_dir), "--gpus", "8", "--gpu-memory", "80", "--json", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "data checks skipped" in text.out
    plan = json.loads(out.read_text())
    assert set(plan) == {
        "params", "gpus", "per_gpu", "gpu_memory_bytes", "fits", "max_microbatch", "flops_per_step",
        "seconds_per_step", "tokens_per_s", "total_hours", "data",
    }  # fmt: skip
    assert plan["data"] is None  # data checks skipped: no data section
    assert set(plan["per_gpu"]) == {
        "weights_bytes",
        "grads_bytes",
        "optimizer_bytes",
        "activations_bytes",
        "peak_bytes",
    }
    P = plan["params"]
    assert P == 1_100_310_528  # TinyLlama 1.1B with the mask token (vocabulary padded to 32064)
    g = plan["per_gpu"]
    assert g["weights_bytes"] == 2 * P  # ZeRO-2, bf16: replicated 16-bit weights
    assert (
        g["peak_bytes"]
        == sum(g[k] for k in ("weights_bytes", "grads_bytes", "optimizer_bytes")) + g["activations_bytes"]
    )
    assert plan["fits"] and plan["max_microbatch"] >= 8 and 256 // 8 % plan["max_microbatch"] == 0
    flops = plan["flops_per_step"]
    # Allowed pairs < dense pairs; both dominated by 6 x params x 2L tokens x 256 rows.
    assert 6 * P * 4096 * 256 * 0.8 < flops["allowed_pairs"] < flops["flop_counter"]
    assert plan["seconds_per_step"] == pytest.approx(flops["allowed_pairs"] / (8 * 0.4 * 989e12))
    assert plan["total_hours"] == pytest.approx(2000 * plan["seconds_per_step"] / 3600)


def test_plan_that_does_not_fit_exits_3_with_one_line(tinyllama_dir):
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.plan", *bd3_1b(tinyllama_dir), "--gpus", "8", "--gpu-memory", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 3, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("does not fit: peak") and "> 8 GiB" in line
    assert "DOES NOT FIT" in p.stdout


def test_plan_reports_config_errors_like_train(tinyllama_dir, capsys):
    assert plan_main([*bd3_1b(tinyllama_dir, "optimizer.lrr=1"), "--gpus", "8", "--gpu-memory", "80"]) == 2
    assert "config error: optimizer.lrr: unknown key; did you mean optimizer.lr?" in capsys.readouterr().err
    # The batch checks use --gpus as the world size: 256 rows do not split over 3 x 8.
    assert plan_main([*bd3_1b(tinyllama_dir), "--gpus", "3", "--gpu-memory", "80"]) == 2
    assert "global_train_batch_size: 256 is not divisible by world size 3" in capsys.readouterr().err
    missing = tinyllama_dir / "nope"
    assert plan_main([*bd3_1b(missing), "--gpus", "8", "--gpu-memory", "80", "--offline"]) == 2
    assert f"model.init_from: {str(missing)!r} is not a folder" in capsys.readouterr().err


def test_plan_runs_the_data_checks_when_the_data_exists(tiny_data, tmp_path, capsys):
    data, tok = tiny_data
    args = tiny_overrides(data, tok, tmp_path / "run")
    rc = plan_main(
        [str(YAMLS / "bd3_tiny.yaml"), *args, "--gpus", "1", "--gpu-memory", "1", "--device", "cpu"]
    )
    out = capsys.readouterr()
    assert rc == 0 and "data checks skipped" not in out.out
    # the same mismatch pipeline.train reports: the data's seq_len
    bad = [a for a in args if not a.startswith("variables.max_seq_len")] + ["variables.max_seq_len=64"]
    assert plan_main([str(YAMLS / "bd3_tiny.yaml"), *bad, "--gpus", "1", "--gpu-memory", "1"]) == 2
    assert "max_seq_len: 64 but the data in" in capsys.readouterr().err


# ------------------------------------------------------------------------------- CPU validation
MEASURE = r"""
import json, resource, sys
from pipeline.trainer import load_config
from pipeline.trainer.build import run
# Everything run() imports lazily, imported before the baseline (Composer alone is ~230 MB resident).
import composer.callbacks, composer.loggers, composer.optim, composer.trainer, streaming
import pipeline.trainer.callbacks, pipeline.trainer.safe_saves, pipeline.trainer.composer_model
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]), world_size=1)
import gc; gc.collect()
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * resource.getpagesize()
run(cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": base, "peak": peak}))
"""

MID = [
    "model.hidden_size=640",
    "model.intermediate_size=1728",
    "model.num_hidden_layers=8",
    "model.num_attention_heads=10",
    "model.num_key_value_heads=5",
    "variables.max_seq_len=128",
    "global_train_batch_size=4",
    "device_train_microbatch_size=4",
    "max_duration=3ba",
    "eval_loader=null",
    "save_folder=null",
    "autoresume=false",
    "loggers.tensorboard=null",
    "callbacks.runtime_estimator=null",
]


@pytest.mark.slow
def test_planned_peak_is_within_20_percent_of_a_real_cpu_run(tmp_path):
    """36M parameters, fp32, DDP on one process, 3 optimizer steps through Composer on CPU.

    Measured peak = the process's peak resident set (``ru_maxrss``, the kernel's high-water mark)
    minus its resident set after imports and config, in a fresh process: everything training adds
    (weights, gradients, Adam state, activations, and what the plan does not model: malloc's retained
    free memory, the data loader, Composer's state). Planned = model states (16 bytes/param) + the fake-tensor trace of one microbatch.
    """
    tok = write_tokenizer(tmp_path / "tok" / "tokenizer.json")
    data = tiny_data_folder(tmp_path / "data", tok, train_rows=64, val_rows=8, seq_len=128)
    overrides = [*tiny_overrides(data, tok, tmp_path / "run"), *MID]
    cfg = load_config(YAMLS / "bd3_tiny.yaml", overrides, world_size=1)
    plan = plan_run(cfg, gpus=1, gpu_memory_gib=64, device="cpu")
    assert 30e6 < plan.params < 100e6
    env = {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-c", MEASURE, str(YAMLS / "bd3_tiny.yaml"), json.dumps(overrides)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    measured = m["peak"] - m["baseline"]
    print(
        f"\nparams {plan.params:,}; planned peak {plan.peak_bytes / 2**20:.0f} MiB (states "
        f"{plan.states.total / 2**20:.0f} + activations {plan.activations_bytes / 2**20:.0f}); "
        f"measured {measured / 2**20:.0f} MiB; ratio {plan.peak_bytes / measured:.3f}"
    )
    assert plan.peak_bytes == pytest.approx(measured, rel=0.2)
