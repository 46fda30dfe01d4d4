"""The demo's downstream task: made from its corpus, the true continuation among distractors, run by
lm-eval offline; the table puts the models side by side."""

from __future__ import annotations

import json

import pytest

from pipeline.demo_downstream import CHOICES, TASK, downstream_table, write_next_text_task


def test_task_from_the_corpus_holds_the_true_continuation(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [" ".join(f"d{i}w{j}" for j in range(30)) for i in range(40)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    folder = write_next_text_task(corpus, tmp_path / "tasks", n_docs=5)
    rows = [json.loads(line) for line in (folder / f"{TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for r in rows:
        doc = r["context"].split()[0].split("w")[0]
        assert len(r["choices"]) == CHOICES and len(set(r["choices"])) == CHOICES
        assert [c.split()[0].split("w")[0] == doc for c in r["choices"]].count(True) == 1
        assert r["choices"][r["label"]].split()[0] == f"{doc}w12"  # the document's own next words
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    assert TASK in TaskManager(include_path=str(folder), include_defaults=False).all_tasks


def test_downstream_table_puts_models_side_by_side():
    row = {"task": TASK, "metric": "acc", "stderr": 0.1}
    tables = {
        m: {"results": [{**row, "block_size": b, "value": v / b} for b in (1, 4)]}
        for m, v in (("base", 0.25), ("trained", 0.5))
    }
    lines = downstream_table(tables).splitlines()
    assert "bs 1" in lines[0] and "bs 4" in lines[0]
    assert lines[1].startswith(f"base {TASK} acc") and lines[2].startswith(f"trained {TASK} acc")
    assert "0.5000 ± 0.1000" in lines[2]
