"""The decoder-only transformer of the LLaMA family, with block-diffusion attention modes.

Parameter names follow the Hugging Face LLaMA layout (``model.layers.N.self_attn.q_proj`` ...),
so checkpoints load without a name map. The model knows nothing of Composer, DeepSpeed or FSDP.

Shapes: B batch, T tokens in the forward (2L for ``bd3_train``), D hidden, H heads,
H_kv key/value heads, hd head dim, V embedding rows (mask token and padding included).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.attention import ATTN_BACKENDS, FOOTPRINT, attend, prepare_attention
from pipeline.model.config import ModelConfig, rope_scaling_type
from pipeline.model.kv_cache import KVCache
from pipeline.model.masks import AR, AttentionMask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the autocast dtype: bf16 variance loses the small tail.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,) in float32, with the checkpoint's rope scaling applied."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    kind = rope_scaling_type(config.rope_scaling)
    rs = config.rope_scaling or {}
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        # LLaMA-3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen) - low) / (high - low)
        ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > old_ctx / low, inv_freq / factor, torch.where(wavelen < old_ctx / high, inv_freq, ramp)
        )
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (B, 1, T, hd) in float32."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.backend = "auto"  # set by BD3LM.attn_backend
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.hd = config.head_dim
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=bias)
        # LLaMA's attention_bias covers o_proj too; Qwen2's qkv bias does not.
        self.o_proj = nn.Linear(self.n_heads * self.hd, D, bias=bias and config.architecture != "qwen2")

    def forward(self, x, cos, sin, mask, seq_len, doc_ids, kv_cache, write_cache, prepared=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            # Stage the new keys after the cached ones and attend over the buffer in place (no copy);
            # they become part of the cache only when the caller commits them (write_cache).
            kv_cache.put(self.layer_idx, k, v)
            k, v = kv_cache.get(self.layer_idx, extra=T)
            if k.dtype != q.dtype:  # a cache made outside autocast, used inside it
                k, v = k.to(q.dtype), v.to(q.dtype)
        out = attend(q, k, v, mask, seq_len, self.backend, doc_ids, prepared)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D, F_, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(D, F_, bias=bias)
        self.up_proj = nn.Linear(D, F_, bias=bias)
        self.down_proj = nn.Linear(F_, D, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

        self.compiled = None  # set by apply_compile

    def forward(self, x, cos, sin, mask, seq_len, doc_ids, kv_cache=None, write_cache=False, prepared=None):
        # Decoding with a KV cache stays eager: its key length grows every block, and a compiled layer
        # would recompile for each length (and each layer index the cache is read with).
        if self.compiled is not None and kv_cache is None:
            return self.compiled(x, cos, sin, mask, seq_len, doc_ids, None, False, prepared)
        return self._block(x, cos, sin, mask, seq_len, doc_ids, kv_cache, write_cache, prepared)

    def _block(self, x, cos, sin, mask, seq_len, doc_ids, kv_cache=None, write_cache=False, prepared=None):
        x = x + self.self_attn(
            self.input_layernorm(x), cos, sin, mask, seq_len, doc_ids, kv_cache, write_cache, prepared
        )
        return x + self.mlp(self.post_attention_layernorm(x))


def apply_compile(model: BD3LM, backend: str = "inductor") -> None:
    """Compile each decoder layer separately with ``torch.compile``, as torchtitan does: one small graph
    reused by every layer (parameters are graph inputs), compiled once per input shape. The module
    tree, parameter names and hooks (FSDP, DeepSpeed ZeRO-3, activation checkpointing) are unchanged.
    Forwards with a KV cache run eagerly (see ``DecoderLayer.forward``). ``backend="eager"`` or
    ``"aot_eager"`` exercise dynamo on CPU, where inductor's code generation is not wanted."""
    for layer in model.model.layers:
        layer.compiled = torch.compile(layer._block, backend=backend)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class BD3LM(nn.Module):
    """LLaMA-family decoder with AR, MDLM and block-diffusion attention.

    ``forward(input_ids)`` runs causal attention and returns logits (B, T, V); keyword arguments
    select the other modes (see ``forward``).
    """

    def __init__(
        self, config: ModelConfig, *, attn_backend: str = "auto", activation_checkpointing: bool = False
    ):
        """``config`` is the architecture; the keyword arguments say how it runs and can be changed
        later (``model.attn_backend = "flex"``): ``attn_backend`` one of ``ATTN_BACKENDS``,
        ``activation_checkpointing`` recomputes each decoder layer in backward (training only)."""
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.attn_backend = attn_backend
        self.activation_checkpointing = activation_checkpointing

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, backend: str) -> None:
        if backend not in ATTN_BACKENDS and backend != FOOTPRINT:
            raise ValueError(f"attn_backend {backend!r} is not one of {ATTN_BACKENDS}")
        self._attn_backend = backend
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    # -- construction -------------------------------------------------------------------------
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialization for training from scratch (normal(0, initializer_range))."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)

    @property
    def invalid_output_ids(self) -> torch.Tensor:
        """Output ids never predicted: the mask token and the vocabulary padding rows."""
        c = self.config
        ids = list(range(c.base_vocab_size, c.vocab_size))
        if c.mask_token_id is not None and c.mask_token_id < c.base_vocab_size:
            ids.append(c.mask_token_id)
        return torch.tensor(sorted(ids), dtype=torch.long)

    # -- forward ------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor):
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos(), emb.sin()

    # Over 60 lines on purpose: the model's forward top to bottom (nanoGPT style): every attention mode is a branch here.
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attn: AttentionMask = AR,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        write_cache: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the transformer.

        Args:
            input_ids: (B, T) token ids. For ``bd3_train`` T = 2L and the input is concat(x_t, x_0).
            attn: the attention pattern (default causal).
            positions: (B, T) or (T,) rotary positions; default 0..L-1 (repeated for both halves
                of ``bd3_train``), offset by the cache's next position when a cache is given.
            doc_ids: optional (B, L) document index per position (per-document masking).
            kv_cache: keys/values of earlier clean blocks; queries see all of it.
            write_cache: append this forward's keys/values to ``kv_cache`` (a finished block).
            return_hidden: return the final-normed hidden states (B, T, D) instead of logits.
        Returns:
            logits (B, T, V) in the compute dtype, or hidden states (B, T, D).
        """
        B, T = input_ids.shape
        L = T // 2 if attn.kind == "bd3_train" else T
        if attn.kind == "bd3_train" and T % 2:
            raise ValueError(f"bd3_train expects concat(x_t, x_0) of even length, got {T}")
        if kv_cache is not None:
            if attn.kind not in ("ar", "bd3_decode"):
                raise ValueError(f"a KV cache works with 'ar' or 'bd3_decode' attention, not {attn.kind!r}")
            if doc_ids is not None:
                raise ValueError("per-document masking is not supported with a KV cache")
            attn = dataclasses.replace(attn, cache_len=kv_cache.length)
        if positions is None:
            start = kv_cache.next_position if kv_cache is not None else 0
            positions = torch.arange(start, start + L, device=input_ids.device)
            if attn.kind == "bd3_train":
                positions = positions.repeat(2)
        if positions.dim() == 1:
            positions = positions[None].expand(B, -1)
        self._check_length(positions, L)
        cos, sin = self.rope(positions)

        x = self.model.embed_tokens(input_ids)
        # Masks are built here, once per forward and outside the (compiled) layers.
        n_keys = T + (kv_cache.length if kv_cache is not None else 0)
        prepared = prepare_attention(
            self.attn_backend, attn, T, n_keys, L, input_ids.device, self.compute_dtype(), doc_ids
        )
        for layer in self.model.layers:
            args = (x, cos, sin, attn, L, doc_ids, kv_cache, write_cache, prepared)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if kv_cache is not None and write_cache:
            kv_cache.advance(T)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def compute_dtype(self) -> torch.dtype:
        """The dtype of the activations the layers produce: autocast's when on, else the weights'."""
        p = self.lm_head.weight
        if torch.is_autocast_enabled(p.device.type):
            return torch.get_autocast_dtype(p.device.type)
        return p.dtype

    def _check_length(self, positions: torch.Tensor, L: int) -> None:
        sw = self.config.sliding_window
        if sw is not None and L > sw:
            raise ValueError(
                f"sequence length {L} exceeds the checkpoint's sliding_window {sw}; "
                "sliding-window attention is not implemented: use max_seq_len <= sliding_window"
            )

    def new_kv_cache(self, batch_size: int, capacity: int | None = None, dtype=None, device=None) -> KVCache:
        """A preallocated cache for ``batch_size`` rows and ``capacity`` tokens (default: context length)."""
        c = self.config
        p = self.lm_head.weight
        if capacity is None:  # the context the checkpoint attends over
            capacity = min(c.max_position_embeddings, c.sliding_window or c.max_position_embeddings)
        if dtype is None:  # keys come out of the projections in the autocast dtype when it is on
            dtype = self.compute_dtype()
        return KVCache(
            num_layers=c.num_hidden_layers,
            batch_size=batch_size,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            capacity=capacity,
            dtype=dtype,
            device=device or p.device,
        )

    def num_params(self, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n
