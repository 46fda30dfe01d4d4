"""``callbacks.downstream_eval``: lm-eval tasks on the live model during training, the numbers of
``pipeline.lm_eval`` on the same weights, training untouched, errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from pipeline.trainer import ConfigError  # noqa: E402
from tests.factories import (  # noqa: E402
    check_downstream_scalars,
    downstream_overrides,
    downstream_reference,
    write_lm_eval_tasks,
)
from tests.pipeline.trainer.test_eval_callbacks import COMMON, callback, config, losses, train  # noqa: E402


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_lm_eval_tasks(tmp_path_factory.mktemp("tasks"))


def test_downstream_eval_logs_lm_eval_numbers_and_leaves_training_bitwise_unchanged(
    tiny_data, tmp_path, task_dir, one_thread, monkeypatch
):
    """Logged at batches 2 and 4; the last values (and the exported card's table) are what
    ``pipeline.lm_eval`` gives on the exported weights; per-batch training losses equal the run without it."""
    hf = tmp_path / "hf"
    on, cap = train(
        tiny_data,
        tmp_path / "on",
        *COMMON,
        *downstream_overrides(task_dir),
        f"callbacks.hf_export.folder={hf}",
        f"callbacks.loss_log.path={tmp_path}/on.jsonl",
        monkeypatch=monkeypatch,
    )
    train(tiny_data, tmp_path / "off", *COMMON, f"callbacks.loss_log.path={tmp_path}/off.jsonl")
    assert losses(tmp_path / "on.jsonl") == losses(tmp_path / "off.jsonl")

    results = callback(on, "DownstreamEval").last_results
    keys = {f"eval/downstream/tiny_mc/{m}/bs{b}" for m in ("acc", "acc_norm") for b in (1, 4)}
    assert {f"eval/downstream/{r.task}/{r.metric}/bs{r.block_size}" for r in results} == keys
    scalars = {k: {int(ts.batch): v for ts, v in vs} for k, vs in cap.data.items()}
    for key in keys:
        assert sorted(scalars[key]) == [2, 4], key
    check_downstream_scalars(scalars, results, batch=4)

    # The same tasks through pipeline.lm_eval on the exported (final) weights: the same numbers.
    offline = downstream_reference(hf, task_dir)
    check_downstream_scalars(scalars, offline, batch=4)

    card = (hf / "README.md").read_text()
    assert "## Downstream tasks" in card
    acc1 = next(r.value for r in results if r.metric == "acc" and r.block_size == 1)
    assert f"| tiny_mc | acc | {acc1:.4f}" in card


@pytest.mark.parametrize(
    "override, key",
    [
        ("callbacks.downstream_eval.tasks=[]", "callbacks.downstream_eval.tasks"),
        ("callbacks.downstream_eval.block_sizes=[0]", "callbacks.downstream_eval.block_sizes"),
        ("callbacks.downstream_eval.block_sizes=[4,4]", "callbacks.downstream_eval.block_sizes"),
        ("callbacks.downstream_eval.mc_samples=0", "callbacks.downstream_eval.mc_samples"),
        ("callbacks.downstream_eval.limit=0", "callbacks.downstream_eval.limit"),
        ("callbacks.downstream_eval.taks=[tiny_mc]", "callbacks.downstream_eval.taks"),
        ("callbacks.downstream_eval.include_path=/no/such/folder", "callbacks.downstream_eval.include_path"),
    ],
)
def test_config_errors_name_the_key(tiny_data, tmp_path, task_dir, override, key):
    with pytest.raises(ConfigError) as e:
        config(tiny_data, tmp_path, *downstream_overrides(task_dir), override)
    assert e.value.key == key, str(e.value)


def test_card_without_downstream_results_has_no_table(tmp_path):
    """A card gets the section only with results; a ``pipeline.eval --tasks`` JSON gives it one."""
    from pipeline.hf_artifact.card import CardFacts

    payload = {"limit": 4, "mc_samples": 2, "num_fewshot": None, "results": [
        {"task": "t", "metric": "acc", "block_size": 1, "value": 0.5, "stderr": 0.25},
        {"task": "t", "metric": "acc", "block_size": 4, "value": 0.75, "stderr": float("nan")},
    ]}  # fmt: skip
    (tmp_path / "tasks.json").write_text(json.dumps(payload))
    facts = CardFacts.from_files(downstream_json=tmp_path / "tasks.json")
    from pipeline.hf_artifact.card import _downstream_section

    text = _downstream_section(facts.downstream)
    assert "| task | metric | bs 1 | bs 4 |" in text
    assert "| t | acc | 0.5000 ± 0.2500 | 0.7500 |" in text
