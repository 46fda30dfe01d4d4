"""Write a Hugging Face-format folder from a training checkpoint.

    python -m pipeline.export --checkpoint SAVE_FOLDER_OR_FILE --out DIR [--ar]

PATH is a ``save_folder`` (its latest checkpoint) or one checkpoint. DeepSpeed ZeRO checkpoints
(``SAVE_FOLDER/deepspeed/ba{N}``) are consolidated in this one process whatever the world size
that wrote them. Composer's own checkpoints (``*.pt``) are pickles: they are opened only with
``--trust-checkpoint``, for files your own runs wrote. ``--ar`` drops the mask token and vocabulary
padding rows, so the ``transformers`` AR class loads the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

MODEL_CONFIG_FILE = "hf_config.json"  # written into save_folder by the trainer (rank 0) at start


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
    from pipeline.model import BD3LM, ModelConfig
    from pipeline.trainer.deepspeed import DS_SUBDIR, consolidated_state_dict

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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--checkpoint", required=True, help="save_folder (latest checkpoint) or one checkpoint file"
    )
    ap.add_argument("--out", required=True, help="output folder (Hugging Face format, safetensors)")
    ap.add_argument(
        "--batch", type=int, help="DeepSpeed: export the checkpoint of this batch (default latest)"
    )
    ap.add_argument("--ar", action="store_true", help="drop the mask/padding rows (transformers AR class)")
    ap.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow unpickling a Composer .pt checkpoint (only files your own runs wrote)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.model import export_ar, save_pretrained

    try:
        model, source = load_training_checkpoint(args.checkpoint, args.trust_checkpoint, args.batch)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = (export_ar if args.ar else save_pretrained)(model, args.out)
    print(f"exported {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
