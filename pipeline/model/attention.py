"""Attention backends behind one call: ``attend(q, k, v, mask, ...)``.

- ``sdpa``: ``F.scaled_dot_product_attention`` with a dense boolean mask (``is_causal`` for AR).
  The CPU reference and fallback; exact for every mask.
- ``flex``: FlexAttention with block masks cached per (mask, length, device); compiled on CUDA
  (BLOCK_SIZE passed explicitly), eager elsewhere (exact but slow). torch >= 2.11 refuses CPU
  inputs that require grad: there the CPU training forward runs SDPA with the same mask.
- ``flash``: flash-attn when importable, for what it expresses (causal, full bidirectional,
  decoding against a cache without annealing); other masks fall through to ``flex``.
``auto`` on CUDA sends causal attention and KV-cache decoding to flash-attn (else SDPA's fused
kernels): their key length grows with the cache, and a FlexAttention compiled with ``dynamic=False``
would recompile for every new length. Compiled FlexAttention gets only the shapes fixed for a whole
run (``bd3_train``, ``block_causal``, per-document and annealed masks). On CPU ``auto`` is sdpa.

``footprint`` is not a kernel: under fake tensors (``pipeline.diffusion.footprint``) it stands in for
a fused kernel (flash-attn, compiled FlexAttention) with exactly what such a kernel allocates, the
output and a float32 log-sum-exp per query, and what it saves for backward (q, k, v, output, lse),
so the planned activation memory is that of the GPU path rather than CPU SDPA's dense scores.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from pipeline.model.compat import flex_trains_on_cpu
from pipeline.model.masks import AttentionMask, dense_mask, mask_predicate

try:  # optional extra `gpu`
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

FLEX_BLOCK_SIZE = 128
ATTN_BACKENDS = ("auto", "sdpa", "flex", "flash")
FOOTPRINT = "footprint"  # planning only: see the module docstring


def flash_available() -> bool:
    return _flash_attn_func is not None and torch.cuda.is_available()


def grows_with_cache(mask: AttentionMask) -> bool:
    """Causal attention and KV-cache decoding: patterns whose key length changes from call to call."""
    return mask.kind == "ar" or (mask.kind == "bd3_decode" and mask.bidirectional_in_block)


def resolve_backend(
    backend: str, mask: AttentionMask, device: torch.device, has_doc_ids: bool, dtype: torch.dtype
) -> str:
    """The backend that will actually run ``mask`` on ``device``."""
    if backend == FOOTPRINT:
        return backend
    if backend == "auto":
        if device.type != "cuda":
            return "sdpa"
        if grows_with_cache(mask) and not has_doc_ids:
            backend = "flash" if flash_available() else "sdpa"
        else:
            return "flex"
    if backend == "flash":
        expressible = not has_doc_ids and (
            mask.kind == "ar" or (mask.kind in ("mdlm", "bd3_decode") and mask.bidirectional_in_block)
        )
        if not (flash_available() and expressible and dtype in (torch.float16, torch.bfloat16)):
            if device.type != "cuda":
                return "sdpa"
            return "sdpa" if grows_with_cache(mask) and not has_doc_ids else "flex"
    return backend


@functools.lru_cache(maxsize=64)
def _cached_dense(mask: AttentionMask, n_q: int, n_k: int, seq_len: int, device: torch.device):
    return dense_mask(mask, n_q, n_k, seq_len, device=device)


def _doc_visibility(mask: AttentionMask, doc_ids: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """(B, n_q, n_k) boolean: query and key belong to the same document of the row."""
    L = doc_ids.shape[1]
    qi = torch.arange(n_q, device=doc_ids.device) % L
    ki = torch.arange(n_k, device=doc_ids.device) % L
    return doc_ids[:, qi][:, :, None] == doc_ids[:, ki][:, None, :]


def _sdpa_mask(mask: AttentionMask, n_q: int, n_k: int, seq_len: int, device, doc_ids):
    """The boolean mask SDPA needs, or None when ``is_causal`` or no mask expresses it."""
    if doc_ids is None:
        if mask.kind == "ar" and (n_q == n_k or n_q == 1):  # causal, or one new token sees the cache
            return None
        if mask.kind in ("mdlm", "bd3_decode") and mask.lookahead is None:
            return None  # nothing is hidden
    allowed = _cached_dense(mask, n_q, n_k, seq_len, device)
    if doc_ids is not None:
        allowed = (allowed[None] & _doc_visibility(mask, doc_ids, n_q, n_k))[:, None]
    return allowed


def _sdpa(q, k, v, mask: AttentionMask, allowed):
    gqa = q.shape[1] != k.shape[1]
    causal = allowed is None and mask.kind == "ar" and q.shape[-2] == k.shape[-2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal, enable_gqa=gqa)


FLEX_MIN_HEAD_DIM = 16  # the compiled FlexAttention kernel's smallest head dimension (torch 2.7-2.11)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(mask: AttentionMask, n_q: int, n_k: int, seq_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    pred = mask_predicate(mask, seq_len)
    return create_block_mask(
        lambda b, h, q, k: pred(q, k), None, None, n_q, n_k, device=device, BLOCK_SIZE=FLEX_BLOCK_SIZE
    )


def _block_mask(mask: AttentionMask, n_q: int, n_k: int, seq_len: int, device, doc_ids):
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_ids is None:
        return _cached_block_mask(mask, n_q, n_k, seq_len, device)
    pred = mask_predicate(mask, seq_len)
    L = doc_ids.shape[1]

    def mask_mod(b, h, qi, ki):
        return pred(qi, ki) & (doc_ids[b, qi % L] == doc_ids[b, ki % L])

    return create_block_mask(
        mask_mod, doc_ids.shape[0], None, n_q, n_k, device=device, BLOCK_SIZE=FLEX_BLOCK_SIZE
    )


def _flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    # On CUDA the fused kernel needs torch.compile: a compiled caller (per-layer compile) lowers the
    # call itself, any other goes through the cached compiled wrapper. That Triton kernel wants
    # head_dim >= FLEX_MIN_HEAD_DIM: smaller heads (tiny test models) run the eager reference, kept
    # out of any enclosing compile. The CPU runs flex_attention as it is.
    if q.device.type != "cuda":
        fn = flex_attention
    elif q.shape[-1] < FLEX_MIN_HEAD_DIM:
        fn = torch.compiler.disable(flex_attention)
    elif torch.compiler.is_compiling():
        fn = flex_attention
    else:
        fn = _compiled_flex()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


class _FusedFootprint(torch.autograd.Function):
    """What a fused attention kernel allocates and saves, without computing attention (fake tensors)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, n_q)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        delta = lse.new_empty(lse.shape)  # flash backward's rowsum(dO * O)
        del delta, out, grad_out
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash(q, k, v, mask: AttentionMask):  # pragma: no cover - needs CUDA and flash-attn
    # flash-attn takes (B, T, H, D); the queries of a decode block see the whole cache and block.
    out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=mask.kind == "ar")
    return out.transpose(1, 2)


class PreparedAttention(NamedTuple):
    """The backend that runs and what it needs besides q, k, v: a FlexAttention ``BlockMask``, SDPA's
    boolean mask (None when it needs none) or None."""

    backend: str
    bias: Any = None


def prepare_attention(
    backend: str,
    mask: AttentionMask,
    n_q: int,
    n_k: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    doc_ids: torch.Tensor | None = None,
) -> PreparedAttention:
    """Resolve the backend and build its mask once per forward, outside the (compiled) layers: block
    masks stay cached per (mask, shape) and never enter a compiled graph."""
    chosen = resolve_backend(backend, mask, device, doc_ids is not None, dtype)
    if chosen == "flex":
        return PreparedAttention(chosen, _block_mask(mask, n_q, n_k, seq_len, device, doc_ids))
    if chosen == "sdpa":
        return PreparedAttention(chosen, _sdpa_mask(mask, n_q, n_k, seq_len, device, doc_ids))
    return PreparedAttention(chosen)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    seq_len: int,
    backend: str = "auto",
    doc_ids: torch.Tensor | None = None,
    prepared: PreparedAttention | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention under ``mask``.

    Args:
        q: (B, H, n_q, D); k, v: (B, H_kv, n_k, D) with H a multiple of H_kv (grouped-query).
        mask: the attention pattern; ``seq_len`` is L, the length of one half for ``bd3_train``.
        doc_ids: optional (B, L) document index per position for per-document masking.
        prepared: ``prepare_attention``'s result for these shapes (built here when None).
    Returns:
        (B, H, n_q, D) in q's dtype.
    """
    if prepared is None:
        prepared = prepare_attention(
            backend, mask, q.shape[-2], k.shape[-2], seq_len, q.device, q.dtype, doc_ids
        )
    if prepared.backend == FOOTPRINT:
        return _FusedFootprint.apply(q, k, v)
    if prepared.backend == "flash":
        return _flash(q, k, v, mask)
    if prepared.backend == "flex":
        if q.device.type == "cpu" and q.requires_grad and not flex_trains_on_cpu():
            # torch >= 2.11 has no CPU backward for FlexAttention: SDPA with the same mask (exact).
            allowed = _sdpa_mask(mask, q.shape[-2], k.shape[-2], seq_len, q.device, doc_ids)
            return _sdpa(q, k, v, mask, allowed)
        return _flex(q, k, v, prepared.bias)
    return _sdpa(q, k, v, mask, prepared.bias)
