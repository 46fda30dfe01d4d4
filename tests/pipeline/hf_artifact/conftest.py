"""Exports of tiny checkpoints (Llama, Qwen2 with tied embeddings, Mistral), each built once per session."""

from __future__ import annotations

import pytest

from tests.factories import write_tiny_export


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """``tiny_export(arch) -> (pipeline's model, export folder)``, written on first use."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = write_tiny_export(tmp_path_factory.mktemp(f"export_{arch}"), arch)
        return built[arch]

    return get
