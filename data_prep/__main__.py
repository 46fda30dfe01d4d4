"""Command line: python -m data_prep {convert, tokenizer train, merge, verify} (see --help).

Only parses arguments and calls the library; library modules are imported inside the command
functions so that `--help` and worker processes start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields

from data_prep.convert_args import ConvertArgs
from data_prep.errors import DataPrepError
from data_prep.sources import unescape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenize a corpus into packed MDS rows for BD3 pretraining; merge and verify outputs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(commands)
    _add_tokenizer(commands)
    _add_merge(commands)
    _add_verify(commands)
    return parser


# Over 60 lines on purpose: one flat list of flags, each a line: splitting it would only scatter the CLI.
def _add_convert(commands) -> None:
    """The convert command: a flag for each field of ConvertArgs (--seq-len sets seq_len), with the
    field's default (required when it has none) and choices."""
    p = commands.add_parser(
        "convert",
        help="tokenize and pack a corpus into MDS shards (resumable)",
        description="Tokenize documents, append EOS to each, pack them into rows of exactly --seq-len "
        "tokens and write DIR/train (and DIR/val) as MosaicML Streaming MDS datasets. Rerun the "
        "same command after a crash to resume; on a finished output it does nothing.",
    )
    default = {f.name: f.default for f in fields(ConvertArgs) if f.init}

    def flag(name: str, help: str, **kw) -> None:
        if default[name] is MISSING:
            kw["required"] = True
        else:
            kw["default"] = default[name]
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=help, **kw)

    # One line per flag, in --help order: long, but a flat list to read top to bottom.
    p.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        required=True,
        metavar="SRC",
        help="files or globs (.txt, .jsonl, .jsonl.zst, .parquet), or a hub dataset name "
        "(NAME or NAME:CONFIG; 'openwebtext' = Skylion007/openwebtext)",
    )
    flag("out", "output folder, or s3:// gs:// oci:// ... URI", metavar="DIR")
    flag("tokenizer", "tokenizer.json, a model folder holding one, or a hub name", metavar="TOK")
    flag("seq_len", "tokens per row", type=int, metavar="N")
    flag("val_docs", "hold out the last K documents as split val", type=int, metavar="K")
    flag("workers", "tokenizer processes (default: all cores)", type=int, metavar="W")
    flag(
        "text_field",
        f"text field of jsonl/parquet records (default: {default['text_field']})",
        metavar="FIELD",
    )
    flag(
        "doc_sep",
        r"split .txt files into documents at SEP (escapes \n \t allowed, e.g. '\n\n'); default: one per file",
        type=unescape,
        metavar="SEP",
    )
    flag("bos", "also prepend the BOS token to every document", action="store_true")
    flag("eos_token", "EOS token (default: from the tokenizer)", metavar="STR")
    flag("dtype", f"token dtype (default: {default['dtype']})", choices=ConvertArgs.DTYPES)
    flag(
        "compression",
        f"shard compression (default: {default['compression']})",
        choices=ConvertArgs.COMPRESSIONS,
    )
    flag(
        "shard_size_limit",
        f"shard size before compression (default: {default['shard_size_limit']})",
        metavar="BYTES",
    )
    flag("slice", "only documents [i*N//n, (i+1)*N//n), into DIR/slice-i-of-n", metavar="i/n")
    flag(
        "docs_per_part",
        f"documents per resumable part (default: {default['docs_per_part']})",
        type=int,
        metavar="P",
    )
    flag("max_docs", "use only the first M documents", type=int, metavar="M")
    flag("overwrite", "delete an existing output in --out and start again", action="store_true")
    flag("local_cache", "local build folder when --out is remote", metavar="DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_convert)


def _add_tokenizer(commands) -> None:
    p = commands.add_parser("tokenizer", help="tokenizer tools")
    tok_commands = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    p = tok_commands.add_parser(
        "train",
        help="train a byte-level BPE tokenizer",
        description="Train a byte-level BPE on the documents of the inputs (same readers as convert), "
        "with <|endoftext|> (id 0) and <|mask|> (id 1) reserved, and write tokenizer.json.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help="as for convert")
    p.add_argument("--vocab-size", type=int, required=True, metavar="V")
    p.add_argument("--out", required=True, metavar="TOK_JSON", help="path of the tokenizer.json to write")
    p.add_argument("--text-field", default="text", metavar="FIELD", help="as for convert")
    p.add_argument("--doc-sep", type=unescape, default=None, metavar="SEP", help="as for convert")
    p.add_argument(
        "--min-frequency", type=int, default=2, metavar="N", help="minimum pair count to merge (default: 2)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_tokenizer_train)


def _add_merge(commands) -> None:
    p = commands.add_parser(
        "merge",
        help="combine finished outputs (e.g. slices) into one dataset",
        description="Combine finished outputs into one dataset per split. A folder holding "
        "slice-i-of-n/ folders stands for all its slices; every slice must be finished. Shards are "
        "hard-linked (copied across file systems) into OUT.",
    )
    p.add_argument("inputs", nargs="+", metavar="DIR")
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output in OUT")
    p.set_defaults(run=_merge)


def _add_verify(commands) -> None:
    p = commands.add_parser(
        "verify",
        help="re-read and check every shard of an output",
        description="Re-read every shard of every split and check it against the index and the manifest. "
        "Exit 0 with one OK line, or 1 listing each problem.",
    )
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(run=_verify)


def _convert(a: argparse.Namespace) -> int:
    from data_prep.convert import run
    from data_prep.manifest import format_summary

    result = run(ConvertArgs(**{f.name: getattr(a, f.name) for f in fields(ConvertArgs) if f.init}))
    if result.already_complete:
        print(f"{result.out} is already complete (same arguments); nothing to do")
    print(
        format_summary(
            result.manifest,
            elapsed_s=result.elapsed_s,
            tokens_this_run=result.tokens_this_run,
            location=result.out,
        )
    )
    if result.usage is not None:
        print(result.usage.summary(result.tokens_this_run))
    return 0


def _tokenizer_train(a: argparse.Namespace) -> int:
    from data_prep.tokenizer import train_tokenizer

    info = train_tokenizer(
        a.input,
        a.vocab_size,
        a.out,
        text_field=a.text_field,
        doc_sep=a.doc_sep,
        min_frequency=a.min_frequency,
        progress=not a.no_progress,
    )
    print(
        f"wrote {a.out}: vocab {info.vocab_size:,}, eos {info.eos_token!r}={info.eos_id}, sha256 {info.sha256[:16]}"
    )
    return 0


def _merge(a: argparse.Namespace) -> int:
    from data_prep.manifest import format_summary
    from data_prep.merge import merge

    result = merge(a.inputs, a.out, overwrite=a.overwrite)
    if result.already_complete:
        print(f"{result.out} is already complete (same inputs); nothing to do")
    print(f"merged {len(result.manifest['merged_from'])} outputs")
    print(format_summary(result.manifest, location=result.out))
    return 0


def _verify(a: argparse.Namespace) -> int:
    from data_prep.verify import verify

    report = verify(a.dir)
    for error in report.errors:
        print(error, file=sys.stderr)
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("data_prep")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return args.run(args)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
