"""Load any checkpoint the project writes (or a Hugging Face AR checkpoint) for inference.

Safe formats only, unless the caller says otherwise: safetensors, DeepSpeed partitions and
``torch.load(weights_only=True)``; a Composer ``.pt`` (a pickle) is opened only with
``trust_checkpoint=True`` (the CLIs' ``--trust-checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.model import BD3LM, from_pretrained

MODEL_CONFIG_FILE = "hf_config.json"  # written into save_folder by the trainer (rank 0) at start


def load_for_inference(
    path: str | Path, device: str | torch.device = "cpu", trust_checkpoint: bool = False, **overrides
) -> BD3LM:
    """A ``BD3LM`` in eval mode from any checkpoint the project writes.

    ``path`` is a Hugging Face-format folder (an export, or an AR checkpoint before any diffusion
    training), a training ``save_folder`` (its latest checkpoint: DeepSpeed partitions of any world
    size, or Composer's file), or one Composer checkpoint file. Composer files are pickles and are
    opened only with ``trust_checkpoint``.
    """
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        return from_pretrained(p, device=device, **overrides).eval()
    if (p.is_dir() and (p / MODEL_CONFIG_FILE).exists()) or (
        p.is_file() and (p.parent / MODEL_CONFIG_FILE).exists()
    ):
        model, _ = load_training_checkpoint(p, trust_checkpoint)
        return model.to(device).eval()
    raise FileNotFoundError(
        f"{path} is neither a Hugging Face-format folder (config.json) nor a save_folder of pipeline.train "
        f"({MODEL_CONFIG_FILE}); export a checkpoint with `python -m pipeline.export --checkpoint PATH --out DIR`"
    )


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``BD3ComposerModel`` names (``[module.]model.<BD3LM name>``) to ``BD3LM`` names."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if not k.startswith("model."):
            raise ValueError(f"unexpected parameter {k!r}: not a checkpoint of pipeline.train")
        out[k.removeprefix("model.")] = v
    return out


def _config_folder(save_folder: Path) -> Path:
    cfg = save_folder / MODEL_CONFIG_FILE
    if not cfg.exists():
        raise FileNotFoundError(
            f"{cfg} not found: {save_folder} is not a save_folder written by pipeline.train"
        )
    return save_folder


def load_training_checkpoint(path: str | Path, trust_checkpoint: bool = False, batch: int | None = None):
    """A ``BD3LM`` with the weights of a training checkpoint (DeepSpeed partitions or Composer file)."""
    from pipeline.model import ModelConfig
    from pipeline.trainer.deepspeed_config import DS_SUBDIR, consolidated_state_dict

    p = Path(path)
    save_folder = p if p.is_dir() else p.parent
    config = ModelConfig.from_hf_config(
        json.loads((_config_folder(save_folder) / MODEL_CONFIG_FILE).read_text())
    )
    if p.is_dir() and (p / DS_SUBDIR).is_dir():
        state, tag = consolidated_state_dict(p, batch)
        source = f"{p / DS_SUBDIR / tag}"
    else:
        file = p
        if p.is_dir():
            candidates = sorted(p.glob("latest-rank0.pt*")) or sorted(p.glob("ep*-ba*-rank0.pt"))
            if not candidates:
                raise FileNotFoundError(f"no checkpoint in {p} (expected deepspeed/ or latest-rank0.pt)")
            file = candidates[-1].resolve()
        if not trust_checkpoint:
            raise PermissionError(
                f"{file} is a Composer checkpoint, a pickle that can run code when loaded; pass "
                "--trust-checkpoint only if your own run wrote it"
            )
        blob = torch.load(file, map_location="cpu", weights_only=False)
        state, source = blob["state"]["model"], str(file)
    state = _strip(state)
    model = BD3LM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    model.source_dir = save_folder if (save_folder / "tokenizer.json").exists() else None
    return model.eval(), source
