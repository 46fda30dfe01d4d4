"""``pipeline.model.compat`` on the torch of this environment: 2.7 in .venv, 2.11 in .venv-compat."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline.model import BD3LM, AttentionMask
from pipeline.model.attention import attend
from pipeline.model.compat import convert_dtype, flex_trains_on_cpu
from tests.factories import tiny_model_config

TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_convert_dtype_converts_every_float_tensor_and_keeps_ties(fake):
    """What ``module.to(bf16)`` does, on real tensors and under FakeTensorMode, where torch >= 2.11's
    ``module.to`` fails (it swaps fake parameters in place)."""
    config = tiny_model_config(tie_word_embeddings=True)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else torch.device("cpu"):
        model = BD3LM(config)
        names = {n for n, _ in model.named_parameters()}
        assert convert_dtype(model, torch.bfloat16) is model
    assert {n for n, _ in model.named_parameters()} == names
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    floats = [b for b in model.buffers() if b.is_floating_point()]
    assert all(b.dtype == torch.bfloat16 for b in floats)


def test_convert_dtype_gives_module_to_values():
    config = tiny_model_config()
    torch.manual_seed(0)
    a = BD3LM(config)
    b = BD3LM(config)
    b.load_state_dict(a.state_dict())
    a.to(torch.bfloat16)
    convert_dtype(b, torch.bfloat16)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_flex_trains_on_cpu_is_what_this_torch_does():
    """torch 2.7 runs FlexAttention's backward on CPU; 2.11 refuses inputs that require grad."""
    assert flex_trains_on_cpu() == (TORCH < (2, 11))


def test_flex_on_cpu_with_grad_gives_sdpa_values_and_gradients():
    """``attn_backend="flex"`` trains on CPU under every torch: where torch has no CPU backward for
    FlexAttention, SDPA with the same mask runs instead (exact either way)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = AttentionMask("bd3_train", 4)
    out = {}
    for backend in ("flex", "sdpa"):
        y = attend(q, k, v, mask, 8, backend=backend)
        grads = torch.autograd.grad(y.square().sum(), (q, k, v))
        out[backend] = (y, *grads)
    for a, b in zip(out["flex"], out["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
