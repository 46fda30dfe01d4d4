"""Fixtures of the training tests (``tiny_data`` and ``one_thread`` are in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def one_process(tiny_data, tmp_path_factory):
    """The 1-process reference run of ``tests.pipeline.trainer.launch.COMMON`` (20 batches), trained once
    per session: (loss records, final weights, its save_folder). Read-only."""
    from tests.pipeline.trainer.launch import one_process_run

    return one_process_run(tiny_data, tmp_path_factory.mktemp("one"))
