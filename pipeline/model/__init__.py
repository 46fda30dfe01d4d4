"""The BD3 model: plain PyTorch, no Composer/DeepSpeed imports.

``from_pretrained(path)`` returns a ``BD3LM`` whose ``forward(input_ids)`` runs causal attention
and returns logits (B, L, V); other attention modes are keyword arguments.
"""

from pipeline.model.config import ModelConfig, ModelConfigError
from pipeline.model.hf_io import export_ar, from_pretrained, save_pretrained
from pipeline.model.kv_cache import KVCache
from pipeline.model.masks import AR, AttentionMask
from pipeline.model.transformer import BD3LM, apply_compile

__all__ = [
    "AR",
    "AttentionMask",
    "BD3LM",
    "apply_compile",
    "KVCache",
    "ModelConfig",
    "ModelConfigError",
    "export_ar",
    "from_pretrained",
    "save_pretrained",
]
