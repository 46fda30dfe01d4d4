"""Fixtures of the training tests: a tiny tokenizer and data_prep-style data folder (see
``tests.factories``: ``write_tokenizer``, ``tiny_data_folder``), YAML overrides that point at them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import SEQ_LEN, tiny_data_folder, write_tokenizer


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, tokenizer.json). Read-only: streaming caches nothing when remote is None."""
    root = tmp_path_factory.mktemp("tiny_data")
    tok = write_tokenizer(root / "tokenizer" / "tokenizer.json")
    return tiny_data_folder(root / "data", tok), tok


REPO = Path(__file__).resolve().parents[3]
YAMLS = REPO / "yamls"


def tiny_overrides(data: Path, tokenizer: Path, save_folder: Path, *extra: str) -> list[str]:
    """Overrides that point yamls/bd3_tiny.yaml (or ar_tiny.yaml) at the fixture data."""
    return [
        f"variables.data_local={data}",
        f"variables.tokenizer={tokenizer}",
        f"variables.max_seq_len={SEQ_LEN}",
        f"variables.save_folder={save_folder}",
        "loggers.progress_bar=null",
        *extra,
    ]


@pytest.fixture(scope="session")
def one_process(tiny_data, tmp_path_factory):
    """The 1-process reference run of ``tests.pipeline.train.launch.COMMON`` (20 batches), trained once
    per session: (loss records, final weights, its save_folder). Read-only."""
    from tests.pipeline.train.launch import one_process_run

    return one_process_run(tiny_data, tmp_path_factory.mktemp("one"))


@pytest.fixture
def one_thread():
    """Single-threaded torch: on a shared 2-core machine extra threads make tiny runs 10-100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
