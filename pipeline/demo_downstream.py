"""The demo's downstream task, made from its own corpus, and the stage that runs it (``pipeline.demo``).

``demo_next_text`` is a multiple-choice task: the opening words of a document, and four candidate
continuations of which one is the document's own next words and three are the same number of words
from other documents. A model that learned the corpus picks the true one more often than 1 in 4.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

TASK = "demo_next_text"
CONTEXT_WORDS, CONTINUATION_WORDS, CHOICES = 12, 6, 4
MAX_WORD_CHARS = 12


def write_next_text_task(corpus: Path, folder: Path, n_docs: int = 16, seed: int = 0) -> Path:
    """``folder`` with ``{TASK}.yaml`` and its jsonl (``n_docs`` questions from the last documents of
    ``corpus``, JSON lines with ``text``), read offline by lm-eval (``--include-path folder``)."""
    docs = [json.loads(line)["text"].split() for line in Path(corpus).read_text().splitlines()]
    n = CONTEXT_WORDS + CONTINUATION_WORDS
    # plain words only (no long identifiers or paths): every question and choice fits the model's window
    docs = [d for d in docs if len(d) >= n and all(len(w) <= MAX_WORD_CHARS for w in d[:n])]
    docs = docs[-n_docs * CHOICES :]
    rng = random.Random(seed)
    rows = []
    for i, words in enumerate(docs[:n_docs]):
        others = [d for j, d in enumerate(docs) if j != i]
        spans = [
            d[CONTEXT_WORDS : CONTEXT_WORDS + CONTINUATION_WORDS] for d in rng.sample(others, CHOICES - 1)
        ]
        label = rng.randrange(CHOICES)
        spans.insert(label, words[CONTEXT_WORDS : CONTEXT_WORDS + CONTINUATION_WORDS])
        rows.append(
            {
                "context": " ".join(words[:CONTEXT_WORDS]),
                "choices": [" " + " ".join(s) for s in spans],
                "label": label,
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def run_downstream(
    py: str, out: Path, models: dict[str, Path], sh: Callable[[list[str]], None], limit: int
) -> dict[str, dict]:
    """``pipeline.eval --tasks`` of ``TASK`` for each model (label -> checkpoint) at block sizes 1 and 4;
    label -> its JSON (``downstream_{label}.json`` in ``out``)."""
    tasks = write_next_text_task(out / "corpus.jsonl", out / "tasks", n_docs=limit)
    tables = {}
    for name, ckpt in models.items():
        res = out / f"downstream_{name}.json"
        if not res.exists():
            sh(
                [py, "-m", "pipeline.eval", "--checkpoint", str(ckpt), "--tasks", TASK, "--include-path",
                 str(tasks), "--block-sizes", "1,4", "--limit", str(limit), "--mc-samples", "2",
                 "--out", str(res)]
            )  # fmt: skip
        tables[name] = json.loads(res.read_text())
    return tables


def downstream_table(tables: dict[str, dict]) -> str:
    """Rows (model, task metric), columns block sizes: the models' accuracies side by side."""
    from pipeline.lm_eval.sweep import DownstreamResult, format_table

    rows = [
        DownstreamResult(**{**r, "task": f"{name} {r['task']}"})
        for name, t in tables.items()
        for r in t["results"]
    ]
    return format_table(rows)
