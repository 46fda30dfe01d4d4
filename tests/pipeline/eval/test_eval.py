"""Offline evaluation across block sizes: AR parity at L'=1, fixed draws, processes, outputs."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from pipeline.diffusion.metrics import EVAL_SEED, evaluate_block_sizes, interval_grid, noise_interval_search
from pipeline.diffusion.objective import DiffusionConfig, compute_nelbo
from pipeline.diffusion.sampler import SamplerConfig
from pipeline.eval import main
from pipeline.rows import RowReader
from pipeline.save_folder import load_for_inference
from tests.factories import write_data_folder, write_tiny_hf_checkpoint

VOCAB, L, ROWS = 200, 16, 12
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "llama"
    shape = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, max_position_embeddings=64)
    return write_tiny_hf_checkpoint(folder, "llama", weight_std=None, pad_token_id=None, **shape)[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tokens = np.random.default_rng(0).integers(0, VOCAB, (ROWS, L)).astype(np.uint16)
    starts = [[] if i % 4 == 3 else [0, 5] for i in range(ROWS)]  # every 4th row inside one document
    root = tmp_path_factory.mktemp("data")
    return write_data_folder(root, {"val": (tokens, starts)}, vocab_size=VOCAB, compression="zstd")


def _hf_nll(hf_dir, data_dir):
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    rows = RowReader(data_dir, "val")
    total, n = 0.0, 0
    for batch in rows.batches(list(range(len(rows))), 5):
        x = batch["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(hf(x).logits[:, :-1].double(), -1).gather(2, x[:, 1:, None])
        total -= lp.sum().item()
        n += lp.numel()
    return total / n


def test_block_size_one_is_the_ar_nll_of_the_checkpoint(hf_dir, data_dir, tmp_path):
    out = tmp_path / "r.json"
    plot = tmp_path / "p.png"
    assert (
        main(
            [
                "--checkpoint",
                str(hf_dir),
                "--data",
                str(data_dir),
                "--block-sizes",
                "1,4,L",
                "--out",
                str(out),
                "--plot",
                str(plot),
                "--batch-size",
                "5",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    by_bs = {r["block_size"]: r for r in res["results"]}
    assert set(by_bs) == {1, 4, L}
    assert abs(by_bs[1]["nelbo"] - _hf_nll(hf_dir, data_dir)) < 1e-5
    assert by_bs[1]["tokens"] == ROWS * (L - 1)
    for r in res["results"]:
        assert {"block_size", "nelbo", "ppl_bound", "stderr", "tokens"} <= r.keys()
        assert math.isclose(r["ppl_bound"], math.exp(r["nelbo"]), rel_tol=1e-9)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000


def test_fixed_draws_repeat_and_seeds_agree_within_stderr(hf_dir, data_dir):
    model = load_for_inference(hf_dir)
    rows = RowReader(data_dir, "val")
    idx = list(range(len(rows)))
    cfg = DiffusionConfig(block_size=4)
    a = evaluate_block_sizes(model, rows.batches(idx, 4), [4, L], cfg, draws=2, seed=1)
    b = evaluate_block_sizes(model, rows.batches(idx, 6), [4, L], cfg, draws=2, seed=1)
    c = evaluate_block_sizes(model, rows.batches(idx, 4), [4, L], cfg, draws=2, seed=2)
    for ra, rb, rc in zip(a, b, c):
        assert ra.nelbo == pytest.approx(rb.nelbo, abs=1e-6)  # same draws whatever the batching
        assert ra.nelbo != rc.nelbo
        assert abs(ra.nelbo - rc.nelbo) < 4 * math.hypot(ra.stderr, rc.stderr)


def test_noise_interval_search_reports_the_minimum_variance(hf_dir, data_dir):
    model = load_for_inference(hf_dir)
    rows = RowReader(data_dir, "val")
    batches = list(rows.batches(list(range(len(rows))), 6))
    grid = interval_grid(widths=[0.5, 0.7], step=0.25)
    chosen, records = noise_interval_search(model, batches, 4, DiffusionConfig(block_size=4), grid=grid)
    assert len(records) == len(grid)
    variances = [r["variance"] for r in records]
    best = records[int(np.argmin(variances))]
    assert list(chosen) == best["interval"]
    assert best["variance"] == min(variances) and max(variances) > min(variances)
    # Recomputing the chosen interval alone gives the same variance (fixed noise).
    _, again = noise_interval_search(model, batches, 4, DiffusionConfig(block_size=4), grid=[tuple(chosen)])
    assert again[0]["variance"] == pytest.approx(best["variance"], rel=1e-9)


def test_noise_interval_search_criteria_against_a_loop(hf_dir, data_dir):
    """ "block" (BD3-LM) is the variance over (row, block) of the block's mean weighted loss over its
    L' positions; "row" the variance over rows of the per-row NELBO; both pooled over every batch."""
    import statistics

    model = load_for_inference(hf_dir)
    rows = RowReader(data_dir, "val")
    batches = list(rows.batches(list(range(len(rows))), 5))
    grid = [(0.3, 0.8), (0.1, 0.9)]
    cfg = DiffusionConfig(block_size=4)
    _, by_block = noise_interval_search(model, batches, 4, cfg, grid=grid, criterion="block")
    _, by_row = noise_interval_search(model, batches, 4, cfg, grid=grid, criterion="row")
    for iv, rb, rr in zip(grid, by_block, by_row):
        c = DiffusionConfig(block_size=4, noise_interval=iv, seed=EVAL_SEED)
        block_means, row_nelbo = [], []
        for batch in batches:
            with torch.no_grad():
                out = compute_nelbo(
                    model, batch["input_ids"], c, batch["sample_index"], doc_starts=batch["doc_starts"]
                )
            for r in range(out.block_nelbo.shape[0]):
                row_nelbo.append(float(out.nelbo_sum[r]) / float(out.n_scored[r]))
                block_means += [float(v) / 4 for v in out.block_nelbo[r]]
        assert rb["variance"] == pytest.approx(statistics.variance(block_means), rel=1e-6)
        assert rr["variance"] == pytest.approx(statistics.variance(row_nelbo), rel=1e-6)
        assert rb["mean_nelbo"] == rr["mean_nelbo"]
    with pytest.raises(ValueError, match="criterion"):
        noise_interval_search(model, batches, 4, cfg, grid=grid, criterion="rows")


def test_bad_block_size_and_missing_data_are_refused(hf_dir, data_dir, tmp_path, capsys):
    assert main(["--checkpoint", str(hf_dir), "--data", str(data_dir), "--block-sizes", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert main(["--checkpoint", str(hf_dir), "--data", str(tmp_path / "nope")]) == 2
    assert "data_prep" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_same_numbers(hf_dir, data_dir, tmp_path):
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    common = [
        "--checkpoint",
        str(hf_dir),
        "--data",
        str(data_dir),
        "--block-sizes",
        "1,4",
        "--batch-size",
        "4",
    ]
    assert main([*common, "--out", str(one)]) == 0
    composer = Path(sys.executable).parent / "composer"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            str(composer),
            "-n",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "pipeline.eval",
            *common,
            "--out",
            str(two),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads(p.read_text())["results"] for p in (one, two))
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        assert ra["nelbo"] == pytest.approx(rb["nelbo"], abs=1e-6)
        assert ra["stderr"] == pytest.approx(rb["stderr"], rel=1e-6)


def test_generative_perplexity_matches_transformers_rescoring(hf_dir, data_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))
    out = tmp_path / "g.json"
    args = [
        "--checkpoint",
        str(hf_dir),
        "--data",
        str(data_dir),
        "--block-sizes",
        "4",
        "--genppl",
        "--reference",
        str(hf_dir),
        "--num-samples",
        "2",
        "--gen-tokens",
        "12",
        "--gen-block-size",
        "4",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    g = json.loads(out.read_text())["generation"]
    assert len(g["samples"]) == 2 and g["scored_tokens"] > 0 and g["unigram_entropy"] > 0
    # Re-score the decoded samples independently with transformers.
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    total, n = 0.0, 0
    for text in g["samples"]:
        ids = [hf.config.bos_token_id] + tok.encode(text, add_special_tokens=False).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(hf(x).logits[:, :-1].double(), -1).gather(2, x[:, 1:, None])
        total -= lp.sum().item()
        n += lp.numel()
    assert n == g["scored_tokens"]
    assert g["gen_ppl"] == pytest.approx(math.exp(total / n), rel=1e-4)
    # BD3-LM's protocol by default, recorded with the numbers; and settable.
    assert g["protocol"] == {
        "sampler": "first_hitting",
        "top_p": 0.9,
        "threshold": SamplerConfig.threshold,
        "temperature": SamplerConfig.temperature,
        "block_size": 4,
        "max_new_tokens": 12,
        "seed": EVAL_SEED,
        "num_samples": 2,
        "reference": str(hf_dir),
        "protocol": "project",
    }
    assert g["nfe_per_token"] <= 1.0  # one token per denoising step
    assert main([*args, "--gen-sampler", "confidence", "--gen-top-p", "0.5"]) == 0
    pr = json.loads(out.read_text())["generation"]["protocol"]
    assert (pr["sampler"], pr["top_p"]) == ("confidence", 0.5)


def test_genppl_needs_a_reference(hf_dir, data_dir, capsys):
    assert main(["--checkpoint", str(hf_dir), "--data", str(data_dir), "--genppl"]) == 2
    assert "--reference" in capsys.readouterr().err


def test_default_block_sizes_include_the_trained_sizes():
    from pipeline.eval import default_block_sizes, parse_block_sizes
    from tests.factories import tiny_model_config

    trained = tiny_model_config(block_size=2, trained_block_sizes=[2, 4])
    assert parse_block_sizes(default_block_sizes(trained, 16), 16) == [1, 2, 4, 8, 16]
    assert parse_block_sizes(default_block_sizes(tiny_model_config(), 32), 32) == [1, 4, 8, 16, 32]
