"""The MDS side: the column contract, shard writing/reading and index merging, and uploads.

Everything that touches `streaming` is here. `streaming` imports torch and transformers (about
3-5 s), so it is imported inside the functions that need it, never at module import; writing
needs no `streaming` at all (`ShardWriter` writes the MDS format itself).

Row format (a contract the training code depends on):
    tokens      "ndarray:<dtype>:<seq_len>"  1-D, exactly seq_len token ids; dtype uint16 or uint32
    doc_starts  "ndarray:uint32"             sorted positions p in [0, seq_len) where a document
                                             begins in the row; [seq_len] when none does (MDS
                                             cannot store an empty array; see `doc_starts_column`)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import INDEX, MANIFEST, write_json_atomic

SHARD_HASHES = ["sha1"]


def mds_columns(dtype: str, seq_len: int) -> dict[str, str]:
    """The MDS columns of a packed-row dataset."""
    return {"tokens": f"ndarray:{dtype}:{seq_len}", "doc_starts": "ndarray:uint32"}


def doc_starts_column(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """The stored form of a row's document starts: uint32, and [seq_len] for "no document starts here".

    Streaming's ndarray encoding refuses arrays with no element, and a row inside a long document
    has no start, so that case is stored as the one out-of-range value seq_len.
    """
    if len(starts) == 0:
        return np.array([seq_len], dtype=np.uint32)
    return starts.astype(np.uint32)


def doc_starts_from_column(column: np.ndarray, seq_len: int) -> np.ndarray:
    """Inverse of `doc_starts_column`: the (possibly empty) positions where documents begin."""
    return column[column < seq_len]


def open_writer(
    out_dir: str | os.PathLike, *, dtype: str, seq_len: int, compression: str | None, size_limit: int
):
    """Streaming's own MDSWriter for packed rows into the empty or missing folder `out_dir`: the
    slow, simple way (one call per row; imports `streaming`), for tests and small tools. `convert`
    uses `ShardWriter`, which writes the same shards.

    Write samples {"tokens": (seq_len,) dtype array, "doc_starts": `doc_starts_column(...)`}.
    """
    from streaming import MDSWriter

    return MDSWriter(
        out=str(out_dir),
        columns=mds_columns(dtype, seq_len),
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=size_limit,
    )


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
        self.entries: list[dict] = []
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
        first_start = np.concatenate([[0], np.cumsum(counts)])
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
    dtype = np.dtype(job.dtype)
    n = len(job.counts)
    sizes = sample_sizes(job.seq_len, dtype.itemsize, job.counts) - 4
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    offsets += 4 + 4 * (n + 1) + len(job.config_data)
    raw_bytes = int(offsets[-1])
    if raw_bytes >= 1 << 32:
        raise ValueError(f"shard of {raw_bytes} bytes: MDS offsets are uint32")
    raw_name = f"shard.{job.index:05}.mds"
    zip_name = None
    raw_hash, zip_hash = hashlib.sha1(), hashlib.sha1()
    if job.compression:
        import zstandard

        algo, _, level = job.compression.partition(":")
        if algo != "zstd":
            raise ValueError(f"unsupported compression {job.compression!r}")
        zip_name = f"{raw_name}.zstd"
        compressor = zstandard.ZstdCompressor(level=int(level or 3)).compressobj(size=raw_bytes)
    name = zip_name or raw_name
    tmp = os.path.join(job.folder, f".{name}.tmp-{os.getpid()}")
    written = 0
    with open(tmp, "wb") as out, open(job.rows_path, "rb") as rows_file:

        def emit(data: bytes) -> None:
            nonlocal written
            raw_hash.update(data)
            if zip_name:
                data = compressor.compress(data)
                zip_hash.update(data)
            out.write(data)
            written += len(data)

        emit(np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + job.config_data)
        first = np.concatenate([[0], np.cumsum(job.counts)])
        row_bytes = job.seq_len * dtype.itemsize
        sentinel = np.array([job.seq_len], np.uint32)
        for lo in range(0, n, ROWS_PER_CHUNK):
            hi = min(lo + ROWS_PER_CHUNK, n)
            rows = np.frombuffer(rows_file.read((hi - lo) * row_bytes), dtype).reshape(hi - lo, job.seq_len)
            emit(
                b"".join(
                    encode_row(
                        rows[r - lo], job.starts[first[r] : first[r + 1]] if job.counts[r] else sentinel
                    )
                    for r in range(lo, hi)
                )
            )
        if zip_name:
            data = compressor.flush()
            zip_hash.update(data)
            out.write(data)
            written += len(data)
        out.flush()
        os.fsync(out.fileno())
    if os.getppid() != job.parent_pid and job.parent_pid != os.getpid():
        os.unlink(tmp)  # the run that wanted this shard is gone; its rerun redoes the folder
        raise RuntimeError("parent process exited")
    os.replace(tmp, os.path.join(job.folder, name))
    os.unlink(job.rows_path)
    raw_info = {"basename": raw_name, "bytes": raw_bytes, "hashes": {"sha1": raw_hash.hexdigest()}}
    zip_info = (
        {"basename": zip_name, "bytes": written, "hashes": {"sha1": zip_hash.hexdigest()}}
        if zip_name
        else None
    )
    return {"samples": n, "raw_data": raw_info, "zip_data": zip_info}


def read_index(folder: str | os.PathLike) -> dict:
    """The parsed index.json of an MDS folder."""
    with open(Path(folder) / INDEX, encoding="utf-8") as f:
        return json.load(f)


def write_merged_index(out_dir: str | os.PathLike, children: Sequence[tuple[str, dict]]) -> None:
    """Write `out_dir/index.json` listing the shards of each (relative folder, index) in order.

    Same result as streaming's `merge_index`, but for nested folders and written atomically.
    """
    shards = []
    for prefix, index in children:
        for shard in index["shards"]:
            shard = json.loads(json.dumps(shard))  # deep copy
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{prefix}/{shard[key]['basename']}"
            shards.append(shard)
    write_json_atomic(Path(out_dir) / INDEX, {"version": 2, "shards": shards})


def stored_file(shard: dict) -> dict:
    """The index entry ({basename, bytes, hashes}) of the file a shard is stored as."""
    return shard.get("zip_data") or shard["raw_data"]


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder` to disk, so a marker written afterwards never outlives them."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class ShardError(Exception):
    """A shard file that does not match its index entry or the row format."""


def read_shard(folder: str | os.PathLike, shard: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Check one shard file against its index entry and decode it: (tokens per row, doc_starts column per row).

    Raises ShardError saying what is wrong (missing, size, hash, decompression, layout).
    """
    from streaming.base.compression import decompress
    from streaming.base.format.mds.encodings import mds_decode
    from streaming.base.hashing import get_hash

    info = stored_file(shard)
    path = Path(folder) / info["basename"]
    _check_file_size(path, info)
    data = path.read_bytes()
    _check_hashes(data, info, get_hash, "file")
    if shard.get("zip_data"):
        try:
            data = decompress(shard["compression"], data)
        except Exception as exc:  # zstd raises its own error types
            raise ShardError(f"cannot decompress ({exc})") from exc
        raw = shard["raw_data"]
        if len(data) != raw["bytes"]:
            raise ShardError(f"decompresses to {len(data)} bytes, the index says {raw['bytes']}")
        _check_hashes(data, raw, get_hash, "decompressed data")

    n = int(np.frombuffer(data, np.uint32, 1)[0])
    if n != shard["samples"]:
        raise ShardError(f"holds {n} samples, the index says {shard['samples']}")
    names, encodings = shard["column_names"], shard["column_encodings"]
    sizes = shard["column_sizes"]
    n_var = sum(s is None for s in sizes)
    tokens, doc_starts = [], []
    try:
        offsets = np.frombuffer(data, np.uint32, n + 1, offset=4)
        for i in range(n):
            sample = data[offsets[i] : offsets[i + 1]]
            var_sizes = iter(np.frombuffer(sample, np.uint32, n_var).tolist())
            pos = 4 * n_var
            row = {}
            for name, encoding, size in zip(names, encodings, sizes):
                size = next(var_sizes) if size is None else size
                row[name] = mds_decode(encoding, sample[pos : pos + size])
                pos += size
            tokens.append(row["tokens"])
            doc_starts.append(row["doc_starts"])
    except (ValueError, IndexError, KeyError) as exc:  # numpy and the decoders on malformed bytes
        raise ShardError(f"cannot decode sample {len(tokens)} ({exc})") from exc
    return tokens, doc_starts


def check_shard_file(folder: str | os.PathLike, shard: dict) -> None:
    """Without reading it, check that a shard's data is on disk with the size its index entry records.

    The file checked is the stored one (`stored_file`); a compressed shard may instead have only its
    decompressed file, as Streaming's cache keeps it. A decompressed copy beside a compressed shard is
    what Streaming reads, so its size is checked too. Raises ShardError (missing, or another size).
    """
    folder = Path(folder)
    info = stored_file(shard)
    if decompressed_copy(folder, shard) is not None:
        check_decompressed_copy(folder, shard, hashes=False)
        return
    _check_file_size(folder / info["basename"], info)


def decompressed_copy(folder: str | os.PathLike, shard: dict) -> Path | None:
    """The decompressed file Streaming keeps beside a compressed shard (and reads from then on), if any."""
    if not shard.get("zip_data"):
        return None
    path = Path(folder) / shard["raw_data"]["basename"]
    return path if path.is_file() else None


def check_decompressed_copy(folder: str | os.PathLike, shard: dict, *, hashes: bool = True) -> None:
    """Check a compressed shard's decompressed copy against the index's raw-data size (and hashes).

    Raises ShardError naming the copy and the fix: delete it, Streaming recreates it from the
    compressed file. A shard without a copy passes.
    """
    path = decompressed_copy(folder, shard)
    if path is None:
        return
    raw = shard["raw_data"]
    fix = f"delete it: Streaming recreates it from {shard['zip_data']['basename']}"
    size = path.stat().st_size
    if size != raw["bytes"]:
        raise ShardError(
            f"decompressed copy {path} has {size} bytes, the index says {raw['bytes']} (truncated or "
            f"replaced); {fix}"
        )
    if hashes:
        from streaming.base.hashing import get_hash

        data = path.read_bytes()
        for algo, expected in (raw.get("hashes") or {}).items():
            if get_hash(algo, data) != expected:
                raise ShardError(f"decompressed copy {path}: its {algo} hash does not match the index; {fix}")


def _check_file_size(path: Path, info: dict) -> None:
    if not path.is_file():
        raise ShardError("file is missing")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise ShardError(f"file has {size} bytes, the index says {info['bytes']} (truncated or replaced)")


def _check_hashes(data: bytes, info: dict, get_hash, what: str) -> None:
    for algo, expected in (info.get("hashes") or {}).items():
        if get_hash(algo, data) != expected:
            raise ShardError(f"{what} {algo} hash does not match the index")


def is_remote(uri: str) -> bool:
    """Whether `uri` names object storage (s3://, gs://, oci://, ...) rather than a local folder."""
    return urllib.parse.urlparse(uri).scheme != ""


def check_remote(uri: str) -> None:
    """Raise ValueError when Streaming has no uploader for the scheme of `uri`."""
    from streaming.base.storage.upload import UPLOADERS

    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in UPLOADERS:
        known = sorted(f"{s}://" for s in UPLOADERS if s and "/" not in s)
        raise ValueError(f"no uploader for {scheme}:// (Streaming supports {', '.join(known)})")


def upload_tree(local_dir: str | os.PathLike, remote: str, *, last: Sequence[str] = (MANIFEST,)) -> list[str]:
    """Upload every file under `local_dir` to `remote` with Streaming's CloudUploader.

    Files named in `last` go after all others, so a remote reader that sees the manifest sees
    complete shards. `remote` may also be a local folder (a stand-in for object storage).
    Returns the uploaded relative paths in upload order.
    """
    from streaming.base.storage.upload import CloudUploader

    files = upload_order(local_dir, last=last)
    uploader = CloudUploader.get((str(local_dir), remote), keep_local=True, exist_ok=True)
    for rel in files:
        if not is_remote(remote):  # LocalUploader copies into existing folders only
            os.makedirs(os.path.dirname(os.path.join(remote, rel)), exist_ok=True)
        uploader.upload_file(rel)
    return files


def upload_order(local_dir: str | os.PathLike, *, last: Sequence[str] = (MANIFEST,)) -> list[str]:
    """Relative paths of the files under `local_dir`: shards first, then indexes, then `last`.

    Hidden bookkeeping files (starting with '.') are not part of the dataset and are left out.
    """
    files = []
    for root, dirs, names in os.walk(local_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                files.append(os.path.relpath(os.path.join(root, name), local_dir))
    rank = {name: i for i, name in enumerate(last)}

    def key(rel: str) -> tuple:
        if rel in rank:
            return (2, rank[rel], "")
        if os.path.basename(rel) == INDEX:  # part indexes before the split index above them
            return (1, -rel.count(os.sep), rel)
        return (0, 0, rel)

    return sorted(files, key=key)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link `src` to `dst` (same file system), else copy it."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
