"""Write a Hugging Face-format folder from a training checkpoint.

    python -m pipeline.export --checkpoint SAVE_FOLDER_OR_FILE --out DIR [--ar]
        [--eval-json EVAL.json --baseline-json AR_EVAL.json --plot PPL.png --data DATA_DIR]
        [--sample-json SAMPLE.json --downstream-json TASKS.json]

PATH is a ``save_folder`` (its latest checkpoint) or one checkpoint. DeepSpeed ZeRO checkpoints
(``SAVE_FOLDER/deepspeed/ba{N}``) are consolidated in this one process whatever the world size
that wrote them. Composer's own checkpoints (``*.pt``) are pickles: they are opened only with
``--trust-checkpoint``, for files your own runs wrote. ``--ar`` drops the mask token and vocabulary
padding rows, so the ``transformers`` AR class loads the folder.

Without ``--ar`` the folder is self-contained for ``transformers`` (``pipeline.hf_artifact``):
modeling code for ``trust_remote_code=True``, tokenizer files and a model card (README.md) filled from
the run's ``run_config.json`` (in the save_folder), the data's manifest.json and the given
``pipeline.eval`` results; a section without data says so. generation_config.json carries the
sampling settings the model was evaluated with (``--sample-json``, else the run's
``callbacks.generation``): ``model.bd3_generate(input_ids)`` samples that way.
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
    ap.add_argument("--batch", type=int, help="export the checkpoint of this batch (default: the latest)")
    ap.add_argument("--ar", action="store_true", help="drop the mask/padding rows (transformers AR class)")
    card = ap.add_argument_group("model card (each optional; nothing else is invented)")
    card.add_argument("--eval-json", help="pipeline.eval --out of this checkpoint: the likelihood table")
    card.add_argument(
        "--baseline-json", help="pipeline.eval --out of the AR-init checkpoint (baseline column)"
    )
    card.add_argument(
        "--downstream-json", help="pipeline.eval --tasks ... --out of this checkpoint: the downstream table"
    )
    card.add_argument("--plot", help="pipeline.eval --plot PNG, copied into the folder and shown")
    card.add_argument(
        "--sample-json",
        help="pipeline.sample --out of this model: its settings become bd3_generate's defaults "
        "(generation_config.json; default: the run's callbacks.generation, else the sampler's defaults)",
    )
    card.add_argument(
        "--data", help="data_prep output folder (manifest.json); default: the run's, if reachable"
    )
    card.add_argument("--base-model", help="hub id of the AR base model (default: the run's init_from)")
    card.add_argument("--license", help="license of the weights (e.g. the base model's: apache-2.0)")
    ap.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow unpickling a Composer .pt checkpoint (only files your own runs wrote)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.hf_artifact import CardFacts, write_artifact
    from pipeline.model import export_ar
    from pipeline.save_folder import load_training_checkpoint, local_checkpoint, run_config_file

    try:
        checkpoint = local_checkpoint(args.checkpoint, args.batch)
        model, source = load_training_checkpoint(checkpoint, args.trust_checkpoint, args.batch)
        run_config = run_config_file(checkpoint)
        facts = CardFacts.from_files(
            data=args.data,
            run_config=run_config if run_config.exists() else None,
            eval_json=args.eval_json,
            baseline_json=args.baseline_json,
            downstream_json=args.downstream_json,
            plot=args.plot,
            sample_json=args.sample_json,
            base_model=args.base_model,
            license=args.license,
        )
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = export_ar(model, args.out) if args.ar else write_artifact(model, args.out, facts)
    print(f"exported {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
