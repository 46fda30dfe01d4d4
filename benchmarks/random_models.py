"""Random-weight models for benchmarks: plain ``pipeline.model`` only (runs where Composer is absent)."""

from __future__ import annotations

import torch

from pipeline.model import BD3LM, ModelConfig

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


def random_model(
    config: ModelConfig, *, seed: int = 0, logit_scale: float | None = None, device="cpu", **run
) -> BD3LM:
    """A ``BD3LM`` with normal(0, 0.02) weights. ``logit_scale`` multiplies the output layer so the
    predictive distributions are peaked: a random model's flat ones never pass a confidence threshold,
    so parallel decoding would degenerate to one token per step."""
    model = BD3LM(config, **run)
    model.init_weights(torch.Generator().manual_seed(seed))
    if logit_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    return model.to(device)
