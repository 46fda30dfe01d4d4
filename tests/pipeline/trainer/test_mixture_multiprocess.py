"""A mixture read by 1 and by 2 processes (``composer -n 1`` / ``-n 2``, fixed ``num_canonical_nodes``):
the same global batches, row for row, and the same losses up to float summation order."""

from __future__ import annotations

import pytest

from tests.factories import mixture_overrides, write_stream_folder
from tests.pipeline.trainer.launch import LOSS_RTOL, launch, records

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_two_processes_read_the_global_batches_of_one(tiny_data, tmp_path):
    data, tok = tiny_data
    web = write_stream_folder(tmp_path / "web", tok, 1, train_rows=64)  # 0.4 of each batch: repeated
    extra = [
        *mixture_overrides({"a": (data, 0.6), "web": (web, 0.4)}),
        "train_loader.num_canonical_nodes=1",
        "callbacks.loss_log.sample_ids=true",
        "max_duration=8ba",
        "scheduler.t_max=8ba",
    ]
    runs = {}
    for n in (1, 2):
        launch(tiny_data, tmp_path / f"n{n}", *extra, nproc=n)
        runs[n] = records(tmp_path / f"n{n}" / "loss.jsonl")
    one, two = runs[1], runs[2]
    assert [r["batch"] for r in one] == [r["batch"] for r in two] == list(range(1, 9))
    assert [r["rows"] for r in one] == [r["rows"] for r in two]  # sample ids of the mixture, in order
    for ra, rb in zip(one, two):
        assert rb["loss/train/total"] == pytest.approx(ra["loss/train/total"], rel=LOSS_RTOL)
    # the ids after stream a's 256 rows are web's: both streams feed every run
    ids = [i for r in one for i in r["rows"]]
    assert 0.3 < sum(i >= 256 for i in ids) / len(ids) < 0.5
