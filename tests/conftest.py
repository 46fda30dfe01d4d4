"""Shared fixtures: tiny random Hugging Face checkpoints built offline (never downloaded).

``tiny_hf_checkpoint(path, arch, **config)`` is ``tests.factories.write_tiny_hf_checkpoint``.
``tiny_llama_dir`` and ``tiny_qwen2_dir`` are session-scoped folders: copy them before writing.
"""

from __future__ import annotations

import gc
import sys
import warnings
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


@pytest.fixture(autouse=True, scope="module")
def _release_streaming_shared_memory():
    """Close the shared memory of the StreamingDatasets a test module made in this process.

    Streaming registers every ``SharedMemory`` it creates with ``atexit``, so an in-process dataset keeps
    its /dev/shm file descriptors until the interpreter exits: about 230 per dataset, measured. Over
    the suite that reaches the machine's limit of 20,000 open files. A finished module's datasets are
    never used again, so they are released here.
    """
    yield
    memory = sys.modules.get("streaming.base.shared.memory")
    if memory is None:
        return
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        shared = [obj for obj in gc.get_objects() if isinstance(obj, memory.SharedMemory)]
    for obj in shared:
        obj.cleanup()
