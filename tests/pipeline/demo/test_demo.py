"""``make demo`` in its reduced mode: every stage runs through the real command lines."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.factories import card_table_rows

REPO = Path(__file__).resolve().parents[3]


def _demo(out):
    args = ["--out", str(out), "--size", "quick", "--corpus", "docstrings"]
    cmd = [sys.executable, "-m", "pipeline.demo", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quick_demo_produces_every_artifact(tmp_path):
    out = tmp_path / "demo"
    proc = _demo(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rel in [
        "corpus.jsonl",
        "tokenizer.json",
        "data/manifest.json",
        "data/train/index.json",
        "data/val/index.json",
        "code.jsonl",
        "data_code/manifest.json",  # the second stream of the BD3 stage's mixture
        "runs/ar-tiny/hf/model.safetensors",
        "runs/bd3-tiny/hf/model.safetensors",
        "runs/bd3-tiny/deepspeed",
        "runs/bd3-tiny/tensorboard",
        "comparison.png",  # one figure: baseline and trained, likelihood and downstream accuracy
        "tasks/demo_next_text.yaml",
        "sample.json",
        "summary.json",
    ]:
        assert (out / rel).exists(), rel
    seq_len = json.loads((out / "data" / "manifest.json").read_text())["seq_len"]
    for name in ("eval_ar_init_baseline.json", "eval_bd3_trained.json"):
        table = json.loads((out / name).read_text())
        sizes = [r["block_size"] for r in table["results"]]
        assert sizes == [1, 2, 4, 8, 16, seq_len]
        assert list(table["streams"]) == ["prose", "code"]  # each stream alone, and the total above
    for name in ("downstream_ar_init_baseline.json", "downstream_bd3_trained.json"):
        table = json.loads((out / name).read_text())
        cells = {(r["task"], r["metric"], r["block_size"]) for r in table["results"]}
        assert cells == {("demo_next_text", "acc", 1), ("demo_next_text", "acc", 4)}, cells
    # The transformers export's card shows the demo's table (the trained model's PPL bounds).
    card = (out / "bd3-tiny-hf" / "README.md").read_text()
    trained = json.loads((out / "eval_bd3_trained.json").read_text())["results"]
    rows = card_table_rows(card)
    assert [(int(r[0]), float(r[2])) for r in rows] == [
        (r["block_size"], round(r["ppl_bound"], 2)) for r in trained
    ]
    assert (out / "bd3-tiny-hf" / "modeling_bd3.py").exists()
    sample = json.loads((out / "sample.json").read_text())
    assert len(sample["tokens"]) > 0 and sample["tokens_per_s"] > 0
    # The export samples as stage 6 did with input_ids alone: its settings, its tokens, its NFE.
    export = out / "bd3-tiny-hf"
    saved = json.loads((export / "generation_config.json").read_text())["bd3"]
    assert {k: saved[k] for k in sample["settings"]} == sample["settings"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    start = hf.config.bos_token_id if hf.config.bos_token_id is not None else hf.config.eos_token_id
    ids, nfe = hf.bd3_generate(torch.tensor([[start]]), return_nfe=True)
    assert ids[0, 1 : 1 + len(sample["tokens"])].tolist() == sample["tokens"] and nfe == sample["nfe"]
    assert "finished in" in proc.stdout
    assert "PPL bound per stream" in proc.stdout and "BD3 code" in proc.stdout
    assert "bd3_trained demo_next_text acc" in proc.stdout  # the downstream table beside it
    assert "## Downstream tasks" in card
    # A rerun reuses every finished stage.
    again = _demo(out)
    assert again.returncode == 0
    assert "reusing" in again.stdout and "already complete" in (again.stdout + again.stderr).lower()


def test_a_stage_output_is_reused_only_whole_and_newer_than_its_model(tmp_path):
    """The demo's rerun rule: a half-written JSON, or one older than the model it was computed from
    (the model was trained again since), is computed again."""
    import os

    from pipeline.demo import finished_json

    model, out = tmp_path / "hf", tmp_path / "eval.json"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert not finished_json(out, model)  # not there
    out.write_text('{"bs4": {"ppl"')  # cut off mid-write
    assert not finished_json(out, model)
    out.write_text('{"bs4": {"ppl": 12.5}}')
    os.utime(model / "config.json", (1_000, 1_000))
    os.utime(out, (2_000, 2_000))
    assert finished_json(out, model)
    os.utime(model / "config.json", (3_000, 3_000))  # retrained after the evaluation
    assert not finished_json(out, model)
    (model / "config.json").unlink()
    assert not finished_json(out, model)
