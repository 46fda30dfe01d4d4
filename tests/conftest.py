"""Shared fixtures: tiny random Hugging Face checkpoints built offline (never downloaded).

``tiny_hf_checkpoint(path, arch, **config)`` is ``tests.factories.write_tiny_hf_checkpoint``.
``tiny_llama_dir`` and ``tiny_qwen2_dir`` are session-scoped folders: copy them before writing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import write_tiny_hf_checkpoint


@pytest.fixture
def tiny_hf_checkpoint():
    """Factory: ``tiny_hf_checkpoint(path, arch="llama", seed=0, **config) -> (path, hf_model)``."""
    return write_tiny_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA checkpoint folder (vocab 250, hidden 64, 2 layers, 4 heads, 2 kv heads)."""
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama")[0]


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint folder with qkv biases and tied input/output embeddings."""
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    return write_tiny_hf_checkpoint(folder, "qwen2", tie_word_embeddings=True)[0]
