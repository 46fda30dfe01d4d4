"""Model shapes for benchmarks (plain ``pipeline.model``: runs where Composer is absent); the random
weights come from ``tests.factories.random_model``."""

from __future__ import annotations

from pipeline.model import ModelConfig

# TinyLlama-1.1B's config.json with the mask token added (id 32000, vocabulary padded to 32064).
TINYLLAMA_SHAPE = dict(
    vocab_size=32064,
    base_vocab_size=32000,
    mask_token_id=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


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
