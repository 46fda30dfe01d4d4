"""The torch API differences the core meets between torch 2.7 (training) and 2.11+ (the GPU machines).

Each function here behaves the same on every supported torch; ``tests/pipeline/model/test_compat.py``
runs in both test environments (``make test``).

- ``convert_dtype``: torch 2.11 converts a FakeTensor parameter with ``torch.utils.swap_tensors``,
  which refuses a tensor with a weak reference, and FakeTensorMode keeps one to every tensor it makes:
  ``module.to(dtype)`` on a model built under fake tensors raises ``Couldn't swap Embedding.weight``.
- ``flex_trains_on_cpu``: torch 2.7 runs FlexAttention's backward eagerly on CPU; torch 2.11 refuses
  CPU inputs that require grad (``FlexAttention does not support backward on CPU``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def convert_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` for its floating-point parameters and buffers, on real or fake tensors.

    The tensors are replaced (new ``nn.Parameter`` objects) instead of being converted in place, so
    nothing is swapped; parameters shared by several modules (tied embeddings) stay shared.
    Returns ``module``.
    """
    converted: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in converted:
            new = t.detach().to(dtype)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            converted[id(t)] = new
        return converted[id(t)]

    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    table[name] = convert(t)
    return module


@functools.cache
def flex_trains_on_cpu() -> bool:
    """Whether this torch runs FlexAttention on CPU tensors that require grad (True on 2.7)."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 8, 8, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        return False
    return True
