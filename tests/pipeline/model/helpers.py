"""Tiny random BD3 models and input builders shared by the model tests (float32, CPU)."""

from __future__ import annotations

import torch

from pipeline.model import BD3LM
from tests.factories import TINY_HF, random_model, tiny_model_config

BASE_VOCAB = TINY_HF["vocab_size"]  # 250
MASK_ID = BASE_VOCAB  # the added mask token; rows 251..255 are vocabulary padding


def tiny_model(seed: int = 0, attn_backend: str = "sdpa", **overrides) -> BD3LM:
    """A random ``BD3LM`` in eval mode; norms perturbed away from 1 so they matter."""
    # Large weights: attention is far from uniform, so a wrong mask entry moves the logits a lot.
    config = tiny_model_config(initializer_range=0.15, **overrides)
    return random_model(config, seed, attn_backend=attn_backend, norm_std=0.2).eval()


RUN_SWITCHES = ("attn_backend", "activation_checkpointing")


def same_weights(model: BD3LM, **overrides) -> BD3LM:
    """A copy of ``model`` with config fields or run-time switches (``attn_backend``...) changed."""
    run = {k: overrides.pop(k, getattr(model, k)) for k in RUN_SWITCHES}
    other = BD3LM(model.config.replace(**overrides), **run)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, BASE_VOCAB, (batch, length), generator=g)


def noised(x0: torch.Tensor, p: float = 0.5, seed: int = 1) -> torch.Tensor:
    """x_t: each token independently replaced by the mask token with probability ``p``."""
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(x0.shape, generator=g) < p
    return torch.where(masked, torch.full_like(x0, MASK_ID), x0)


def random_doc_ids(batch: int, length: int, p: float = 0.15, seed: int = 2, aligned_to: int = 1):
    """Per-document ids from random document starts (starts on multiples of ``aligned_to``)."""
    from pipeline.model.masks import document_ids

    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, length, generator=g) < p
    starts[:, torch.arange(length) % aligned_to != 0] = False
    starts[:, (length // 2) // aligned_to * aligned_to] = True  # at least two documents per row
    return document_ids(starts)
