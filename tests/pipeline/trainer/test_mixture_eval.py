"""Per-domain evaluation of a mixture (``eval_loader.streams``): the likelihood callback and ``pipeline.eval``
report each stream as if it were evaluated alone, and the token-weighted total.

One in-process run of yamls/bd3_tiny.yaml (1 process, CPU) trained and evaluated on two streams.
"""

from __future__ import annotations

import json
import math

import pytest

from pipeline.diffusion.metrics import combine_results, evaluate_block_sizes
from pipeline.rows import RowReader
from pipeline.trainer import load_config, run
from tests.factories import SEQ_LEN, YAMLS, mixture_overrides, tiny_overrides, write_stream_folder
from tests.pipeline.trainer.test_eval_callbacks import Capture, callback, logged


@pytest.fixture(scope="module")
def mixture_run(tiny_data, tmp_path_factory):
    """(trainer, captured metrics, {stream: folder}, the exported HF folder) of a 2-batch run on streams
    a (the tiny data) and web (another folder), evaluated on both at batch 2."""
    from pipeline.trainer import build

    data, tok = tiny_data
    root = tmp_path_factory.mktemp("mixture_eval")
    folders = {"a": data, "web": write_stream_folder(root / "web", tok, 1)}
    weights = {name: (folder, 0.5) for name, folder in folders.items()}
    overrides = tiny_overrides(
        data,
        tok,
        root / "ckpt",
        *mixture_overrides(weights),
        *mixture_overrides({name: (folder, None) for name, folder in folders.items()}, "eval_loader"),
        "max_duration=2ba",
        "scheduler.t_max=2ba",
        "eval_interval=2ba",
        "device_eval_batch_size=8",
        "callbacks.block_size_likelihood.block_sizes=[4,L]",
        "callbacks.block_size_likelihood.num_batches=2",
        f"callbacks.hf_export.folder={root / 'hf'}",
    )
    capture = Capture()
    original = build.build_loggers
    build.build_loggers = lambda cfg: [*original(cfg), capture]
    try:
        trainer = run(load_config(YAMLS / "bd3_tiny.yaml", overrides, world_size=1))
    finally:
        build.build_loggers = original
    return trainer, capture, folders, root / "hf"


def test_each_stream_is_logged_as_if_evaluated_alone(mixture_run, one_thread):
    trainer, capture, folders, _ = mixture_run
    cb = callback(trainer, "BlockSizeLikelihood")
    assert list(cb.last_streams) == ["a", "web"]
    model = trainer.state.model.model
    diffusion = trainer.state.model.diffusion
    for name, folder in folders.items():
        alone = evaluate_block_sizes(
            model,
            RowReader(folder, "val").batches(list(range(16)), 8),
            [4, SEQ_LEN],
            diffusion,
            1,
            cb.section.seed,
        )
        assert [r.as_dict() for r in alone] == [r.as_dict() for r in cb.last_streams[name]]
        assert all(r.rows == 16 for r in alone)
        for r in alone:
            for key in ("nelbo", "ppl_bound", "stderr"):
                assert logged(capture, f"eval/bs{r.block_size}/{name}/{key}") == {2: getattr(r, key)}
    total = combine_results(list(cb.last_streams.values()))
    for r in total:
        a, web = (cb.last_streams[n][[4, SEQ_LEN].index(r.block_size)] for n in ("a", "web"))
        assert r.nelbo == pytest.approx(
            (a.nelbo * a.tokens + web.nelbo * web.tokens) / (a.tokens + web.tokens)
        )
        assert r.tokens == a.tokens + web.tokens and r.ppl_bound == pytest.approx(math.exp(r.nelbo))
        assert logged(capture, f"eval/nelbo/bs{r.block_size}") == {2: r.nelbo}
    # the two domains differ (strides 1-3 against 4): one number for both would hide it
    assert cb.last_streams["a"][0].nelbo != cb.last_streams["web"][0].nelbo


def test_offline_eval_has_a_column_per_stream_and_the_total(mixture_run, tmp_path, capsys, one_thread):
    from pipeline.eval import main as eval_main

    trainer, _, folders, hf = mixture_run
    cb = callback(trainer, "BlockSizeLikelihood")
    args = ["--checkpoint", str(hf), "--max-rows", "16", "--block-sizes", "4,L", "--batch-size", "8"]
    data = [f"--data={name}={folder}" for name, folder in folders.items()]
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    assert eval_main([*args, *data, "--out", str(out), "--plot", str(plot), "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "a PPL" in table[0] and "web PPL" in table[0] and "total PPL bound" in table[0]
    payload = json.loads(out.read_text())
    for name in folders:
        got = [r["nelbo"] for r in payload["streams"][name]]
        assert got == pytest.approx([r.nelbo for r in cb.last_streams[name]], rel=1e-5)
        alone = tmp_path / f"{name}.json"
        assert eval_main([*args, "--data", str(folders[name]), "--out", str(alone), "--device", "cpu"]) == 0
        assert json.loads(alone.read_text())["results"] == payload["streams"][name]
    assert [r["nelbo"] for r in payload["results"]] == pytest.approx(
        [r.nelbo for r in cb.last_results], rel=1e-5
    )
    assert plot.stat().st_size > 0
