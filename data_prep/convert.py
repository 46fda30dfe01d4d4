"""convert: a corpus into tokenized, packed MDS rows; resumable after a kill at any point.

Layout of an output folder (or of DIR/slice-i-of-n/ with --slice):
    in_progress.json                  the arguments, while the run is unfinished
    <split>/part-XXXXX/               the shards of documents [s, e) of the split, one MDSWriter each
    <split>/part-XXXXX.done.json      written atomically after the part's shards are on disk:
                                      its counts and the carry (tokens of the last, unfinished row
                                      and their document starts), which the next part starts from
    <split>/index.json                all parts' shards, written once every part is done
    manifest.json                     written last; its presence means "complete"

A rerun skips parts that have a done-marker, deletes the first part without one and redoes it
from the previous part's carry. So rows never depend on where a run was killed, on the number of
workers, or (since the carry crosses part boundaries) on --docs-per-part.

Who does what, so that a machine with many cores is limited by tokenization and not by this
process: the parent lists documents (byte ranges of local files, raw values otherwise), keeps
the order, packs rows with array operations and appends them to a temporary file per shard;
the worker processes read and decode the text, tokenize, and encode, compress, hash and write
each finished shard (`mds.write_shard`). The parent's work is a few memory copies per token,
under 1% of the CPU of the run (see benchmarks/bench_data_prep.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep import mds
from data_prep.encode import OrderedEncoder, RecordBatch, peak_rss_mib
from data_prep.errors import DataPrepError
from data_prep.manifest import (
    COUNT_KEYS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    STATE,
    check_split_has_rows,
    diff_args,
    load_json,
    read_manifest,
    write_json_atomic,
)
from data_prep.packing import RowPacker
from data_prep.sources import (
    RowRef,
    Source,
    count_documents,
    iter_records,
    resolve_inputs,
    warn_invalid_utf8,
)
from data_prep.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_DOCS_PER_PART = 20_000
DEFAULT_SHARD_SIZE_LIMIT = 1 << 26  # 64 MiB, Streaming's default
# A batch sent to a tokenizer worker: big enough that the per-task cost of the pool (pickling,
# pipes, two threads of the parent) is a small fraction of a percent of tokenizing it (about a
# quarter of a second of one core), small enough that a few in flight per worker keep every core
# busy without holding much text in memory.
BATCH_CHARS = 1 << 20
BATCH_DOCS = 4096
UPLOADED = ".uploaded.json"


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


@dataclass
class RunUsage:
    """Where the CPU and memory of a run went.

    `parent_startup_cpu_s`: this process before the work (imports, tokenizer, counting);
    `parent_cpu_s`: this process during the work (reading, ordering, packing, its threads): the
    part that grows with the corpus; `workers_cpu_s`: the worker processes (decoding, tokenizing,
    encoding/compressing/writing shards); peak resident memory of this process and of the
    largest worker; `first_doc_s`: seconds from process start until the first batch of documents
    was read and handed to tokenization.
    """

    parent_startup_cpu_s: float
    parent_cpu_s: float
    workers_cpu_s: float
    parent_peak_rss_mib: float
    worker_peak_rss_mib: float
    first_doc_s: float | None

    def summary(self, tokens: int) -> str:
        per = 1e6 / tokens if tokens else 0.0
        first = f"; first document read {self.first_doc_s:.2f} s after start" if self.first_doc_s else ""
        return (
            f"CPU: parent {self.parent_cpu_s:.2f} s ({self.parent_cpu_s * per:.4f} s per M tokens; start-up "
            f"{self.parent_startup_cpu_s:.2f} s more), workers {self.workers_cpu_s:.2f} s "
            f"({self.workers_cpu_s * per:.3f} s per M tokens); peak RSS parent {self.parent_peak_rss_mib:.0f} MiB, "
            f"largest worker {self.worker_peak_rss_mib:.0f} MiB{first}"
        )


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux: from /proc; elsewhere: since data_prep was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


_IMPORTED_AT = time.perf_counter()


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like '64mb', '512kb', '1gb' (binary units, as Streaming)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(value).lower())
        if not m:
            raise DataPrepError(f"--shard-size-limit {value!r}: expected bytes or a size like 64mb")
        unit = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)[:1]]
        size = int(float(m.group(1)) * unit)
    if not 0 < size < 1 << 32:  # MDS stores sample offsets as uint32
        raise DataPrepError(f"--shard-size-limit {value!r}: must be between 1 byte and 4 GiB")
    return size


def parse_slice(spec: str) -> tuple[int, int]:
    """(i, n) from 'i/n' with 0 <= i < n."""
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise DataPrepError(f"--slice {spec!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def slice_dirname(i: int, n: int) -> str:
    return f"slice-{i}-of-{n}"


def resolve_dtype(requested: str, vocab_size: int) -> str:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; an explicit choice is checked."""
    fits16 = vocab_size <= 1 << 16
    if requested == "auto":
        return "uint16" if fits16 else "uint32"
    if requested == "uint16" and not fits16:
        raise DataPrepError(
            f"--dtype uint16 cannot hold the ids of a vocabulary of {vocab_size:,}; use uint32 or auto"
        )
    if requested not in ("uint16", "uint32"):
        raise DataPrepError(f"--dtype {requested!r}: expected auto, uint16 or uint32")
    return requested


def convert(
    inputs: Sequence[str],
    out: str,
    tokenizer: str,
    seq_len: int,
    *,
    val_docs: int = 0,
    workers: int | None = None,
    text_field: str = "text",
    doc_sep: str | None = None,
    bos: bool = False,
    eos_token: str | None = None,
    dtype: str = "auto",
    compression: str = "zstd",
    shard_size_limit: int | str = DEFAULT_SHARD_SIZE_LIMIT,
    slice: str | None = None,
    docs_per_part: int = DEFAULT_DOCS_PER_PART,
    max_docs: int | None = None,
    overwrite: bool = False,
    local_cache: str | None = None,
    progress: bool = True,
) -> ConvertResult:
    """Tokenize `inputs` with `tokenizer` and write rows of `seq_len` tokens as MDS to `out`.

    The last `val_docs` documents of the corpus (after `max_docs`) form split "val", the rest
    "train"; each is packed independently. With `slice='i/n'` only corpus documents
    [i*N//n, (i+1)*N//n) are processed, into `out/slice-i-of-n/`. `out` may be a remote URI: the
    output is built in `local_cache` and uploaded when complete. Rerunning the same call resumes
    or, when finished, does nothing. See the module docstring for the layout.
    """
    t0 = time.perf_counter()
    if seq_len < 2:
        raise DataPrepError(f"--seq-len {seq_len}: must be at least 2")
    for name, value, low in (("--val-docs", val_docs, 0), ("--docs-per-part", docs_per_part, 1)):
        if value < low:
            raise DataPrepError(f"{name} {value}: must be at least {low}")
    if max_docs is not None and max_docs < 1:
        raise DataPrepError(f"--max-docs {max_docs}: must be at least 1")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise DataPrepError(f"--workers {workers}: must be at least 1")
    if compression not in ("zstd", "none"):
        raise DataPrepError(f"--compression {compression!r}: expected zstd or none")
    size_limit = parse_size(shard_size_limit)
    slice_ix = parse_slice(slice) if slice else None

    remote = out if mds.is_remote(out) else None
    if remote:
        try:
            mds.check_remote(remote)
        except ValueError as exc:
            raise DataPrepError(f"--out {out}: {exc}") from exc
        from data_prep.remote import check_access

        check_access(remote)  # a wrong bucket or credential fails now, not after tokenizing
        default_cache = (
            Path(tempfile.gettempdir()) / "data_prep" / hashlib.sha1(out.encode()).hexdigest()[:16]
        )
        local_root = Path(local_cache) if local_cache else default_cache
    else:
        local_root = Path(out)
    out_dir = local_root / slice_dirname(*slice_ix) if slice_ix else local_root
    if remote and slice_ix:
        remote = f"{remote.rstrip('/')}/{slice_dirname(*slice_ix)}"

    tok, tok_info = load_tokenizer(tokenizer, eos_token=eos_token, bos=bos)
    out_dtype = resolve_dtype(dtype, tok_info.vocab_size)
    sources = resolve_inputs(inputs)
    args = {
        "inputs": [s.path for s in sources],
        "tokenizer": os.path.abspath(tokenizer) if os.path.exists(tokenizer) else tokenizer,
        "tokenizer_sha256": tok_info.sha256,
        "seq_len": seq_len,
        "val_docs": val_docs,
        "text_field": text_field,
        "doc_sep": doc_sep,
        "bos": bos,
        "eos_token": eos_token,
        "dtype": dtype,
        "compression": compression,
        "shard_size_limit": size_limit,
        "slice": f"{slice_ix[0]}/{slice_ix[1]}" if slice_ix else None,
        "docs_per_part": docs_per_part,
        "max_docs": max_docs,
    }
    location = remote or str(out_dir)

    if _prepare_out_dir(out_dir, args, overwrite) == "complete":
        (out_dir / STATE).unlink(missing_ok=True)  # left by a kill just after the manifest was written
        if remote and _upload_pending(out_dir, remote):
            _upload(out_dir, remote)
        return ConvertResult(
            read_manifest(out_dir), location, str(out_dir), time.perf_counter() - t0, 0, True
        )

    log.info("counting the documents of %d input file(s)", len(sources))
    counts = [count_documents(s, text_field=text_field, doc_sep=doc_sep) for s in sources]
    corpus_docs = sum(counts)
    n_docs = min(corpus_docs, max_docs) if max_docs else corpus_docs
    if n_docs == 0:
        raise DataPrepError(f"the inputs hold no documents: {list(inputs)}")
    if val_docs >= n_docs:
        raise DataPrepError(
            f"--val-docs {val_docs} must be smaller than the number of documents ({n_docs:,}), "
            "so that the train split keeps at least one"
        )
    plans = _plan_splits(n_docs, val_docs, slice_ix, docs_per_part)

    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "convert",
        "args": args,
        "corpus_documents": corpus_docs,
    }
    state_path = out_dir / STATE
    if state_path.is_file():
        previous = load_json(state_path).get("corpus_documents")
        if previous != corpus_docs:
            raise DataPrepError(
                f"the inputs changed since this output was started ({previous:,} documents then, "
                f"{corpus_docs:,} now); pass --overwrite to start again"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_path, state)

    tokens_this_run = 0
    reader = _Reader(sources, counts, text_field, doc_sep)
    row_format = _RowFormat(seq_len, out_dtype, None if compression == "none" else compression, size_limit)
    todo = _docs_todo(out_dir, plans)
    cpu0 = _cpu_seconds()
    # The pool first: its workers are forked, best before the progress bar starts a thread.
    with OrderedEncoder(tok, tok_info.eos_id, tok_info.bos_id, out_dtype, workers if todo else 1) as encoder:
        with _progress_bar(out_dir, plans, todo, progress) as bar:
            for split, plan in plans.items():
                tokens_this_run += _convert_split(
                    out_dir / split, split, plan, reader, encoder, bar, row_format
                )
    usage = _usage(cpu0, reader.first_doc_s, encoder.worker_peak_rss_mib)

    splits = {split: _finish_split(out_dir / split, split, plan, seq_len) for split, plan in plans.items()}
    if not slice_ix:
        for split, stats in splits.items():
            check_split_has_rows(split, stats, seq_len)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "convert",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": args,
        "tokenizer": tok_info.to_dict(),
        "seq_len": seq_len,
        "dtype": out_dtype,
        "columns": mds.mds_columns(out_dtype, seq_len),
        "doc_starts_empty_sentinel": seq_len,
        "corpus": {
            "inputs": args["inputs"],
            "documents": corpus_docs,
            "used_documents": n_docs,
            "val_docs": val_docs,
        },
        "slice": {
            "index": slice_ix[0],
            "count": slice_ix[1],
            "doc_range": list(_slice_range(n_docs, slice_ix)),
        }
        if slice_ix
        else None,
        "splits": splits,
    }
    _test_hook("before_manifest")
    write_json_atomic(out_dir / MANIFEST, manifest)
    state_path.unlink(missing_ok=True)
    if remote:
        _upload(out_dir, remote)
    return ConvertResult(
        manifest, location, str(out_dir), time.perf_counter() - t0, tokens_this_run, False, usage
    )


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process and its threads, of its children that have been waited for)."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def _usage(cpu0: tuple[float, float], first_doc_s: float | None, worker_peak_rss_mib: float) -> RunUsage:
    import resource

    parent, workers = _cpu_seconds()
    if (parent_rss := peak_rss_mib()) is None:  # not Linux: ru_maxrss (KiB; bytes on macOS)
        parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            2**20 if sys.platform == "darwin" else 1024
        )
    return RunUsage(
        parent_startup_cpu_s=cpu0[0],
        parent_cpu_s=parent - cpu0[0],
        workers_cpu_s=workers - cpu0[1],
        parent_peak_rss_mib=parent_rss,
        worker_peak_rss_mib=worker_peak_rss_mib,
        first_doc_s=first_doc_s,
    )


# ----------------------------------------------------------------------------- planning


@dataclass
class _SplitPlan:
    doc_range: tuple[int, int]
    parts: list[tuple[int, int]]


def _slice_range(n_docs: int, slice_ix: tuple[int, int] | None) -> tuple[int, int]:
    if slice_ix is None:
        return 0, n_docs
    i, n = slice_ix
    return i * n_docs // n, (i + 1) * n_docs // n


def _plan_splits(n_docs: int, val_docs: int, slice_ix, docs_per_part: int) -> dict[str, _SplitPlan]:
    """Document ranges of each split (within the slice) and of its parts; empty splits left out."""
    lo, hi = _slice_range(n_docs, slice_ix)
    plans = {}
    for split, (s, e) in (("train", (0, n_docs - val_docs)), ("val", (n_docs - val_docs, n_docs))):
        s, e = max(s, lo), min(e, hi)
        if s < e:
            parts = [(p, min(p + docs_per_part, e)) for p in range(s, e, docs_per_part)]
            plans[split] = _SplitPlan((s, e), parts)
    return plans


def _prepare_out_dir(out_dir: Path, args: dict, overwrite: bool) -> str:
    """'complete', 'resume' or 'fresh'; refuses an output made with other arguments."""
    for name, what in ((MANIFEST, "a finished"), (STATE, "an unfinished")):
        path = out_dir / name
        if not path.is_file():
            continue
        if overwrite:
            log.info("--overwrite: deleting %s", out_dir)
            shutil.rmtree(out_dir)
            return "fresh"
        diffs = diff_args(load_json(path).get("args", {}), args)
        if diffs:
            raise DataPrepError(
                f"{out_dir} holds {what} output made with different arguments:\n"
                + "\n".join(diffs)
                + "\npass --overwrite to delete it and start again, or choose another --out"
            )
        return "complete" if name == MANIFEST else "resume"
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataPrepError(
            f"{out_dir} exists and is not a data_prep output; refusing to write into it or delete it "
            "(choose an empty or new --out)"
        )
    return "fresh"


# ----------------------------------------------------------------------------- the work


class _Reader:
    """Documents of the corpus by range, as raw records (decoded by the workers)."""

    def __init__(
        self, sources: Sequence[Source], counts: Sequence[int], text_field: str, doc_sep: str | None
    ):
        self.sources, self.counts, self.text_field, self.doc_sep = sources, counts, text_field, doc_sep
        self.first_doc_s: float | None = None

    def batches(self, parts: Sequence[tuple[int, int]], first_part: int) -> Iterator[RecordBatch]:
        """Batches of the documents of `parts` (contiguous); a batch never spans two parts.

        Work per document only: no decoding, and local .jsonl and .txt documents are byte ranges
        (parquet documents row positions) that the workers read themselves.
        """
        records = iter_records(
            self.sources,
            self.counts,
            parts[0][0],
            parts[-1][1],
            text_field=self.text_field,
            doc_sep=self.doc_sep,
            spans=True,
        )
        for k, (s, e) in enumerate(parts, first_part):
            batch, source = RecordBatch(k, self.text_field), -1
            for _ in range(e - s):
                i, number, raw = next(records)
                if i != source:
                    source = i
                    batch.segments.append((len(batch.records), self.sources[i].path, self.sources[i].kind))
                batch.records.append(raw)
                batch.numbers.append(number)
                if isinstance(raw, RowRef):
                    batch.chars += raw.size
                    if not raw.last:  # a batch reads its row groups whole: end it at a group's end
                        continue
                elif isinstance(raw, tuple):
                    batch.chars += raw[1] - raw[0]
                elif raw is not None:
                    batch.chars += len(raw)
                if batch.chars >= BATCH_CHARS or len(batch.records) >= BATCH_DOCS:
                    yield self._first(batch)
                    batch, source = RecordBatch(k, self.text_field), -1
            if batch.records:
                yield self._first(batch)

    def _first(self, batch: RecordBatch) -> RecordBatch:
        if self.first_doc_s is None:
            self.first_doc_s = seconds_since_process_start()
        return batch


def _docs_todo(out_dir: Path, plans: dict[str, _SplitPlan]) -> int:
    """Documents in parts without a done-marker."""
    return sum(
        e - s
        for split, plan in plans.items()
        for k, (s, e) in enumerate(plan.parts)
        if not _marker_path(out_dir / split, k).is_file()
    )


def _progress_bar(out_dir: Path, plans: dict[str, _SplitPlan], todo: int, enabled: bool):
    """tqdm over the documents of the run, on stderr, starting at those already done."""
    from tqdm import tqdm

    total = sum(plan.doc_range[1] - plan.doc_range[0] for plan in plans.values())
    if todo < total:
        log.info("resuming %s: %s of %s documents already done", out_dir, f"{total - todo:,}", f"{total:,}")
    return tqdm(
        total=total, initial=total - todo, unit="doc", file=sys.stderr, disable=not enabled, smoothing=0.05
    )


def _marker_path(split_dir: Path, k: int) -> Path:
    return split_dir / f"part-{k:05d}.done.json"


def _part_dir(split_dir: Path, k: int) -> Path:
    return split_dir / f"part-{k:05d}"


@dataclass(frozen=True)
class _RowFormat:
    seq_len: int
    dtype: str
    compression: str | None
    size_limit: int


def _convert_split(
    split_dir: Path,
    split: str,
    plan: _SplitPlan,
    reader: _Reader,
    encoder: OrderedEncoder,
    bar,
    fmt: _RowFormat,
) -> int:
    """Write the parts of `split` that are not done yet; returns the tokens tokenized."""
    split_dir.mkdir(parents=True, exist_ok=True)
    first = 0
    while first < len(plan.parts) and _marker_path(split_dir, first).is_file():
        marker = load_json(_marker_path(split_dir, first))
        if tuple(marker["doc_range"]) != plan.parts[first]:
            raise DataPrepError(f"{_marker_path(split_dir, first)} does not match this run; pass --overwrite")
        first += 1
    # Whatever exists from the first unfinished part on is from a killed run: redo it.
    for path in split_dir.iterdir():
        m = re.fullmatch(r"part-(\d+)(\.done\.json)?", path.name)
        if m and path.is_dir() and int(m.group(1)) >= first:
            shutil.rmtree(path)
        elif m and int(m.group(1)) >= first:
            path.unlink()
    (split_dir / mds.INDEX).unlink(missing_ok=True)
    if first == len(plan.parts):
        return 0

    carry = load_json(_marker_path(split_dir, first - 1)) if first else {}
    packer = RowPacker(fmt.seq_len, fmt.dtype, carry.get("carry_tokens"), carry.get("carry_doc_starts"))
    todo = plan.parts[first:]
    encoded = encoder.map(reader.batches(todo, first))
    tokens_total = 0
    batch_delay = float(os.environ.get("DATA_PREP_TEST_BATCH_DELAY", 0))
    warned: set[str] = set()
    for k, (s, e) in enumerate(todo, first):
        part_dir = _part_dir(split_dir, k)
        writer = mds.ShardWriter(
            part_dir,
            dtype=fmt.dtype,
            seq_len=fmt.seq_len,
            compression=fmt.compression,
            size_limit=fmt.size_limit,
            submit=encoder.submit,
            max_pending=max(2, encoder.workers),
        )
        stats = dict.fromkeys(
            ("documents", "empty_documents_skipped", "invalid_utf8_documents", "tokens", "rows"), 0
        )
        covered = 0
        try:
            while covered < e - s:
                batch, enc = next(encoded)
                assert batch.part == k, "batches out of step with parts"
                rows, starts, counts = packer.add_flat(enc.tokens, enc.lengths)
                writer.write(rows, starts, counts)
                n_docs = len(batch.records)
                covered += n_docs
                stats["documents"] += n_docs - enc.n_empty
                stats["empty_documents_skipped"] += enc.n_empty
                stats["invalid_utf8_documents"] += len(enc.invalid)
                stats["tokens"] += len(enc.tokens)
                stats["rows"] += len(rows)
                _warn_invalid(batch, enc.invalid, warned)
                bar.update(n_docs)
                _test_hook(f"{split}:{k}:mid")
                if batch_delay:
                    time.sleep(batch_delay)
            index = writer.finish()
        except BaseException:
            writer.abort()
            raise
        mds.fsync_tree(part_dir)
        _test_hook(f"{split}:{k}:before_marker")
        marker = {
            "part": k,
            "doc_range": [s, e],
            **stats,
            "shards": len(index["shards"]),
            "bytes": sum(mds.stored_file(shard)["bytes"] for shard in index["shards"]),
            "carry_tokens": packer.carry_tokens.tolist(),
            "carry_doc_starts": packer.carry_doc_starts.tolist(),
        }
        write_json_atomic(_marker_path(split_dir, k), marker)
        _test_hook(f"{split}:{k}:after_marker")
        tokens_total += stats["tokens"]
    return tokens_total


def _warn_invalid(batch: RecordBatch, invalid: list[int], warned: set[str]) -> None:
    """Log the invalid-UTF-8 warning once per file, in this process (where the user's log goes)."""
    for i in invalid:
        start, path, _ = max(seg for seg in batch.segments if seg[0] <= i)
        if path not in warned:
            warned.add(path)
            warn_invalid_utf8(path, batch.numbers[i])


def _finish_split(split_dir: Path, split: str, plan: _SplitPlan, seq_len: int) -> dict:
    """Write the split's index.json over all parts and return its manifest entry (summed counts)."""
    markers = [load_json(_marker_path(split_dir, k)) for k in range(len(plan.parts))]
    children = []
    for k in range(len(plan.parts)):
        part_dir = _part_dir(split_dir, k)
        if not (part_dir / mds.INDEX).is_file():
            raise DataPrepError(
                f"{part_dir} is missing although marked done; pass --overwrite to start again"
            )
        children.append((part_dir.name, mds.read_index(part_dir)))
    mds.write_merged_index(split_dir, children)
    stats = {key: sum(m[key] for m in markers) for key in COUNT_KEYS if key != "dropped_tail_tokens"}
    stats["dropped_tail_tokens"] = len(markers[-1]["carry_tokens"])
    stats["doc_range"] = list(plan.doc_range)
    stats["parts"] = len(plan.parts)
    if stats["tokens"] != stats["rows"] * seq_len + stats["dropped_tail_tokens"]:
        raise AssertionError(f"{split}: token count does not add up: {stats}")
    return stats


# ----------------------------------------------------------------------------- upload


def _upload_pending(out_dir: Path, remote: str) -> bool:
    marker = out_dir / UPLOADED
    return not marker.is_file() or load_json(marker).get("remote") != remote


def _upload(out_dir: Path, remote: str) -> None:
    log.info("uploading %s to %s", out_dir, remote)
    mds.upload_tree(out_dir, remote)
    write_json_atomic(out_dir / UPLOADED, {"remote": remote})


def _test_hook(point: str) -> None:
    # Crash tests only: DATA_PREP_TEST_KILL_AT="train:2:mid" SIGKILLs this process at that point
    # ("<split>:<part>:mid|before_marker|after_marker" or "before_manifest").
    if os.environ.get("DATA_PREP_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
