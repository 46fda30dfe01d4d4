"""Writing the parts of one split: its documents read in batches, tokenized by the workers, packed
into rows and written as shards, one folder per part; a done-marker after each part.

A part's marker records its counts and the carry (the tokens of the last, unfinished row and
their document starts) that the next part starts from, so rows never depend on where a run was
killed. A rerun finds the first part without a marker, deletes what exists from it on, and goes on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep import mds
from data_prep.batches import DocumentBatches, RecordBatch
from data_prep.encode import Encoded, OrderedEncoder
from data_prep.errors import DataPrepError
from data_prep.manifest import COUNT_KEYS, INDEX, load_json, write_json_atomic
from data_prep.packing import RowPacker
from data_prep.plan import SplitPlan, marker_path, part_dir
from data_prep.shard_writer import ShardWriter, fsync_tree
from data_prep.sources import warn_invalid_utf8

_PART_STATS = ("documents", "empty_documents_skipped", "invalid_utf8_documents", "tokens", "rows")


@dataclass(frozen=True)
class RowFormat:
    """How rows are stored: `seq_len` tokens of `dtype`, shards of `size_limit` bytes before
    `compression` (None: uncompressed)."""

    seq_len: int
    dtype: str
    compression: str | None
    size_limit: int


def write_split(
    split_dir: Path,
    split: str,
    plan: SplitPlan,
    reader: DocumentBatches,
    encoder: OrderedEncoder,
    bar,
    fmt: RowFormat,
) -> int:
    """Write the parts of `split` that are not done yet; returns the tokens tokenized."""
    first = _redo_from(split_dir, plan)
    if first == len(plan.parts):
        return 0
    carry = load_json(marker_path(split_dir, first - 1)) if first else {}
    packer = RowPacker(fmt.seq_len, fmt.dtype, carry.get("carry_tokens"), carry.get("carry_doc_starts"))
    todo = plan.parts[first:]
    encoded = encoder.map(reader.batches(todo, first))
    tokens_total = 0
    warned: set[str] = set()
    for k, (s, e) in enumerate(todo, first):
        folder = part_dir(split_dir, k)
        writer = ShardWriter(
            folder,
            dtype=fmt.dtype,
            seq_len=fmt.seq_len,
            compression=fmt.compression,
            size_limit=fmt.size_limit,
            submit=encoder.submit,
            max_pending=max(2, encoder.workers),
        )
        try:
            stats = _write_part(split, k, e - s, encoded, packer, writer, bar, warned)
            index = writer.finish()
        except BaseException:
            writer.abort()
            raise
        fsync_tree(folder)
        kill_point(f"{split}:{k}:before_marker")
        marker = {
            "part": k,
            "doc_range": [s, e],
            **stats,
            "shards": len(index["shards"]),
            "bytes": sum(mds.stored_file(shard)["bytes"] for shard in index["shards"]),
            "carry_tokens": packer.carry_tokens.tolist(),
            "carry_doc_starts": packer.carry_doc_starts.tolist(),
        }
        write_json_atomic(marker_path(split_dir, k), marker)
        kill_point(f"{split}:{k}:after_marker")
        tokens_total += stats["tokens"]
    return tokens_total


def _redo_from(split_dir: Path, plan: SplitPlan) -> int:
    """The first part of the split without a done-marker, after deleting what a killed run left of it
    and of the parts after it."""
    split_dir.mkdir(parents=True, exist_ok=True)
    first = 0
    while first < len(plan.parts) and marker_path(split_dir, first).is_file():
        marker = load_json(marker_path(split_dir, first))
        if tuple(marker["doc_range"]) != plan.parts[first]:
            raise DataPrepError(f"{marker_path(split_dir, first)} does not match this run; pass --overwrite")
        first += 1
    for path in split_dir.iterdir():
        m = re.fullmatch(r"part-(\d+)(\.done\.json)?", path.name)
        if m and path.is_dir() and int(m.group(1)) >= first:
            shutil.rmtree(path)
        elif m and int(m.group(1)) >= first:
            path.unlink()
    (split_dir / INDEX).unlink(missing_ok=True)
    return first


def _write_part(
    split: str,
    k: int,
    n_docs: int,
    encoded: Iterator[tuple[RecordBatch, Encoded]],
    packer: RowPacker,
    writer: ShardWriter,
    bar,
    warned: set[str],
) -> dict[str, int]:
    """Pack and write the next `n_docs` documents of `encoded` (part k of `split`); their counts."""
    batch_delay = float(os.environ.get("DATA_PREP_TEST_BATCH_DELAY", 0))
    stats = dict.fromkeys(_PART_STATS, 0)
    covered = 0
    while covered < n_docs:
        batch, enc = next(encoded)
        assert batch.part == k, "batches out of step with parts"
        rows, starts, counts = packer.add_flat(enc.tokens, enc.lengths)
        writer.write(rows, starts, counts)
        covered += len(batch.records)
        stats["documents"] += len(batch.records) - enc.n_empty
        stats["empty_documents_skipped"] += enc.n_empty
        stats["invalid_utf8_documents"] += len(enc.invalid)
        stats["tokens"] += len(enc.tokens)
        stats["rows"] += len(rows)
        _warn_invalid(batch, enc.invalid, warned)
        bar.update(len(batch.records))
        kill_point(f"{split}:{k}:mid")
        if batch_delay:
            time.sleep(batch_delay)
    return stats


def _warn_invalid(batch: RecordBatch, invalid: list[int], warned: set[str]) -> None:
    """Log the invalid-UTF-8 warning once per file, in this process (where the user's log goes)."""
    for i in invalid:
        start, path, _ = max(seg for seg in batch.segments if seg[0] <= i)
        if path not in warned:
            warned.add(path)
            warn_invalid_utf8(path, batch.numbers[i])


def finish_split(split_dir: Path, split: str, plan: SplitPlan, seq_len: int) -> dict:
    """Write the split's index.json over all parts and return its manifest entry (summed counts)."""
    markers = [load_json(marker_path(split_dir, k)) for k in range(len(plan.parts))]
    children = []
    for k in range(len(plan.parts)):
        folder = part_dir(split_dir, k)
        if not (folder / INDEX).is_file():
            raise DataPrepError(f"{folder} is missing although marked done; pass --overwrite to start again")
        children.append((folder.name, mds.read_index(folder)))
    mds.write_merged_index(split_dir, children)
    stats = {key: sum(m[key] for m in markers) for key in COUNT_KEYS if key != "dropped_tail_tokens"}
    stats["dropped_tail_tokens"] = len(markers[-1]["carry_tokens"])
    stats["doc_range"] = list(plan.doc_range)
    stats["parts"] = len(plan.parts)
    if stats["tokens"] != stats["rows"] * seq_len + stats["dropped_tail_tokens"]:
        raise AssertionError(f"{split}: token count does not add up: {stats}")
    return stats


def kill_point(point: str) -> None:
    """Crash tests only: SIGKILL this process here when DATA_PREP_TEST_KILL_AT names `point`
    ("<split>:<part>:mid|before_marker|after_marker" or "before_manifest", e.g. "train:2:mid")."""
    if os.environ.get("DATA_PREP_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
