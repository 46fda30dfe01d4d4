"""Load any checkpoint the project writes (or a Hugging Face AR checkpoint) for inference.

Only safe formats are read here: safetensors, or tensors through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.model import BD3LM, from_pretrained


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", **overrides) -> BD3LM:
    """A ``BD3LM`` in eval mode from a Hugging Face-format folder (exported or AR)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        return from_pretrained(p, device=device, **overrides).eval()
    raise FileNotFoundError(
        f"{path} is not a Hugging Face-format folder with config.json; export a training checkpoint "
        "first with `python -m pipeline.export --checkpoint PATH --out DIR`"
    )
