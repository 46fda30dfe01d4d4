"""convert: a corpus into tokenized, packed MDS rows; resumable after a kill at any point.

Layout of an output folder (or of DIR/slice-i-of-n/ with --slice):
    in_progress.json                  the arguments, while the run is unfinished
    <split>/part-XXXXX/               the shards of documents [s, e) of the split, one writer each
    <split>/part-XXXXX.done.json      written atomically after the part's shards are on disk:
                                      its counts and the carry (tokens of the last, unfinished row
                                      and their document starts), which the next part starts from
    <split>/index.json                all parts' shards, written once every part is done
    manifest.json                     written last; its presence means "complete"

With a remote --out the output is staged locally and uploaded, manifest last; "complete" is then
judged by the destination (`remote.remote_complete`): a complete bucket is left alone, a complete
and intact staging copy is uploaded again, anything else is converted (resumed) again.

A rerun skips parts that have a done-marker, deletes the first part without one and redoes it
from the previous part's carry. So rows never depend on where a run was killed, on the number of
workers, or (since the carry crosses part boundaries) on --docs-per-part.

Who does what, so that a machine with many cores is limited by tokenization and not by this
process: the parent lists documents (byte ranges of local files, raw values otherwise), keeps
the order, packs rows with array operations and appends them to a temporary file per shard;
the worker processes read and decode the text, tokenize, and encode, compress, hash and write
each finished shard (`shard_writer.write_shard`). The parent's work is a few memory copies per
token, under 1% of the CPU of the run (see benchmarks/bench_data_prep.py).

The steps, one module each: `convert_args` (the arguments, checked), `plan` (which documents go
to which split and part, what is done), `batches` (reading), `encode` (tokenizing in workers),
`packing` (rows), `parts` (writing a split part by part), `shard_writer` (shards), `remote`
(uploading), `usage` (CPU and memory of the run).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep import mds
from data_prep.batches import DocumentBatches
from data_prep.convert_args import ConvertArgs, resolve_dtype
from data_prep.encode import OrderedEncoder
from data_prep.errors import DataPrepError
from data_prep.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    STATE,
    check_split_has_rows,
    load_json,
    read_manifest,
    slice_dirname,
    write_json_atomic,
)
from data_prep.parts import RowFormat, finish_split, kill_point, write_split
from data_prep.plan import SplitPlan, docs_todo, plan_splits, prepare_out_dir, slice_range
from data_prep.remote import (
    can_list,
    check_access,
    check_remote,
    is_remote,
    local_cache_dir,
    remote_complete,
    upload_output,
    upload_pending,
)
from data_prep.sources import Source, count_documents, resolve_inputs
from data_prep.tokenizer import TokenizerInfo, load_tokenizer
from data_prep.usage import RunUsage, cpu_seconds, usage_since

log = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    """What `convert` did. `manifest` is the dict written to manifest.json."""

    manifest: dict
    out: str
    local_dir: str
    elapsed_s: float
    tokens_this_run: int
    already_complete: bool
    usage: RunUsage | None = None


def convert(inputs: Sequence[str], out: str, tokenizer: str, seq_len: int, **options) -> ConvertResult:
    """Tokenize `inputs` with `tokenizer` and write rows of `seq_len` tokens as MDS to `out`.

    `options` are the other fields of `ConvertArgs` (val_docs, workers, dtype, slice, ...). The
    last `val_docs` documents of the corpus (after `max_docs`) form split "val", the rest
    "train"; each is packed independently. With `slice='i/n'` only corpus documents
    [i*N//n, (i+1)*N//n) are processed, into `out/slice-i-of-n/`. `out` may be a remote URI: the
    output is built in `local_cache` and uploaded when complete. Rerunning the same call resumes
    or, when finished, does nothing. See the module docstring for the layout.
    """
    return run(ConvertArgs(inputs, out, tokenizer, seq_len, **options))


def run(args: ConvertArgs) -> ConvertResult:
    """`convert` with its arguments already checked."""
    t0 = time.perf_counter()
    out_dir, remote = _output_location(args)
    tok, tok_info = load_tokenizer(args.tokenizer, eos_token=args.eos_token, bos=args.bos)
    out_dtype = resolve_dtype(args.dtype, tok_info.vocab_size)
    sources = resolve_inputs(args.inputs)
    recorded = _recorded_args(args, sources, tok_info)
    location = remote or str(out_dir)

    if remote and not args.overwrite and can_list(remote):
        done = remote_complete(remote, recorded)  # judged by the destination, whatever is staged here
        if done is not None:
            return ConvertResult(done, location, str(out_dir), time.perf_counter() - t0, 0, True)
    state = prepare_out_dir(out_dir, recorded, args.overwrite)
    if state == "complete" and remote and not _staging_intact(out_dir):
        log.warning("the staging copy %s of %s is damaged: converting again", out_dir, remote)
        shutil.rmtree(out_dir)
        state = prepare_out_dir(out_dir, recorded, args.overwrite)
    if state == "complete":
        (out_dir / STATE).unlink(missing_ok=True)  # left by a kill just after the manifest was written
        if remote and (can_list(remote) or upload_pending(out_dir, remote)):
            upload_output(out_dir, remote)  # the destination is not complete: upload the staged copy again
        return ConvertResult(
            read_manifest(out_dir), location, str(out_dir), time.perf_counter() - t0, 0, True
        )

    counts, n_docs = _count_documents(args, sources)
    plans = plan_splits(n_docs, args.val_docs, args.slice_ix, args.docs_per_part)
    _start_or_resume(out_dir, recorded, sum(counts))
    reader = DocumentBatches(sources, counts, args.text_field, args.doc_sep)
    tokens_this_run, usage = _write_splits(out_dir, plans, reader, tok, tok_info, out_dtype, args)

    splits = {
        split: finish_split(out_dir / split, split, plan, args.seq_len) for split, plan in plans.items()
    }
    if not args.slice_ix:
        for split, stats in splits.items():
            check_split_has_rows(split, stats, args.seq_len)
    manifest = _manifest(args, recorded, tok_info, out_dtype, sum(counts), n_docs, splits)
    kill_point("before_manifest")
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / STATE).unlink(missing_ok=True)
    if remote:
        upload_output(out_dir, remote)
    return ConvertResult(
        manifest, location, str(out_dir), time.perf_counter() - t0, tokens_this_run, False, usage
    )


def _staging_intact(out_dir: Path) -> bool:
    """Whether every shard of a finished local staging copy is there with its recorded size."""
    for split in read_manifest(out_dir).get("splits", {}):
        try:
            for shard in mds.read_index(out_dir / split).get("shards", []):
                mds.check_shard_file(out_dir / split, shard)
        except (OSError, ValueError, mds.ShardError):
            return False
    return True


def _output_location(args: ConvertArgs) -> tuple[Path, str | None]:
    """(the local folder the output is built in, the remote URI it goes to or None)."""
    remote = args.out if is_remote(args.out) else None
    if remote:
        try:
            check_remote(remote)
        except ValueError as exc:
            raise DataPrepError(f"--out {args.out}: {exc}") from exc
        check_access(remote)  # a wrong bucket or credential fails now, not after tokenizing
        local_root = Path(args.local_cache) if args.local_cache else local_cache_dir("data_prep", args.out)
    else:
        local_root = Path(args.out)
    if not args.slice_ix:
        return local_root, remote
    name = slice_dirname(*args.slice_ix)
    return local_root / name, f"{remote.rstrip('/')}/{name}" if remote else None


def _recorded_args(args: ConvertArgs, sources: Sequence[Source], tok_info: TokenizerInfo) -> dict:
    """The arguments that decide the rows, as the manifest records them (a rerun must match them)."""
    return {
        "inputs": [s.path for s in sources],
        "tokenizer": os.path.abspath(args.tokenizer) if os.path.exists(args.tokenizer) else args.tokenizer,
        "tokenizer_sha256": tok_info.sha256,
        "seq_len": args.seq_len,
        "val_docs": args.val_docs,
        "text_field": args.text_field,
        "doc_sep": args.doc_sep,
        "bos": args.bos,
        "eos_token": args.eos_token,
        "dtype": args.dtype,
        "compression": args.compression,
        "shard_size_limit": args.size_limit,
        "slice": f"{args.slice_ix[0]}/{args.slice_ix[1]}" if args.slice_ix else None,
        "docs_per_part": args.docs_per_part,
        "max_docs": args.max_docs,
    }


def _count_documents(args: ConvertArgs, sources: Sequence[Source]) -> tuple[list[int], int]:
    """(documents of each source, documents used: at most --max-docs); refuses too few."""
    log.info("counting the documents of %d input file(s)", len(sources))
    counts = [count_documents(s, text_field=args.text_field, doc_sep=args.doc_sep) for s in sources]
    corpus_docs = sum(counts)
    n_docs = min(corpus_docs, args.max_docs) if args.max_docs else corpus_docs
    if n_docs == 0:
        raise DataPrepError(f"the inputs hold no documents: {list(args.inputs)}")
    if args.val_docs >= n_docs:
        raise DataPrepError(
            f"--val-docs {args.val_docs} must be smaller than the number of documents ({n_docs:,}), "
            "so that the train split keeps at least one"
        )
    return counts, n_docs


def _start_or_resume(out_dir: Path, recorded: dict, corpus_docs: int) -> None:
    """Write in_progress.json, or check that the inputs of the run it records did not change."""
    state_path = out_dir / STATE
    if state_path.is_file():
        previous = load_json(state_path).get("corpus_documents")
        if previous != corpus_docs:
            raise DataPrepError(
                f"the inputs changed since this output was started ({previous:,} documents then, "
                f"{corpus_docs:,} now); pass --overwrite to start again"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "convert",
        "args": recorded,
        "corpus_documents": corpus_docs,
    }
    write_json_atomic(state_path, state)


def _write_splits(
    out_dir: Path,
    plans: dict[str, SplitPlan],
    reader: DocumentBatches,
    tok,
    tok_info: TokenizerInfo,
    out_dtype: str,
    args: ConvertArgs,
) -> tuple[int, RunUsage]:
    """Tokenize and write the parts not done yet; (tokens tokenized, where the CPU and memory went)."""
    fmt = RowFormat(
        args.seq_len, out_dtype, None if args.compression == "none" else args.compression, args.size_limit
    )
    todo = docs_todo(out_dir, plans)
    tokens = 0
    cpu0 = cpu_seconds()
    # The pool first: its workers are forked, best before the progress bar starts a thread.
    with OrderedEncoder(
        tok, tok_info.eos_id, tok_info.bos_id, out_dtype, args.workers if todo else 1
    ) as encoder:
        with _progress_bar(out_dir, plans, todo, args.progress) as bar:
            for split, plan in plans.items():
                tokens += write_split(out_dir / split, split, plan, reader, encoder, bar, fmt)
    return tokens, usage_since(cpu0, reader.first_doc_s, encoder.worker_peak_rss_mib)


def _progress_bar(out_dir: Path, plans: dict[str, SplitPlan], todo: int, enabled: bool):
    """tqdm over the documents of the run, on stderr, starting at those already done."""
    from tqdm import tqdm

    total = sum(plan.doc_range[1] - plan.doc_range[0] for plan in plans.values())
    if todo < total:
        log.info("resuming %s: %s of %s documents already done", out_dir, f"{total - todo:,}", f"{total:,}")
    return tqdm(
        total=total, initial=total - todo, unit="doc", file=sys.stderr, disable=not enabled, smoothing=0.05
    )


def _manifest(
    args: ConvertArgs,
    recorded: dict,
    tok_info: TokenizerInfo,
    out_dtype: str,
    corpus_docs: int,
    n_docs: int,
    splits: dict[str, dict],
) -> dict:
    """The manifest of the finished output (see `manifest.read_manifest` for what readers use)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "convert",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": recorded,
        "tokenizer": tok_info.to_dict(),
        "seq_len": args.seq_len,
        "dtype": out_dtype,
        "columns": mds.mds_columns(out_dtype, args.seq_len),
        "doc_starts_empty_sentinel": args.seq_len,
        "corpus": {
            "inputs": recorded["inputs"],
            "documents": corpus_docs,
            "used_documents": n_docs,
            "val_docs": args.val_docs,
        },
        "slice": {
            "index": args.slice_ix[0],
            "count": args.slice_ix[1],
            "doc_range": list(slice_range(n_docs, args.slice_ix)),
        }
        if args.slice_ix
        else None,
        "splits": splits,
    }
