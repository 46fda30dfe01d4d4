"""The ``bd3`` lm-eval model: the hf backend's numbers at block size 1, the exact NELBO in expectation at
block size 2, common random numbers across the choices of a question, fixed seeds, clear errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pipeline.diffusion.noise import MIN_T  # noqa: E402
from pipeline.lm_eval.model import BD3EvalLM  # noqa: E402
from pipeline.lm_eval.scoring import continuation_bound, draw_noise  # noqa: E402
from pipeline.model.masks import AttentionMask  # noqa: E402
from tests.factories import write_lm_eval_tasks, write_tiny_hf_checkpoint, write_tokenizer  # noqa: E402

TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]


# What an in-process training run of another test on this pytest worker may leave in os.environ
# (Composer's single-process dist settings): accelerate, under lm-eval's HFLM, takes LOCAL_RANK or
# WORLD_SIZE as a distributed launch and asks for MASTER_ADDR.
DIST_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture(scope="module", autouse=True)
def _no_distributed_environment():
    with pytest.MonkeyPatch.context() as mp:
        for name in DIST_VARIABLES:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def ar_folder(tmp_path_factory):
    """A tiny LLaMA folder that both backends load, with a transformers tokenizer beside it."""
    from transformers import PreTrainedTokenizerFast

    folder, _ = write_tiny_hf_checkpoint(tmp_path_factory.mktemp("ar") / "llama", "llama")
    tok_file = write_tokenizer(folder / "tokenizer.json", n_words=249)
    PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_lm_eval_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tasks(task_dir):
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def _run(lm, tasks, names=TASKS):
    out = simple_evaluate(model=lm, tasks=names, task_manager=tasks, log_samples=True, random_seed=0)
    resps = {t: [s["resps"] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])] for t in names}
    return out["results"], resps


def _close(a, b, tol):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tol * max(1.0, abs(a))
    return a == b


@pytest.fixture(scope="module")
def hf_results(ar_folder, tasks):
    return _run(HFLM(pretrained=str(ar_folder), device="cpu", dtype="float32", batch_size=4), tasks)


def test_block_size_one_equals_the_hf_backend(ar_folder, task_dir, tasks, hf_results, one_thread):
    bd3 = BD3EvalLM(pretrained=str(ar_folder), block_size=1, batch_size=3, device="cpu")
    results, resps = _run(bd3, tasks)
    hf_metrics, hf_resps = hf_results
    for task in TASKS:
        assert _close(resps[task], hf_resps[task], 1e-5), task
        for key, value in hf_metrics[task].items():
            if key == "alias" or isinstance(value, str):
                continue
            assert results[task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
    # the generation task produced real text, and the rolling task several windows per document
    assert any(r[0][0].strip() for r in resps["tiny_gen"])
    assert bd3.max_length == 256
    assert len(resps["tiny_mc"]) == 6 and all(len(r) == 4 for r in resps["tiny_mc"])
    assert any(len(bd3.tok_encode(d)) > 256 for d in _ppl_texts(task_dir))  # several rolling windows


def _ppl_texts(task_dir):
    import json

    return [json.loads(line)["text"] for line in open(task_dir / "ppl.jsonl")]


def _exact_block_nelbo(model, row, n_ctx, block_size, align, nodes=64):
    """Exact -NELBO of the continuation (float64), block by block through the KV cache (another code
    path than the vectorized bound): for each block holding continuation positions, the clean blocks
    before it written to a cache on the grid (``align``: a shorter first block so that the continuation
    starts a block; else aligned at 0), then every mask subset of its continuation positions run as a
    ``bd3_decode`` query; t integrated over U[1e-3, 1] by Gauss-Legendre quadrature."""
    mask_id = model.config.mask_token_id
    x, grid, weights = torch.tensor(row), *(torch.tensor(a) for a in _legendre(nodes))
    t = MIN_T + (1 - MIN_T) * (grid + 1) / 2
    w = weights / 2  # the density of U[1e-3, 1] times the interval's length cancel: mean over t
    head = n_ctx % block_size if align else 0
    starts = ([0] if head else []) + list(range(head, len(row), block_size))
    ends = starts[1:] + [len(row)]
    total = 0.0
    for i, (start, end) in enumerate(zip(starts, ends)):
        scored = [p for p in range(start, end) if p >= n_ctx]
        if not scored:
            continue
        cache, last = model.new_kv_cache(1), None
        with torch.no_grad():
            for a, b in zip(starts[:i], ends[:i]):
                attn = AttentionMask("bd3_decode", block_size)
                last = model(x[None, a:b], attn=attn, kv_cache=cache, write_cache=True)[0, -1]
        for k in range(1, len(scored) + 1):
            for subset in itertools.combinations(scored, k):
                block = torch.cat([x[start:end], torch.full((block_size - (end - start),), mask_id)])
                block[[p - start for p in subset]] = mask_id
                with torch.no_grad():
                    logits = model(block[None], attn=AttentionMask("bd3_decode", block_size), kv_cache=cache)[
                        0
                    ]
                # the shift: the block's first token is predicted by the last clean position, the others
                # by the noisy position before them
                logits = torch.cat([last[None], logits[:-1]]).double()
                logits[..., model.invalid_output_ids] = float("-inf")
                logp = torch.log_softmax(logits, -1)
                ce = -sum(float(logp[p - start, x[p]]) for p in subset)
                n = len(scored)
                law = (t ** (k - 1) * (1 - t) ** (n - k) * w).sum().item()  # E[(1/t) t^k (1-t)^(n-k)]
                total -= ce * law
    return total


def _legendre(n):
    import numpy as np

    return np.polynomial.legendre.leggauss(n)


@pytest.mark.parametrize("align", [True, False], ids=["blocks_after_context", "grid_at_0"])
def test_block_size_two_monte_carlo_mean_is_the_exact_nelbo(ar_folder, one_thread, align):
    bd3 = BD3EvalLM(pretrained=str(ar_folder), block_size=2, mc_samples=4000, batch_size=1, device="cpu")
    # context of 3, continuation of 3: blocks [3,4], [5] after the context, or [2,3], [4,5] at 0
    row, n_ctx = [5, 9, 14, 3, 22, 7], 3
    t, u = draw_noise(row[:n_ctx], 7, 4000, 16)
    rows, ctx = [row] * 4000, [n_ctx] * 4000
    values = continuation_bound(bd3.model, rows, ctx, t, u, 2, True, align_context=align).double()
    mean, se = values.mean().item(), values.std().item() / math.sqrt(len(values))
    exact = _exact_block_nelbo(bd3.model, row, n_ctx, 2, align)
    assert abs(mean - exact) < 3 * se, (mean, exact, se)
    assert se < 0.05 * abs(exact)  # the comparison is sharp enough to catch a wrong weight or layout
    other = _exact_block_nelbo(bd3.model, row, n_ctx, 2, not align)
    assert abs(other - exact) > 1e-3  # the two grids are two bounds: the parametrization tests both


@pytest.mark.parametrize("block_size", [2, 4])
def test_rows_of_any_grid_shift_in_one_call_equal_each_alone(ar_folder, block_size, one_thread):
    """Rows whose contexts need different grid shifts (one forward per shift) and of different lengths
    (padded): each value equals the row scored alone."""
    bd3 = BD3EvalLM(pretrained=str(ar_folder), block_size=block_size, device="cpu")
    rows = [[5, 9, 14, 3, 22, 7, 8], [4, 6, 30], [11, 12, 13, 14, 15, 16, 17, 18, 19], [2, 8, 9, 10, 40]]
    n_ctx = [3, 1, 6, 2]
    t, u = draw_noise([1], 3, len(rows), 32)
    together = continuation_bound(bd3.model, rows, n_ctx, t, u, block_size, True)
    for i, (row, k) in enumerate(zip(rows, n_ctx)):
        alone = continuation_bound(bd3.model, [row], [k], t[i : i + 1], u[i : i + 1], block_size, True)
        assert together[i].item() == pytest.approx(alone.item(), abs=1e-5), i


def test_choices_share_noise_and_seed_fixes_results(ar_folder, tasks, one_thread):
    bd3 = BD3EvalLM(pretrained=str(ar_folder), block_size=2, mc_samples=8, batch_size=4, device="cpu")
    ctx = bd3.tok_encode("w1 w2 w3")
    a, b = draw_noise(ctx, bd3.seed, 8, 64), draw_noise(ctx, bd3.seed, 8, 64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], draw_noise(ctx, bd3.seed + 1, 8, 64)[0])
    # every choice of a question is scored with its context's draws: shared noise (common random numbers)
    from lm_eval.api.instance import Instance

    reqs = [
        Instance("loglikelihood", {}, ("w1 w2 w3", c), i)
        for i, c in enumerate([" w4 w5", " w6", " w7 w8 w9"])
    ]
    got = bd3.loglikelihood(reqs)
    t, u = draw_noise(ctx, bd3.seed, 8, bd3.max_length + 2 * bd3.block_size)
    for (value, _), (_, cont) in zip(got, (r.args for r in reqs)):
        row = ctx + bd3.tok_encode("w1 w2 w3" + cont)[len(ctx) :]
        expected = continuation_bound(bd3.model, [row] * 8, [len(ctx)] * 8, t, u, 2, True).mean().item()
        assert value == pytest.approx(expected, abs=1e-5)
    single = BD3EvalLM(pretrained=str(ar_folder), block_size=2, mc_samples=8, batch_size=1, device="cpu")
    assert [v for v, _ in single.loglikelihood(reqs)] == pytest.approx(
        [v for v, _ in got], abs=1e-5
    )  # batching does not change the draws
    r1, s1 = _run(bd3, tasks, ["tiny_mc"])
    r2, s2 = _run(bd3, tasks, ["tiny_mc"])
    assert s1 == s2 and r1 == r2


def test_bad_model_args_are_clear(ar_folder):
    with pytest.raises(ValueError, match="unknown model_args.*blocksize"):
        BD3EvalLM(pretrained=str(ar_folder), blocksize=4)
    with pytest.raises(ValueError, match="mc_samples must be >= 1"):
        BD3EvalLM(pretrained=str(ar_folder), mc_samples=0)
    with pytest.raises(ValueError, match="block_grid must be one of .'context', 'sequence'., got 'start'"):
        BD3EvalLM(pretrained=str(ar_folder), block_grid="start")
    # A choice longer than the model's window is named, not a shape error deep in the scoring.
    lm = BD3EvalLM(pretrained=str(ar_folder), max_length=8)
    with pytest.raises(ValueError, match="continuation of 9 tokens does not fit the model's window of 8"):
        lm._loglikelihood_tokens([(None, [5], list(range(5, 14)))], disable_tqdm=True)
    # ... while one of exactly max_length tokens (a rolling window's first) is scored at every size.
    for size in (1, 2):
        lm = BD3EvalLM(pretrained=str(ar_folder), max_length=8, block_size=size)
        [(value, _)] = lm._loglikelihood_tokens(
            [(None, [5], list(range(5, 13)))], disable_tqdm=True, greedy=False
        )
        assert math.isfinite(value) and value < 0


@pytest.mark.slow  # a fresh interpreter imports lm-eval and indexes its built-in tasks (15-30 s)
def test_cli_offline_hub_dataset_is_one_line(tmp_path, ar_folder):
    """``python -m pipeline.lm_eval`` (lm-eval's flags, bd3 registered) on a hub task with the hub offline."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "hub.yaml").write_text(
        "task: tiny_hub\ndataset_path: nobody/no_such_dataset\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\nmetric_list:\n  - metric: perplexity\n"
    )
    args = ["--model", "bd3", "--model_args", f"pretrained={ar_folder},block_size=1", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.lm_eval", *args, "--tasks", "tiny_hub", "--include_path", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[3], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "nobody/no_such_dataset" in last and "--include_path" in last, p.stderr[
        -2000:
    ]


def test_is_greedy_at_block_size_two_is_greedy_block_decoding(ar_folder, one_thread):
    from lm_eval.api.instance import Instance

    from pipeline.lm_eval.scoring import greedy_decode

    bd3 = BD3EvalLM(pretrained=str(ar_folder), block_size=2, mc_samples=2, batch_size=4, device="cpu")
    ctx = bd3.tok_encode("w1 w2 w3")
    decoded = greedy_decode(bd3.model, ctx, 4, bd3.sampler)
    # the same tokens as pipeline.sample's decoding with the KV cache (greedy_decode recomputes the prefix)
    from pipeline.diffusion.sampler import SamplerConfig, generate

    cfg = SamplerConfig(
        **{**bd3.sampler.__dict__, "max_new_tokens": 4, "temperature": 0.0, "stop_at_eos": False}
    )
    assert generate(bd3.model, torch.tensor([ctx]), cfg).tokens[0].tolist() == decoded
    greedy_text = " " + " ".join(bd3.tok_decode([i]) for i in decoded[:3])
    other = decoded[2] % 50 + 1 if decoded[2] % 50 + 1 != decoded[2] else 7
    wrong_text = " " + " ".join(bd3.tok_decode([i]) for i in [*decoded[:2], other])
    reqs = [
        Instance("loglikelihood", {}, ("w1 w2 w3", c), i) for i, c in enumerate([greedy_text, wrong_text])
    ]
    assert [g for _, g in bd3.loglikelihood(reqs)] == [True, False]


def test_eval_tasks_writes_one_table_over_block_sizes(ar_folder, task_dir, hf_results, tmp_path, one_thread):
    import json

    from pipeline.eval import main

    out, plot = tmp_path / "downstream.json", tmp_path / "downstream.png"
    args = ["--checkpoint", str(ar_folder), "--tasks", "tiny_mc,tiny_ppl", "--include-path", str(task_dir)]
    args += [
        "--block-sizes",
        "1,2",
        "--mc-samples",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--plot",
        str(plot),
    ]
    assert main(args) == 0
    cells = {
        (r["task"], r["metric"], r["block_size"]): r["value"] for r in json.loads(out.read_text())["results"]
    }
    for task, metric in [("tiny_mc", "acc"), ("tiny_mc", "acc_norm"), ("tiny_ppl", "word_perplexity")]:
        assert {(task, metric, 1), (task, metric, 2)} <= set(cells)
        assert cells[(task, metric, 1)] == pytest.approx(hf_results[0][task][f"{metric},none"], rel=1e-6)
    assert cells[("tiny_ppl", "word_perplexity", 2)] >= cells[("tiny_ppl", "word_perplexity", 1)] * 0.5
    assert plot.stat().st_size > 0


def test_generation_batched_equals_one_at_a_time(ar_folder, one_thread):
    from lm_eval.api.instance import Instance

    prompts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w9 w8", "w2 w2 w2"]
    greedy = {"until": ["w3"], "max_gen_toks": 5, "do_sample": False}
    sampled = {"until": ["w3"], "max_gen_toks": 5, "temperature": 1.0, "do_sample": True}
    reqs = [
        Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(prompts) for kw in (greedy, sampled)
    ]
    texts = {}
    for batch in (1, 4):
        bd3 = BD3EvalLM(pretrained=str(ar_folder), block_size=2, batch_size=batch, device="cpu")
        texts[batch] = bd3.generate_until(reqs)
    assert texts[1] == texts[4] and len(set(texts[1])) > 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_give_the_same_table(ar_folder, task_dir, tmp_path):
    """``composer -n 2 -m pipeline.eval --tasks ...``: lm-eval splits the documents over the ranks and
    gathers them; every cell equals the one-process run's (the noise is keyed on the context)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.eval import main

    common = ["--checkpoint", str(ar_folder), "--tasks", "tiny_mc,tiny_ppl", "--include-path", str(task_dir)]
    common += ["--block-sizes", "1,2", "--mc-samples", "2", "--device", "cpu"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*common, "--out", str(one)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    composer = Path(sys.executable).parent / "composer"
    logs = ["--stdout", f"{tmp_path}/rank{{rank}}.out", "--stderr", f"{tmp_path}/rank{{rank}}.err"]
    proc = subprocess.run(
        [str(composer), "-n", "2", "--master_port", str(port), *logs, "-m", "pipeline.eval", *common, "--out", str(two)],
        env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    ranks = "".join(
        f"--- {p.name} ---\n{p.read_text()[-3000:]}\n" for p in sorted(tmp_path.glob("rank*.err"))
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + ranks
    a, b = ({(r["task"], r["metric"], r["block_size"]): r["value"] for r in json.loads(p.read_text())["results"]}
            for p in (one, two))  # fmt: skip
    assert a.keys() == b.keys() and len(a) >= 8
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
