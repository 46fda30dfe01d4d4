"""Shared fixtures: tiny random Hugging Face checkpoints built offline (never downloaded).

``tiny_hf_checkpoint(path, arch, **config)`` writes a ``transformers`` model folder with weights
drawn at a large scale (std 0.15, perturbed norms and biases) so that a wrong rotary frequency, a
missing bias or a swapped projection moves the logits by far more than a float32 tolerance.
``tiny_llama_dir`` and ``tiny_qwen2_dir`` are session-scoped folders: copy them before writing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_HF = dict(
    vocab_size=250,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _hf_classes(arch: str):
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[arch]


def make_tiny_hf_checkpoint(path, arch: str = "llama", seed: int = 0, **config_overrides):
    """Save a random tiny ``transformers`` model of ``arch`` under ``path``; return (path, model)."""
    config_cls, model_cls = _hf_classes(arch)
    config = config_cls(**{**TINY_HF, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.fixture
def tiny_hf_checkpoint():
    """Factory: ``tiny_hf_checkpoint(path, arch="llama", seed=0, **config) -> (path, hf_model)``."""
    return make_tiny_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA checkpoint folder (vocab 250, hidden 64, 2 layers, 4 heads, 2 kv heads)."""
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama")[0]


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint folder with qkv biases and tied input/output embeddings."""
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", tie_word_embeddings=True)[
        0
    ]
