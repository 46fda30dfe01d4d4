"""Command line: python -m data_prep {convert, tokenizer train, merge, verify} (see --help).

Only parses arguments and calls the library; library modules are imported inside the command
functions so that `--help` and worker processes start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from data_prep.errors import DataPrepError
from data_prep.sources import unescape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenize a corpus into packed MDS rows for BD3 pretraining; merge and verify outputs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "convert",
        help="tokenize and pack a corpus into MDS shards (resumable)",
        description="Tokenize documents, append EOS to each, pack them into rows of exactly --seq-len "
        "tokens and write DIR/train (and DIR/val) as MosaicML Streaming MDS datasets. Rerun the "
        "same command after a crash to resume; on a finished output it does nothing.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="SRC",
        help="files or globs (.txt, .jsonl, .jsonl.zst, .parquet), or a hub dataset name "
        "(NAME or NAME:CONFIG; 'openwebtext' = Skylion007/openwebtext)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder, or s3:// gs:// oci:// ... URI")
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="TOK",
        help="tokenizer.json, a model folder holding one, or a hub name",
    )
    p.add_argument("--seq-len", type=int, required=True, metavar="N", help="tokens per row")
    p.add_argument(
        "--val-docs", type=int, default=0, metavar="K", help="hold out the last K documents as split val"
    )
    p.add_argument(
        "--workers", type=int, default=None, metavar="W", help="tokenizer processes (default: all cores)"
    )
    p.add_argument(
        "--text-field",
        default="text",
        metavar="FIELD",
        help="text field of jsonl/parquet records (default: text)",
    )
    p.add_argument(
        "--doc-sep",
        type=unescape,
        default=None,
        metavar="SEP",
        help=r"split .txt files into documents at SEP (escapes \n \t allowed, e.g. '\n\n'); default: one per file",
    )
    p.add_argument("--bos", action="store_true", help="also prepend the BOS token to every document")
    p.add_argument("--eos-token", default=None, metavar="STR", help="EOS token (default: from the tokenizer)")
    p.add_argument(
        "--dtype", choices=("auto", "uint16", "uint32"), default="auto", help="token dtype (default: auto)"
    )
    p.add_argument(
        "--compression", choices=("zstd", "none"), default="zstd", help="shard compression (default: zstd)"
    )
    p.add_argument(
        "--shard-size-limit",
        default="64mb",
        metavar="BYTES",
        help="shard size before compression (default: 64mb)",
    )
    p.add_argument(
        "--slice",
        default=None,
        metavar="i/n",
        help="only documents [i*N//n, (i+1)*N//n), into DIR/slice-i-of-n",
    )
    p.add_argument(
        "--docs-per-part",
        type=int,
        default=20_000,
        metavar="P",
        help="documents per resumable part (default: 20000)",
    )
    p.add_argument("--max-docs", type=int, default=None, metavar="M", help="use only the first M documents")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing output in --out and start again"
    )
    p.add_argument(
        "--local-cache", default=None, metavar="DIR", help="local build folder when --out is remote"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)

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

    p = commands.add_parser(
        "verify",
        help="re-read and check every shard of an output",
        description="Re-read every shard of every split and check it against the index and the manifest. "
        "Exit 0 with one OK line, or 1 listing each problem.",
    )
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(run=_verify)
    return parser


def _convert(a: argparse.Namespace) -> int:
    from data_prep.convert import convert
    from data_prep.manifest import format_summary

    result = convert(
        a.input,
        a.out,
        a.tokenizer,
        a.seq_len,
        val_docs=a.val_docs,
        workers=a.workers,
        text_field=a.text_field,
        doc_sep=a.doc_sep,
        bos=a.bos,
        eos_token=a.eos_token,
        dtype=a.dtype,
        compression=a.compression,
        shard_size_limit=a.shard_size_limit,
        slice=a.slice,
        docs_per_part=a.docs_per_part,
        max_docs=a.max_docs,
        overwrite=a.overwrite,
        local_cache=a.local_cache,
        progress=not a.no_progress,
    )
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
