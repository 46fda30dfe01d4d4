"""End-to-end training with the real Composer Trainer in this process (CPU, fp32, tiny model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.trainer import load_config, run
from tests.factories import YAMLS, tiny_overrides

pytestmark = pytest.mark.slow


def train(tiny_data, save_folder: Path, *extra: str, yaml: str = "bd3_tiny.yaml"):
    data, tok = tiny_data
    cfg = load_config(YAMLS / yaml, tiny_overrides(data, tok, save_folder, *extra), world_size=1)
    return run(cfg)


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss/train/total"] for line in path.read_text().splitlines()]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}


def test_loss_decreases_and_checkpoint_is_written(tiny_data, tmp_path, one_thread):
    save = tmp_path / "run"
    log = tmp_path / "loss.jsonl"
    trainer = train(tiny_data, save, "max_duration=20ba", f"callbacks.loss_log.path={log}")
    curve = losses(log)
    print("losses:", [round(x, 3) for x in curve])
    assert len(curve) == 20
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    latest = save / "latest-rank0.pt"
    assert latest.is_symlink() and latest.resolve().name == "ep1-ba20-rank0.pt"  # 16 batches per epoch
    assert list((save / "tensorboard").rglob("events.out.tfevents.*"))
    nelbo = trainer.state.eval_metrics["eval"]["NELBO"].compute().item()
    assert math.isfinite(nelbo) and nelbo < math.log(61)  # better than uniform over the vocabulary


def test_autoresume_matches_an_uninterrupted_run_bitwise(tiny_data, tmp_path, one_thread):
    """Stop at batch 3, rerun the same command with max_duration 6: same weights as one 6-batch run.

    scheduler.t_max is fixed at 6ba so the learning rates do not depend on max_duration.
    """
    common = ["eval_loader=null", "scheduler.t_max=6ba", "save_interval=3ba", "run_name=resume-test"]
    log_a, log_b = (
        f"callbacks.loss_log.path={tmp_path}/a.jsonl",
        f"callbacks.loss_log.path={tmp_path}/b.jsonl",
    )
    full = train(tiny_data, tmp_path / "a", *common, "max_duration=6ba", log_a)
    train(tiny_data, tmp_path / "b", *common, "max_duration=3ba", log_b)
    assert len(losses(tmp_path / "b.jsonl")) == 3
    resumed = train(tiny_data, tmp_path / "b", *common, "max_duration=6ba", log_b)
    batches = [json.loads(x)["batch"] for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert batches == list(range(1, 7))
    assert losses(tmp_path / "b.jsonl") == losses(tmp_path / "a.jsonl")  # same data order and noise
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ar_init_beats_random_init(tiny_data, tmp_path, one_thread):
    """DiffuLLaMA-style: the BD3 run from the tiny AR checkpoint reaches a lower NELBO after K steps."""
    ar_dir = tmp_path / "ar"
    train(tiny_data, ar_dir, "eval_loader=null", yaml="ar_tiny.yaml")
    hf = ar_dir / "hf"
    assert all((hf / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))

    k = ["max_duration=8ba", "eval_interval=8ba", "save_interval=8ba"]
    from_ar = train(tiny_data, tmp_path / "from_ar", *k, f"variables.init_from={hf}")
    scratch = train(tiny_data, tmp_path / "scratch", *k)
    nelbo_ar = from_ar.state.eval_metrics["eval"]["NELBO"].compute().item()
    nelbo_scratch = scratch.state.eval_metrics["eval"]["NELBO"].compute().item()
    print(f"NELBO after 8 steps: from AR {nelbo_ar:.3f}, from random init {nelbo_scratch:.3f}")
    assert nelbo_ar < nelbo_scratch - 0.3, (nelbo_ar, nelbo_scratch)


def test_optional_features_run(tiny_data, tmp_path, one_thread, caplog):
    """Every switch of the objective and the optional callbacks in one short run (smoke + sanity);
    ``model.compile`` is ignored on CPU with a warning."""
    extra = [
        "max_duration=4ba",
        "eval_first=true",
        "eval_interval=4ba",
        "callbacks.ema.half_life=2ba",
        "loggers.console.log_interval=2ba",
        "diffusion.per_document=true",
        "diffusion.complementary_mask=true",
        "diffusion.anneal_steps=2",
        "diffusion.aux_ar_weight=0.5",
        "model.activation_checkpointing=true",
        "model.compile=true",
        f"callbacks.loss_log.path={tmp_path}/loss.jsonl",
    ]
    trainer = train(tiny_data, tmp_path / "run", *extra)
    assert "model.compile: ignored on CPU" in caplog.text
    assert all(layer.compiled is None for layer in trainer.state.model.model.model.layers)
    assert all(math.isfinite(x) for x in losses(tmp_path / "loss.jsonl"))
    metrics = {k: m.compute().item() for k, m in trainer.state.eval_metrics["eval"].items()}
    assert set(metrics) == {"NELBO", "MaskedCE", "ARNLL"} and all(math.isfinite(v) for v in metrics.values())
    assert (tmp_path / "run" / "latest-rank0.pt").exists()
