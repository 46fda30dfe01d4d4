"""Loading a save_folder's checkpoints for inference: DeepSpeed partitions, Composer's file, FSDP shards.

Safe formats only, unless the caller says otherwise: safetensors, DeepSpeed partitions and
``torch.load(weights_only=True)``; a Composer ``.pt`` (a pickle) is opened only with
``trust_checkpoint=True`` (the CLIs' ``--trust-checkpoint``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from pipeline.model import BD3LM, ModelConfig, from_pretrained
from pipeline.save_folder.layout import (
    DS_SUBDIR,
    LATEST,
    MODEL_CONFIG_FILE,
    SHARDED_METADATA,
    TOKENIZER_FILE,
    composer_checkpoints,
    ds_folder,
    ds_tag,
    is_one_checkpoint,
    latest_ds_tag,
)


def consolidated_state_dict(
    save_folder: str | Path, batch: int | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 weights from the ZeRO partitions of ``save_folder`` (one process, any world size).

    Returns (the ``BD3ComposerModel`` state dict: ``model.`` + the ``BD3LM`` names, the tag used:
    the latest when ``batch`` is None).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = ds_folder(save_folder)
    if batch is None:
        tag = latest_ds_tag(save_folder)
        if tag is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ds_dir}")
    else:
        tag = ds_tag(batch)
    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag), tag


def load_for_inference(
    path: str | Path, device: str | torch.device = "cpu", trust_checkpoint: bool = False, **overrides
) -> BD3LM:
    """A ``BD3LM`` in eval mode from any checkpoint the project writes.

    ``path`` is a Hugging Face-format folder (an export, or an AR checkpoint before any diffusion
    training), a training ``save_folder`` (its latest checkpoint: DeepSpeed partitions of any world
    size, Composer's file or FSDP shards), or one Composer checkpoint (a file, or a sharded folder
    ``ep{E}-ba{N}``). Composer checkpoints are pickles and are opened only with ``trust_checkpoint``.
    """
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        return from_pretrained(p, device=device, **overrides).eval()
    if (p / MODEL_CONFIG_FILE).exists() or (is_one_checkpoint(p) and (p.parent / MODEL_CONFIG_FILE).exists()):
        model, _ = load_training_checkpoint(p, trust_checkpoint)
        return model.to(device).eval()
    raise FileNotFoundError(
        f"{path} is neither a Hugging Face-format folder (config.json) nor a save_folder of pipeline.train "
        f"({MODEL_CONFIG_FILE}); export a checkpoint with `python -m pipeline.export --checkpoint PATH --out DIR`"
    )


def sharded_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model weights (``BD3ComposerModel`` names) of an FSDP sharded checkpoint folder, gathered
    into full tensors in this one process, whatever the world size that wrote it. Only the model's
    tensors are read, not the optimizer's. The folder's ``.metadata`` is a pickle: trusted input only.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    if not (folder / SHARDED_METADATA).is_file():
        raise FileNotFoundError(
            f"{folder} is not a complete sharded checkpoint: {SHARDED_METADATA} is missing"
        )
    reader = dcp.FileSystemReader(str(folder))
    prefix = "state.model."  # Composer saves {"state": state.state_dict(), ...}; DCP flattens the keys
    wanted = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not wanted:
        raise ValueError(
            f"{folder} holds no model weights (no {prefix}* tensors): not a checkpoint of pipeline.train"
        )
    with warnings.catch_warnings():  # one process, on purpose: DCP warns about it on every load
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    return {key[len(prefix) :]: value for key, value in wanted.items()}


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
    """A ``BD3LM`` with the weights of a training checkpoint: DeepSpeed partitions, Composer's file or
    an FSDP sharded folder (``batch``: that batch's, default the latest)."""
    p = Path(path)
    one_checkpoint = is_one_checkpoint(p)
    save_folder = p.parent if one_checkpoint else p
    config = ModelConfig.from_hf_config(
        json.loads((_config_folder(save_folder) / MODEL_CONFIG_FILE).read_text())
    )
    if not one_checkpoint and ds_folder(p).is_dir():
        state, tag = consolidated_state_dict(p, batch)
        source = f"{ds_folder(p) / tag}"
    else:
        file = p
        if not one_checkpoint:
            found = composer_checkpoints(p)
            if batch is not None and batch not in found:
                raise FileNotFoundError(
                    f"no checkpoint of batch {batch} in {p}; batches there: {sorted(found)}"
                )
            latest = sorted(p.glob(f"{LATEST}*"))
            if not latest and not found:
                raise FileNotFoundError(f"no checkpoint in {p} (expected {DS_SUBDIR}/ or {LATEST})")
            if batch is not None:
                file = found[batch]
            else:  # by batch, not by name: ba9 comes before ba10
                file = latest[-1].resolve() if latest else found[max(found)]
        if not trust_checkpoint:
            raise PermissionError(
                f"{file} is a Composer checkpoint, a pickle that can run code when loaded; pass "
                "--trust-checkpoint only if your own run wrote it"
            )
        state = (
            sharded_model_state(file)
            if file.is_dir()
            else torch.load(file, map_location="cpu", weights_only=False)["state"]["model"]
        )
        source = str(file)
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
    model.source_dir = save_folder if (save_folder / TOKENIZER_FILE).exists() else None
    return model.eval(), source
