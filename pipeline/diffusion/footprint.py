"""Activation memory and FLOPs of one training microbatch, measured on fake tensors.

``trace_train_step`` builds the real ``BD3LM`` and runs the objective's real forward and backward
(the 2L input of ``bd3_train``, activation checkpointing and the chunked cross-entropy as configured)
under ``FakeTensorMode``: no memory is allocated and nothing is computed, but every tensor has its
real shape and dtype. ``LiveBytes`` (a dispatch mode, the method of torch's ``MemTracker``, which
refuses modules called twice per step as the chunked loss's head is) follows every storage an op
creates until it is freed; ``FlopCounterMode`` counts the matmuls. Only the noise draw is replaced:
choosing the masked positions is data-dependent, so the trace scores a fixed number of positions (the
expected masked fraction of the noise interval). Complementary masks (a second copy), the auxiliary
AR loss (a causal pass) and per-document masks (documents of L/4 tokens) are traced when configured.

Attention runs as on the GPU: ``attention="fused"`` traces the ``footprint`` stand-in of a fused
kernel (output + log-sum-exp, no score matrix); ``attention="sdpa"`` traces SDPA as it runs on CPU
(used to validate against a real CPU run). FLOPs are counted with dense attention (the SDPA math
path), so they count every query-key pair, allowed or not.

``train_flops_per_sample`` is the other convention, the one the speed monitor reports: only the
query-key pairs the mask allows (kernels that skip masked tiles do no other work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from pipeline.diffusion.noise import MIN_T
from pipeline.diffusion.objective import DiffusionConfig, hidden_states, score_positions
from pipeline.model import AR, BD3LM, ModelConfig
from pipeline.model import attention as attention_module
from pipeline.model.attention import FOOTPRINT
from pipeline.model.compat import convert_dtype


def attention_pairs(seq_len: int, block_size: int, shift: bool) -> tuple[int, int]:
    """(tokens in the forward, allowed query-key pairs) of one sample's training forward."""
    L, bs = seq_len, block_size
    if bs == 1 and shift:
        return L, L * (L + 1) // 2  # the causal clean pass only
    if bs == L:
        return L, L * L  # the bidirectional noisy pass only
    # concat(x_t, x_0) under the bd3_train mask: block-diagonal in x_t (L * L'), offset
    # block-causal x_t -> x_0 and block-causal x_0 -> x_0 (together L^2).
    return 2 * L, L * L + L * bs


def masked_fraction(diffusion: DiffusionConfig, block_size: int) -> float:
    """Expected fraction of masked tokens per block of ``block_size`` under its training interval."""
    if block_size == 1:
        return 1.0
    beta, omega = diffusion.interval_for(block_size)
    return (max(beta, MIN_T) + omega) / 2


def train_flops_per_sample(
    config: ModelConfig, diffusion: DiffusionConfig, seq_len: int, block_size: int | None = None
) -> float:
    """Model FLOPs of one training sample at ``block_size`` (forward + backward, no recomputation counted).

    6 x matmul parameters x forward tokens (2L for 1 < L' < L), plus 12 x layers x heads x head_dim
    per attended query-key pair (only pairs the mask allows), plus the output head on the positions
    actually scored (expected masked fraction of the noise interval). Complementary masks double the
    body; the auxiliary AR loss adds a causal pass. Without ``block_size``: the expectation over the
    trained sizes (``block_size_weights``), what a step costs on average.
    """
    if block_size is None:
        sizes = diffusion.block_sizes
        weights = diffusion.block_size_weights or [1.0] * len(sizes)
        total = sum(w * train_flops_per_sample(config, diffusion, seq_len, b) for b, w in zip(sizes, weights))
        return total / sum(weights)
    c = config
    L, bs = seq_len, block_size
    attn_dim = c.num_attention_heads * c.head_dim
    kv_dim = c.num_key_value_heads * c.head_dim
    body = c.num_hidden_layers * (
        2 * c.hidden_size * attn_dim + 2 * c.hidden_size * kv_dim + 3 * c.hidden_size * c.intermediate_size
    )
    head = c.hidden_size * c.vocab_size
    tokens, pairs = attention_pairs(L, bs, diffusion.shift)
    copies = 2 if diffusion.complementary_mask and bs > 1 else 1
    scored = (L - 1) * (1.0 if copies == 2 else masked_fraction(diffusion, bs))
    flops = copies * (6 * body * tokens + 12 * c.num_hidden_layers * attn_dim * pairs) + 6 * head * scored
    if diffusion.aux_ar_weight > 0:
        flops += 6 * body * L + 12 * c.num_hidden_layers * attn_dim * L * (L + 1) // 2 + 6 * head * (L - 1)
    return float(flops)


@dataclass
class Footprint:
    """One microbatch's forward + backward on fake tensors.

    activations_bytes: the peak of every live byte that is not a parameter or gradient (saved
        activations, temporaries, autocast weight copies, masks).
    peak_bytes: the trace's peak of all live bytes, parameters and gradients included.
    flops: what ``FlopCounterMode`` counted (0 unless ``count_flops``).
    """

    activations_bytes: int
    peak_bytes: int
    flops: int


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode and still alive, and their peaks.

    Gradients of ``params`` (counted when autograd assigns them) are kept apart from activations:
    ``peak_activations`` is the peak of (live bytes - gradient bytes), ``peak`` the peak of all.
    Tensors made before the mode (the parameters) are not counted.
    """

    def __init__(self, params=()):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self._refs: set = set()
        self.current = self.grads = self.peak = self.peak_activations = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _free(self, n: int, ref) -> None:
        self.current -= n
        self._refs.discard(ref)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = n
        self.current += n
        self._refs.add(weakref.ref(st, lambda ref, n=n: self._free(n, ref)))

    def _on_grad(self, p: torch.Tensor) -> None:
        st = p.grad.untyped_storage()
        if st in self._seen and not getattr(p, "_live_bytes_counted", False):
            self.grads += self._seen[st]
            p._live_bytes_counted = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        self.peak = max(self.peak, self.current)
        self.peak_activations = max(self.peak_activations, self.current - self.grads)
        return out

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)


def clear_mask_caches() -> None:
    """Masks cached by the attention backends hold tensors of the mode they were made in."""
    attention_module._cached_dense.cache_clear()
    attention_module._cached_block_mask.cache_clear()


@dataclass
class _Batch:
    """A microbatch with its scored positions chosen up front (choosing them in fake mode would be
    data-dependent): ``copies`` is [(x_t, rows, cols)] (two with complementary masks), ``ar`` the
    (rows, cols) of the auxiliary AR loss or None, ``doc_ids`` documents of L/4 tokens or None."""

    x0: torch.Tensor
    copies: list
    ar: tuple | None
    doc_ids: torch.Tensor | None

    def to(self, convert) -> _Batch:
        conv = lambda ts: tuple(convert(t) for t in ts)  # noqa: E731
        return _Batch(
            convert(self.x0),
            [conv(c) for c in self.copies],
            None if self.ar is None else conv(self.ar),
            None if self.doc_ids is None else convert(self.doc_ids),
        )


def _fake_batch(config: ModelConfig, diffusion: DiffusionConfig, batch: int, seq_len: int) -> _Batch:
    """The microbatch the trace runs, made outside fake mode (real, small tensors)."""
    L = seq_len
    x0 = torch.randint(0, config.base_vocab_size, (batch, L))
    n = max(1, round((L - 1) * masked_fraction(diffusion, diffusion.block_size)))
    masked = torch.zeros(batch, L, dtype=torch.bool)
    masked[:, torch.linspace(1, L - 1, n).round().long()] = True  # spread over the row like a draw
    scored = torch.ones(batch, L, dtype=torch.bool)
    scored[:, 0] = False  # the first token of a row is never masked nor scored
    mask_id = config.mask_token_id if config.mask_token_id is not None else 0
    copies = [masked]
    if diffusion.complementary_mask and diffusion.block_size > 1:
        copies.append(scored & ~masked)
    copies = [(torch.where(m, torch.full_like(x0, mask_id), x0), *m.nonzero(as_tuple=True)) for m in copies]
    ar = scored.nonzero(as_tuple=True) if diffusion.aux_ar_weight > 0 else None
    doc_ids = (
        (torch.arange(L) // max(1, L // 4)).expand(batch, L).contiguous() if diffusion.per_document else None
    )
    return _Batch(x0, copies, ar, doc_ids)


def trace_train_step(
    config: ModelConfig,
    diffusion: DiffusionConfig,
    *,
    batch: int,
    seq_len: int,
    activation_checkpointing: bool,
    param_dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    attention: str = "fused",
    count_flops: bool = False,
) -> Footprint:
    """Trace one microbatch (``batch`` rows of ``seq_len`` tokens) of BD3 training on fake tensors.

    Args:
        param_dtype: dtype of the weights the forward sees (bf16 under DeepSpeed's bf16 engine).
        autocast_dtype: autocast on (Composer's amp_bf16: fp32 weights, bf16 matmuls) or None.
        attention: "fused" (the GPU kernels' footprint) or "sdpa" (as it runs on CPU).
        count_flops: also count FLOPs (dense attention; a second pass without memory tracking).

    With several training block sizes the trace runs the one that needs the most memory (the most
    forward tokens, then the largest masked fraction).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    widest = max(
        diffusion.block_sizes,
        key=lambda b: (attention_pairs(seq_len, b, diffusion.shift)[0], masked_fraction(diffusion, b)),
    )
    diffusion = dataclasses.replace(
        diffusion, block_size=widest, block_size_weights=None, noise_interval=diffusion.interval_for(widest)
    )

    if attention not in ("fused", "sdpa"):
        raise ValueError(f"attention must be 'fused' or 'sdpa', got {attention!r}")
    real = _fake_batch(config, diffusion, batch, seq_len)
    clear_mask_caches()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            model = BD3LM(config, attn_backend=FOOTPRINT if attention == "fused" else "sdpa")
            # Not model.to(): torch >= 2.11 swaps fake parameters in place and fails (compat.py).
            model = convert_dtype(model, param_dtype).train()
            model.activation_checkpointing = activation_checkpointing
            fake = real.to(mode.from_tensor)
            params = list(model.parameters())
            with LiveBytes(params) as live:
                _step(model, diffusion, fake, autocast_dtype)
            param_bytes = sum({id(p): p.numel() * p.element_size() for p in params}.values())
            flops = 0
            if count_flops:
                for p in model.parameters():
                    p.grad = None
                model.attn_backend = "sdpa"
                flops = _count_flops(model, diffusion, fake, autocast_dtype)
    finally:
        clear_mask_caches()
    return Footprint(live.peak_activations, live.peak + param_bytes, flops)


def _step(model, diffusion, batch: _Batch, autocast_dtype) -> None:
    """The objective's forward and backward on given positions (``compute_nelbo`` minus the draw)."""
    autocast = (
        torch.autocast("cpu", dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    bs, shift, chunk = diffusion.block_size, diffusion.shift, diffusion.loss_chunk_size
    x0 = batch.x0
    with autocast:
        loss = 0.0
        for xt, rows, cols in batch.copies:  # every copy's graph lives until the one backward
            h_noisy, h_clean = hidden_states(model, x0, xt, bs, shift, None, batch.doc_ids)
            ce = score_positions(model, h_noisy, h_clean, x0, rows, cols, bs, shift, chunk)
            loss = loss + ce.sum() / ce.numel()
        if batch.ar is not None:  # the auxiliary AR loss: one more causal pass
            h = model(x0, attn=AR, doc_ids=batch.doc_ids, return_hidden=True)
            ce = score_positions(model, None, h, x0, *batch.ar, 1, True, chunk)
            loss = loss + diffusion.aux_ar_weight * ce.sum() / ce.numel()
    loss.backward()


def _count_flops(model, diffusion, batch: _Batch, autocast_dtype) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was = model.activation_checkpointing
    model.activation_checkpointing = False  # model FLOPs: no layer recomputation
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            _step(model, diffusion, batch, autocast_dtype)
    finally:
        model.activation_checkpointing = was
    return int(counter.get_total_flops())
