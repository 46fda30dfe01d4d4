"""Fixtures of the BD3 objective tests: a tiny random LLaMA checkpoint built offline.

The checkpoint is written by ``transformers`` (``LlamaForCausalLM.save_pretrained``) and loaded with
``pipeline.model.from_pretrained``, which adds the mask token (id 250) and pads the vocabulary to 256.
Weights are drawn at a large scale so that the per-token cross-entropies spread over several nats: a
prediction read from the wrong position or under the wrong attention mask moves the loss far beyond
the float32 tolerances used here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipeline.model import from_pretrained
from tests.factories import write_tiny_hf_checkpoint
from tests.pipeline.diffusion.reference import BASE_VOCAB


@pytest.fixture(scope="session")
def diffusion_ckpt_dir(tmp_path_factory) -> Path:
    """Folder of the tiny AR checkpoint (read only: copy before writing)."""
    folder = tmp_path_factory.mktemp("diffusion_tiny_llama")
    return write_tiny_hf_checkpoint(folder, "llama", vocab_size=BASE_VOCAB, max_position_embeddings=64)[0]


@pytest.fixture(scope="session")
def _session_model(diffusion_ckpt_dir):
    return from_pretrained(diffusion_ckpt_dir, attn_backend="sdpa").eval()


@pytest.fixture
def model(_session_model):
    """A fresh BD3LM (mask token added as id 250) that a test may modify."""
    return copy.deepcopy(_session_model)


@pytest.fixture(scope="session")
def hf_model(diffusion_ckpt_dir):
    """The same weights as an independent ``transformers`` LlamaForCausalLM."""
    import transformers as tf

    return tf.LlamaForCausalLM.from_pretrained(diffusion_ckpt_dir, attn_implementation="eager").float().eval()
