"""``callbacks.hf_export`` in a real run: the folder is the transformers artifact, its card the run's."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from pipeline.save_folder import RUN_CONFIG_FILE
from tests.factories import SEQ_LEN, card_table_rows
from tests.pipeline.trainer.test_eval_callbacks import COMMON, callback, train


def test_hf_export_callback_writes_the_card_of_the_run(tiny_data, tmp_path, one_thread):
    save, hf = tmp_path / "run", tmp_path / "hf"
    trainer, _ = train(
        tiny_data,
        save,
        *COMMON,
        "callbacks.block_size_likelihood.block_sizes=[1,4,L]",
        "callbacks.block_size_likelihood.num_batches=1",
        f"callbacks.hf_export.folder={hf}",
    )
    run_config = json.loads((save / RUN_CONFIG_FILE).read_text())
    assert run_config["diffusion"]["block_size"] == 4 and run_config["max_duration"] == "4ba"

    card = (hf / "README.md").read_text()
    results = callback(trainer, "BlockSizeLikelihood").last_results
    rows = card_table_rows(card)
    assert [int(r[0]) for r in rows] == [r.block_size for r in results] == [1, 4, SEQ_LEN]
    for row, r in zip(rows, results):
        assert float(row[1]) == pytest.approx(r.nelbo, abs=5e-5)
        assert float(row[2]) == pytest.approx(r.ppl_bound, abs=5e-3)
        assert row[4] == "not measured"  # no AR-init baseline in a run
    assert f"on {results[0].rows} rows of the `val` split" in card
    manifest = json.loads((tiny_data[0] / "manifest.json").read_text())
    train_split = manifest["splits"]["train"]
    assert f"- train: {train_split['rows']} rows, {train_split['tokens']} tokens" in card
    assert f"- tokens seen: {4 * 16 * SEQ_LEN}" in card
    assert "Trained from a random initialization" in card  # bd3_tiny.yaml has no init_from
    assert str(tmp_path) not in card

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    x = torch.randint(0, 50, (1, SEQ_LEN))
    model = trainer.state.model.model.eval()
    with torch.no_grad():
        assert (loaded(x).logits - model(x)).abs().max() < 1e-4


def test_hf_export_of_a_run_whose_tokenizer_has_another_name_samples(tiny_data, tmp_path, one_thread):
    """A run's tokenizer file named tok.json: the export still holds it as tokenizer.json, so
    ``pipeline.sample --checkpoint HF`` finds it (the export used to look for tokenizer.json beside it)."""
    import shutil

    from pipeline.sample import main as sample_main
    from pipeline.save_folder import TOKENIZER_FILE

    data, tok = tiny_data
    renamed = tmp_path / "tokenizers" / "tok.json"
    renamed.parent.mkdir()
    shutil.copy2(tok, renamed)
    hf = tmp_path / "hf"
    train(
        (data, renamed),
        tmp_path / "run",
        "max_duration=2ba",
        "scheduler.t_max=2ba",
        f"callbacks.hf_export.folder={hf}",
    )
    assert json.loads((hf / TOKENIZER_FILE).read_text())["model"] == json.loads(tok.read_text())["model"]
    out = tmp_path / "sample.json"
    assert (
        sample_main(["--checkpoint", str(hf), "--max-new-tokens", "8", "--device", "cpu", "--out", str(out)])
        == 0
    )
    assert len(json.loads(out.read_text())["tokens"]) >= 1
