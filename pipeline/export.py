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
import sys


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
    from pipeline.save_folder import load_training_checkpoint, local_checkpoint

    try:
        checkpoint = local_checkpoint(args.checkpoint, args.batch)
        model, source = load_training_checkpoint(checkpoint, args.trust_checkpoint, args.batch)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = (export_ar if args.ar else save_pretrained)(model, args.out)
    print(f"exported {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
