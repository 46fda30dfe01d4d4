"""Writing packed rows as the MDS shards of a folder, without `streaming`, at the speed of the cores.

The parent appends rows to a temporary file per shard (`ShardWriter`); a worker encodes,
compresses, hashes and writes each finished shard (`write_shard`). The files are the ones
Streaming's MDSWriter writes for the same rows (see `mds` for the row contract).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import INDEX, write_json_atomic
from data_prep.mds import SHARD_HASHES, mds_columns
from data_prep.packing import start_bounds


def encode_row(tokens: np.ndarray, doc_starts: np.ndarray) -> bytes:
    """One packed row in MDS sample layout, byte for byte what MDSWriter.encode_sample produces.

    Layout: uint32 size of each variable-size column (doc_starts only), then the columns in
    name order: doc_starts as a dynamic-shape ndarray (one byte ndim<<2|shape-dtype code, the
    length, the uint32 values), then tokens as raw values (static dtype and shape).
    """
    n = len(doc_starts)
    code, shape_dtype = (0, np.uint8) if n < 1 << 8 else (1, np.uint16) if n < 1 << 16 else (2, np.uint32)
    starts = bytes([1 << 2 | code]) + np.array([n], shape_dtype).tobytes() + doc_starts.tobytes()
    return np.uint32(len(starts)).tobytes() + starts + tokens.tobytes()


def shard_config(dtype: str, seq_len: int, compression: str | None, size_limit: int) -> dict:
    """The writer settings an MDSWriter records in each shard and index entry, for packed rows."""
    columns = mds_columns(dtype, seq_len)
    names = sorted(columns)
    return {
        "version": 2,
        "format": "mds",
        "compression": compression,
        "hashes": SHARD_HASHES,
        "size_limit": size_limit,
        "column_names": names,
        "column_encodings": [columns[name] for name in names],
        "column_sizes": [
            None if name == "doc_starts" else seq_len * np.dtype(dtype).itemsize for name in names
        ],
    }


def sample_sizes(seq_len: int, itemsize: int, counts: np.ndarray) -> np.ndarray:
    """Bytes of each packed row in a shard (its `encode_row` plus its 4-byte offset), from the
    number of document starts of each row (0 is stored as the one sentinel value)."""
    stored = np.maximum(counts, 1)
    shape_bytes = np.where(stored < 1 << 8, 1, np.where(stored < 1 << 16, 2, 4))
    return 4 + 1 + shape_bytes + 4 * stored + seq_len * itemsize + 4


class ShardWriter:
    """Writes packed rows as the MDS shards of one folder, cut where MDSWriter would cut them.

    The parent process only appends each row's tokens to a temporary file per shard (one write
    per call, no work per row); a finished shard is encoded, compressed, hashed and written by
    `write_shard`, run through `submit` (a worker pool's, so that this scales with the cores).
    Memory stays bounded by a few rows whatever the shard size. `finish` waits for the shards and
    writes the folder's index.json. Unlike MDSWriter, no empty shard is ever written (MDSWriter
    writes one when the first row alone exceeds the size limit).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        dtype: str,
        seq_len: int,
        compression: str | None,
        size_limit: int,
        submit,
        max_pending: int = 4,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.seq_len, self.dtype, self.compression = seq_len, np.dtype(dtype), compression
        self.size_limit = size_limit
        self.config = shard_config(dtype, seq_len, compression, size_limit)
        self.config_data = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.submit, self.max_pending = submit, max_pending
        self.futures: list[Future] = []
        self._file = None
        self._open_shard()

    def _open_shard(self) -> None:
        self.n_samples = 0
        self.size = 8 + len(self.config_data)  # sample count, end offset, config: as MDSWriter counts
        self.counts: list[np.ndarray] = []
        self.starts: list[np.ndarray] = []
        self.rows_path = self.out_dir / f".shard.{len(self.futures):05}.rows"
        self._file = open(self.rows_path, "wb")

    def write(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        """Append rows (n, seq_len); `starts`/`counts` as from `RowPacker.add_flat`."""
        sizes = sample_sizes(self.seq_len, self.dtype.itemsize, counts)
        cum = np.cumsum(sizes)
        first_start = start_bounds(counts)
        pos = 0
        while pos < len(rows):
            before = int(cum[pos - 1]) if pos else 0
            end = int(np.searchsorted(cum, before + self.size_limit - self.size, side="right"))
            if end == pos:  # the next row does not fit
                if self.n_samples:
                    self._flush()
                    continue
                end = pos + 1  # a row bigger than the limit gets a shard of its own
            self._file.write(memoryview(np.ascontiguousarray(rows[pos:end])).cast("B"))
            self.counts.append(counts[pos:end])
            self.starts.append(starts[first_start[pos] : first_start[end]])
            self.n_samples += end - pos
            self.size += int(cum[end - 1]) - before
            pos = end

    def _flush(self) -> None:
        self._file.close()
        k = len(self.futures)
        job = ShardJob(
            folder=str(self.out_dir),
            index=k,
            rows_path=str(self.rows_path),
            counts=np.concatenate(self.counts),
            starts=np.concatenate(self.starts).astype(np.uint32),
            seq_len=self.seq_len,
            dtype=self.dtype.name,
            compression=self.compression,
            config_data=self.config_data,
            parent_pid=os.getpid(),
        )
        self.futures.append(self.submit(write_shard, job))
        # Bounded: a slow disk must not let finished shards pile up.
        while sum(not f.done() for f in self.futures) > self.max_pending:
            next(f for f in self.futures if not f.done()).result()
        self._open_shard()

    def finish(self) -> dict:
        """Write the last shard, wait for all, write index.json; returns the index."""
        if self.n_samples:
            self._flush()
        self._file.close()
        self.rows_path.unlink(missing_ok=True)
        shards = []
        for future in self.futures:
            entry = future.result()
            shards.append({**self.config, **entry})
        index = {"version": 2, "shards": shards}
        write_json_atomic(self.out_dir / INDEX, index)
        return index

    def abort(self) -> None:
        """Close the temporary file (after an error); the folder is redone by a rerun."""
        if self._file is not None:
            self._file.close()


@dataclass
class ShardJob:
    """What `write_shard` needs: the rows' temporary file and the document starts of its rows."""

    folder: str
    index: int
    rows_path: str
    counts: np.ndarray  # document starts per row
    starts: np.ndarray  # uint32, all rows' starts concatenated
    seq_len: int
    dtype: str
    compression: str | None
    config_data: bytes
    parent_pid: int


ROWS_PER_CHUNK = 1024


def write_shard(job: ShardJob) -> dict:
    """Encode, compress and hash one shard from its rows file, streaming (bounded memory), write it
    under its final name, and return its index entry (samples, raw_data, zip_data).

    The file is the one MDSWriter would write for the same rows (MDS header, config, `encode_row`
    samples); the compressed file decompresses to it (zstd, streamed: not necessarily the same
    compressed bytes).
    """
    n = len(job.counts)
    offsets = _sample_offsets(job)
    raw_bytes = int(offsets[-1])
    if raw_bytes >= 1 << 32:
        raise ValueError(f"shard of {raw_bytes} bytes: MDS offsets are uint32")
    raw_name = f"shard.{job.index:05}.mds"
    zip_name = f"{raw_name}.zstd" if job.compression else None
    compressor = _compressor(job.compression, raw_bytes) if job.compression else None
    name = zip_name or raw_name
    tmp = os.path.join(job.folder, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as out, open(job.rows_path, "rb") as rows_file:
        sink = _HashingSink(out, compressor)
        sink.write(np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + job.config_data)
        for data in _encoded_rows(job, rows_file):
            sink.write(data)
        sink.close()
        out.flush()
        os.fsync(out.fileno())
    if os.getppid() != job.parent_pid and job.parent_pid != os.getpid():
        os.unlink(tmp)  # the run that wanted this shard is gone; its rerun redoes the folder
        raise RuntimeError("parent process exited")
    os.replace(tmp, os.path.join(job.folder, name))
    os.unlink(job.rows_path)
    raw_info = {"basename": raw_name, "bytes": raw_bytes, "hashes": {"sha1": sink.raw_hash.hexdigest()}}
    zip_info = (
        {"basename": zip_name, "bytes": sink.written, "hashes": {"sha1": sink.zip_hash.hexdigest()}}
        if zip_name
        else None
    )
    return {"samples": n, "raw_data": raw_info, "zip_data": zip_info}


def _sample_offsets(job: ShardJob) -> np.ndarray:
    """(n + 1,) int64: where each sample of the shard begins in the raw file, and where the last ends."""
    n = len(job.counts)
    sizes = sample_sizes(job.seq_len, np.dtype(job.dtype).itemsize, job.counts) - 4
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    offsets += 4 + 4 * (n + 1) + len(job.config_data)
    return offsets


def _compressor(compression: str, raw_bytes: int):
    import zstandard

    algo, _, level = compression.partition(":")
    if algo != "zstd":
        raise ValueError(f"unsupported compression {compression!r}")
    return zstandard.ZstdCompressor(level=int(level or 3)).compressobj(size=raw_bytes)


class _HashingSink:
    """Writes a shard's raw bytes to `out`, through `compressor` when there is one, hashing the raw
    bytes and the bytes written; `written` counts the latter."""

    def __init__(self, out, compressor):
        self.out, self.compressor, self.written = out, compressor, 0
        self.raw_hash, self.zip_hash = hashlib.sha1(), hashlib.sha1()

    def write(self, data: bytes) -> None:
        self.raw_hash.update(data)
        if self.compressor is not None:
            data = self.compressor.compress(data)
            self.zip_hash.update(data)
        self._put(data)

    def close(self) -> None:
        if self.compressor is not None:
            data = self.compressor.flush()
            self.zip_hash.update(data)
            self._put(data)

    def _put(self, data: bytes) -> None:
        self.out.write(data)
        self.written += len(data)


def _encoded_rows(job: ShardJob, rows_file) -> Iterator[bytes]:
    """The samples of the shard (`encode_row`), ROWS_PER_CHUNK rows at a time, read from `rows_file`."""
    dtype = np.dtype(job.dtype)
    n = len(job.counts)
    first = start_bounds(job.counts)
    row_bytes = job.seq_len * dtype.itemsize
    sentinel = np.array([job.seq_len], np.uint32)
    for lo in range(0, n, ROWS_PER_CHUNK):
        hi = min(lo + ROWS_PER_CHUNK, n)
        rows = np.frombuffer(rows_file.read((hi - lo) * row_bytes), dtype).reshape(hi - lo, job.seq_len)
        yield b"".join(
            encode_row(rows[r - lo], job.starts[first[r] : first[r + 1]] if job.counts[r] else sentinel)
            for r in range(lo, hi)
        )


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder` to disk, so a marker written afterwards never outlives them."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
