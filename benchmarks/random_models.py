"""Model shapes for benchmarks (plain ``pipeline.model``: runs where Composer is absent); the random
weights come from ``tests.factories.random_model``."""

from __future__ import annotations

from pipeline.model import ModelConfig
from pipeline.model.config import TINYLLAMA_1B_CONFIG

# TinyLlama-1.1B's config.json with the mask token added (id 32000, vocabulary padded to 32064).
TINYLLAMA_SHAPE = {
    **{k: v for k, v in TINYLLAMA_1B_CONFIG.items() if k not in ("architectures", "model_type")},
    "vocab_size": 32064,
    "base_vocab_size": 32000,
    "mask_token_id": 32000,
}


def small_config(hidden: int = 256, layers: int = 4, vocab: int = 8192, context: int = 2048) -> ModelConfig:
    """A small LLaMA shape with a mask token (id ``vocab``) and 64 rows of vocabulary padding."""
    return ModelConfig(
        vocab_size=vocab + 64,
        base_vocab_size=vocab,
        mask_token_id=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=context,
        eos_token_id=0,
    )
