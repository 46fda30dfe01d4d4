"""One config dataclass for the LLaMA family (LLaMA-2/3, TinyLlama, Qwen2/2.5, Mistral).

Architectures differ by fields only: grouped-query heads, qkv bias (Qwen2), tied embeddings,
rope theta and scaling. ``from_hf_config`` reads a Hugging Face ``config.json`` dict without
touching the ``transformers`` model classes.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

Architecture = Literal["llama", "qwen2", "mistral"]
SUPPORTED_ARCHITECTURES = typing.get_args(Architecture)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
VOCAB_MULTIPLE = 64
# The sizes of a shape (a training YAML's from-scratch keys, with architecture and the numerics).
SHAPE_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
POSITIVE_FIELDS = (*SHAPE_SIZES, "head_dim", "base_vocab_size", "block_size")

# TinyLlama/TinyLlama_v1.1's config.json (its architecture fields): the base model of the flagship
# recipe (yamls/bd3_1b.yaml) and the 1.1B shape that plans, tests and benchmarks use.
TINYLLAMA_1B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


class ModelConfigError(ValueError):
    """A checkpoint or model config the project cannot use; the message says what to change."""


@dataclass
class ModelConfig:
    """Shape and numerics of a decoder-only transformer, plus the BD3 vocabulary bookkeeping.

    ``vocab_size`` is the number of embedding rows (mask token and padding included);
    ``base_vocab_size`` is the AR checkpoint's vocabulary before the mask token was added.
    Output ids in ``[base_vocab_size, vocab_size)`` and ``mask_token_id`` are never predicted.
    How the model runs (attention backend, activation checkpointing) is not part of the config: see
    ``BD3LM``'s keyword arguments.
    """

    architecture: Architecture = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # BD3 additions
    base_vocab_size: int | None = None
    mask_token_id: int | None = None
    block_size: int | None = None  # the default L' of sampling/evaluation: the smallest trained size
    trained_block_sizes: list[int] | None = None  # every L' the checkpoint was trained for
    shift: bool = True

    def __post_init__(self):
        # Messages that concern one field start with its name (the trainer reports them as model.<field>).
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ModelConfigError(f"{name} must be >= 1, got {value}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ModelConfigError(
                f"rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps} and {self.rope_theta}"
            )
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unknown architecture {self.architecture!r}: supported are {SUPPORTED_ARCHITECTURES}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ModelConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        rope_type = rope_scaling_type(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        if self.base_vocab_size is None:
            self.base_vocab_size = self.vocab_size
        if self.base_vocab_size > self.vocab_size:
            raise ModelConfigError(
                f"base_vocab_size {self.base_vocab_size} is larger than vocab_size {self.vocab_size} "
                "(the embedding rows include the base vocabulary)"
            )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict (plus this project's ``bd3`` section)."""
        arch = hf.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            archs = hf.get("architectures")
            raise ModelConfigError(
                f"config.json has model_type {arch!r} (architectures {archs}); this project supports "
                f"{SUPPORTED_ARCHITECTURES} (LLaMA-2/3, TinyLlama, Qwen2/2.5, Mistral)"
            )
        bd3 = hf.get("bd3", {})
        qkv_bias = hf.get("attention_bias", arch == "qwen2")
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "mistral") else None
        # transformers >= 5 writes the rotary settings as rope_parameters (rope_theta and the scaling).
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", 10000.0)
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        kwargs = dict(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", theta),
            rope_scaling=hf.get("rope_scaling") or scaling,
            attention_bias=bool(qkv_bias),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            base_vocab_size=bd3.get("base_vocab_size"),
            mask_token_id=bd3.get("mask_token_id"),
            block_size=bd3.get("block_size"),
            trained_block_sizes=bd3.get("trained_block_sizes"),
            shift=bd3.get("shift", True),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict the ``transformers`` class of this architecture understands."""
        hf_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        out = {
            "architectures": [hf_class[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.architecture == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.architecture == "qwen2":
            out["use_sliding_window"] = False
            out["sliding_window"] = None
        out["bd3"] = {
            "base_vocab_size": self.base_vocab_size,
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "trained_block_sizes": self.trained_block_sizes,
            "shift": self.shift,
        }
        return out

    @property
    def start_token_id(self) -> int | None:
        """The token unconditional generation starts from: BOS, else EOS (None when neither is known)."""
        return self.bos_token_id if self.bos_token_id is not None else self.eos_token_id

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def rope_scaling_type(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def pad_to_multiple(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple
