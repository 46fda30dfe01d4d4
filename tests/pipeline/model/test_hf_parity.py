"""AR parity with ``transformers``: a loaded checkpoint's causal logits equal the HF model's.

This is the check that the layer math (RMSNorm, rotary and its scalings, grouped-query attention,
qkv bias, tied embeddings, SwiGLU) and the checkpoint loading are right: everything BD3 adds is
built on top of it.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.model import from_pretrained
from tests.factories import TINY_HF

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small original context so that all three wavelength bands (kept, ramp, slowed) occur at hd=16.
    "original_max_position_embeddings": 32,
}

CASES = {
    "llama": ("llama", {}),
    "llama_head_dim": ("llama", {"head_dim": 32}),
    # LLaMA's attention_bias puts a bias on q, k, v AND o_proj (transformers LlamaAttention).
    "llama_attention_bias": ("llama", {"attention_bias": True}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "llama_rope_llama3": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama_rope_linear": ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
}


def _input(length: int = 48, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, TINY_HF["vocab_size"], (batch, length), generator=g)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("case", list(CASES))
def test_causal_logits_match_transformers(tmp_path, tiny_hf_checkpoint, case, backend):
    arch, overrides = CASES[case]
    folder, hf_model = tiny_hf_checkpoint(tmp_path / case, arch, **overrides)
    ids = _input()
    with torch.no_grad():
        ref = hf_model(ids).logits
        model = from_pretrained(folder, attn_backend=backend).eval()
        out = model(ids)
    base = TINY_HF["vocab_size"]
    assert out.shape == (*ids.shape, model.config.vocab_size)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > base
    assert ref.abs().max() > 1.0  # weights large enough for the tolerance to mean something
    torch.testing.assert_close(out[..., :base], ref, rtol=0, atol=1e-4)


def test_tied_embeddings_stay_tied(tiny_qwen2_dir):
    model = from_pretrained(tiny_qwen2_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def _decode_one_token_at_a_time(model, ids, cache):
    outs = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            cache.make_room(1)
            outs.append(model(ids[:, t : t + 1], kv_cache=cache, write_cache=True))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("capacity", [8, None], ids=["capacity_8", "default_capacity"])
def test_cache_reproduces_mistral_sliding_window(tmp_path, tiny_hf_checkpoint, capacity):
    # A cache filled one token at a time attends exactly like Mistral's sliding-window attention (keys
    # computed once, each within its own window), past the window too: with capacity = sliding_window,
    # and by default (new_kv_cache honours the checkpoint's sliding_window).
    folder, hf_model = tiny_hf_checkpoint(tmp_path / "mistral_sw", "mistral", sliding_window=8)
    ids = _input(24, batch=1)
    model = from_pretrained(folder).eval()
    with torch.no_grad():
        ref = hf_model(ids).logits
    out = _decode_one_token_at_a_time(model, ids, model.new_kv_cache(1, capacity=capacity))
    torch.testing.assert_close(out[..., : TINY_HF["vocab_size"]], ref, rtol=0, atol=1e-4)


def test_training_length_beyond_sliding_window_is_refused(tmp_path, tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint(tmp_path / "mistral_sw", "mistral", sliding_window=16)
    model = from_pretrained(folder)
    with torch.no_grad():
        model(_input(16))  # within the window: fine
        with pytest.raises(ValueError, match="sliding_window"):
            model(_input(32))
