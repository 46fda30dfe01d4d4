"""Fixtures of the training tests (``tiny_data`` and ``one_thread`` are in ``tests/conftest.py``).

The reference runs are made once per session and shared by every test that only reads them: the
1-process run in this process, and the 2-process DDP and ZeRO-2 launches of the same config.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def one_process(tiny_data, tmp_path_factory):
    """The 1-process reference run of ``tests.pipeline.trainer.launch.COMMON`` (20 batches), trained once
    per session: (loss records, final weights, its save_folder). Read-only."""
    from tests.pipeline.trainer.launch import one_process_run

    return one_process_run(tiny_data, tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="session")
def ddp_run(tiny_data, tmp_path_factory) -> Path:
    """``composer -n 2`` DDP run of ``COMMON`` (20 batches), launched once per session: its folder
    (loss.jsonl, ckpt/, rank logs). Read-only."""
    from tests.pipeline.trainer.launch import launch

    out = tmp_path_factory.mktemp("ddp-run")
    launch(tiny_data, out)
    return out


@pytest.fixture(scope="session")
def zero2_run(tiny_data, tmp_path_factory) -> Path:
    """``composer -n 2`` DeepSpeed ZeRO-2 run of ``COMMON`` (20 batches), launched once per session:
    its folder (loss.jsonl, ckpt/ with deepspeed/ba20). Read-only."""
    from tests.pipeline.trainer.launch import launch

    out = tmp_path_factory.mktemp("zero2-run")
    launch(tiny_data, out, "parallelism.deepspeed.zero_optimization.stage=2")
    return out
