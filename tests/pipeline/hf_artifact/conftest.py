"""Exports of tiny runs (Llama, Qwen2 with tied embeddings, Mistral), built once per session."""

from __future__ import annotations

import pytest

from pipeline.hf_artifact import write_artifact
from pipeline.model import from_pretrained
from tests.factories import TINY_HF, write_tiny_hf_checkpoint, write_tokenizer

ARCH_CONFIGS = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": 128},
}


def export_tiny(root, arch: str, block_size: int = 4, facts=None):
    """(pipeline's BD3LM in eval mode, the folder ``write_artifact`` wrote) for a tiny ``arch`` checkpoint
    with a tokenizer of exactly its vocabulary (so the mask token is the tokenizer's next id)."""
    ckpt, _ = write_tiny_hf_checkpoint(root / "ar", arch, **ARCH_CONFIGS[arch])
    write_tokenizer(ckpt / "tokenizer.json", n_words=TINY_HF["vocab_size"] - 1)
    model = from_pretrained(ckpt, block_size=block_size).eval()
    return model, write_artifact(model, root / "export", facts)


@pytest.fixture(scope="session", params=sorted(ARCH_CONFIGS))
def exported(request, tmp_path_factory):
    """(arch, pipeline model, export folder)."""
    model, folder = export_tiny(tmp_path_factory.mktemp(f"export_{request.param}"), request.param)
    return request.param, model, folder
