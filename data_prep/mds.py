"""The MDS format of packed rows: the row contract, a folder's index, and reading and checking shards.

`streaming` imports torch and transformers (about 3-5 s), so it is imported inside the functions
that need it, never at module import. `convert` writes shards without it (`shard_writer`);
`open_writer` is Streaming's own writer, the slow reference.

Row format (a contract the training code depends on):
    tokens      "ndarray:<dtype>:<seq_len>"  1-D, exactly seq_len token ids; dtype one of
                                             manifest.TOKEN_DTYPES (uint16 or uint32)
    doc_starts  "ndarray:uint32"             sorted positions p in [0, seq_len) where a document
                                             begins in the row; [seq_len] when none does (MDS
                                             cannot store an empty array; see `doc_starts_column`)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep.manifest import INDEX, write_json_atomic

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
    uses `shard_writer.ShardWriter`, which writes the same shards.

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
