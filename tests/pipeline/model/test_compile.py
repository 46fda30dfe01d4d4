"""Compile once: dynamo's counters on CPU (backend aot_eager runs dynamo and AOTAutograd, no codegen).

A bd3_train training step of the per-layer compiled ``BD3LM`` has no graph break; repeated steps do not
recompile; a new shape compiles at most once more; KV-cache sampling never compiles per block.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from pipeline.diffusion.objective import DiffusionConfig, compute_nelbo
from pipeline.diffusion.sampler import SamplerConfig, generate
from pipeline.model import apply_compile
from pipeline.model.attention import resolve_backend
from pipeline.model.masks import AR, AttentionMask
from tests.pipeline.model.helpers import same_weights, tiny_model

DIFF = DiffusionConfig(block_size=4, noise_interval=(0.3, 0.8))


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def compiled():
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(max_position_embeddings=1024).train()
    apply_compile(model, backend="aot_eager")
    yield model
    torch._dynamo.reset()


def train_step(model, x0, step: int) -> torch.Tensor:
    out = compute_nelbo(model, x0, DIFF, torch.arange(x0.shape[0]) + x0.shape[0] * step)
    out.loss.backward()
    return out.loss


def test_training_step_compiles_without_graph_breaks_and_matches_eager(compiled):
    eager = same_weights(compiled)  # a new BD3LM: not compiled
    x0 = torch.randint(0, 250, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = train_step(compiled, x0, 0)
    assert graphs() >= 1, "apply_compile compiled nothing"
    assert dict(counters["graph_break"]) == {}
    # One graph serves every layer: parameters are inputs, not constants guarded per layer.
    assert graphs() == 1
    ref = train_step(eager, x0, 0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grad = compiled.model.layers[0].mlp.up_proj.weight.grad
    torch.testing.assert_close(grad, eager.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-6)


def test_twenty_steps_compile_once_per_distinct_shape(compiled):
    compiled.activation_checkpointing = True  # recomputation in backward must reuse the graph
    shapes = [(2, 32), (2, 64)]
    for step in range(20):
        b, L = shapes[step % 2] if step >= 10 else shapes[0]
        train_step(compiled, torch.randint(0, 250, (b, L)), step)
        if step == 9:
            assert graphs() == 1, "ten steps at one shape recompiled"
    assert graphs() <= len(shapes)
    assert dict(counters["graph_break"]) == {}


@pytest.mark.parametrize("block_size", [4, 16])
def test_sampling_compiles_no_more_for_more_tokens(compiled, block_size):
    x0 = torch.randint(0, 250, (1, 32))
    train_step(compiled, x0, 0)  # the layers are compiled and in use
    compiled.eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    counts = []
    for n in (64, 512):
        before = graphs()
        cfg = SamplerConfig(block_size=block_size, max_new_tokens=n, stop_at_eos=False, sampler="confidence")
        out = generate(compiled, prompt, cfg)
        assert out.tokens.shape == (1, n)
        counts.append(graphs() - before)
    assert counts[1] <= counts[0], f"compilations grew with the generated tokens: {counts}"
    assert counts[1] < 512 // block_size  # a compile per block would fail here
    assert dict(counters["graph_break"]) == {}


def test_auto_sends_cache_decoding_and_causal_attention_to_sdpa_or_flash_on_cuda():
    cuda = torch.device("cuda")
    for mask in (AR, AttentionMask("ar", cache_len=37), AttentionMask("bd3_decode", 16, cache_len=512)):
        assert resolve_backend("auto", mask, cuda, False, torch.bfloat16) in ("sdpa", "flash")
    # Shapes fixed for the whole run keep compiled FlexAttention.
    for mask in (AttentionMask("bd3_train", 16), AttentionMask("block_causal", 4)):
        assert resolve_backend("auto", mask, cuda, False, torch.bfloat16) == "flex"
    assert resolve_backend("auto", AR, cuda, True, torch.bfloat16) == "flex"  # per-document masks
    assert resolve_backend(
        "auto", AttentionMask("bd3_train", 16), torch.device("cpu"), False, torch.float32
    ) == ("sdpa")
