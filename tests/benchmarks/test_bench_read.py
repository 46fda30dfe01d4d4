"""``python -m benchmarks.bench_read --streams 3`` at a tiny size: both readings see every row once."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("streaming")  # (not in .venv-compat, which runs tests/benchmarks too)

from benchmarks.bench_read import main  # noqa: E402


def test_mixture_benchmark_reads_every_row_of_both(capsys):
    main(["--streams", "3", "--rows", "96", "--seq-len", "64", "--repeats", "1", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert (
        "96 rows x 64 tokens in 3 shards: 3 streams of 32 rows, and one stream of the same 3 shard files"
        in out
    )
    assert re.search(r"one stream: +[\d,]+ rows/s", out) and re.search(r"3 streams: +[\d,]+ rows/s", out)
    assert float(re.search(r"ratio: ([\d.]+)", out)[1]) > 0
