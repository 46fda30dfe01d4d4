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
import torch

from pipeline.model import from_pretrained
from tests.pipeline.diffusion.reference import BASE_VOCAB

TINY_LLAMA = dict(
    vocab_size=BASE_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _write_checkpoint(path: Path, seed: int = 0) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_LLAMA)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    hf.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def diffusion_ckpt_dir(tmp_path_factory) -> Path:
    """Folder of the tiny AR checkpoint (read only: copy before writing)."""
    return _write_checkpoint(tmp_path_factory.mktemp("diffusion_tiny_llama"))


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
