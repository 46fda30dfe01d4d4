"""verify: re-read every shard of a finished output and check it against its index and manifest."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep import mds
from data_prep.errors import DataPrepError
from data_prep.manifest import INDEX, MANIFEST, read_manifest
from data_prep.remote import check_access, is_remote

REWRITE = (
    "re-run the data_prep convert command that wrote this folder with --overwrite (or copy the folder again)"
)


@dataclass
class VerifyReport:
    """Result of `verify`: `ok` is False when `errors` is not empty."""

    folder: str
    errors: list[str] = field(default_factory=list)
    splits: dict[str, dict] = field(default_factory=dict)  # per split: rows, shards, bytes read

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """One line: OK/FAILED, and per split the rows and shards that were read."""
        parts = [f"{split} {s['rows']:,} rows in {s['shards']:,} shards" for split, s in self.splits.items()]
        status = "OK" if self.ok else f"FAILED ({len(self.errors)} problems)"
        return f"{status} {self.folder}: {'; '.join(parts)}"


def verify(folder: str | os.PathLike, *, max_errors: int = 50) -> VerifyReport:
    """Check a finished data_prep output; the report lists each problem with its split and shard.

    Checks: every shard listed in each split's index exists with the recorded size and hashes and
    decodes; a decompressed copy that Streaming left beside a compressed shard (and reads instead of
    it) has the raw-data size and hashes of the index; every row has tokens of shape (seq_len,) and
    the manifest's dtype, ids < vocab size, doc_starts sorted, < seq_len and each preceded by an EOS;
    per split, the rows, shards and bytes match the manifest and rows * seq_len +
    dropped_tail_tokens == tokens.
    `folder` may be a remote URI (s3://, gs://, ...): its manifest, indexes and shards are downloaded
    into a temporary folder first and checked the same way.
    Raises DataPrepError when `folder` is not a finished output.
    """
    if is_remote(str(folder)):
        return _verify_remote(str(folder), max_errors=max_errors)
    folder = Path(folder)
    manifest = read_manifest(folder)
    report = VerifyReport(str(folder))

    def problem(message: str) -> None:
        if len(report.errors) < max_errors:
            report.errors.append(message)
        elif len(report.errors) == max_errors:
            report.errors.append("... more problems not shown")

    for split, m in manifest["splits"].items():
        seen = report.splits[split] = {"rows": 0, "shards": 0, "bytes": 0}
        if _verify_shards(folder / split, split, manifest, seen, problem):
            _check_counts(split, m, seen, manifest["seq_len"], problem)
    return report


def _verify_shards(split_dir: Path, split: str, manifest: dict, seen: dict, problem) -> bool:
    """Check every shard the split's index lists and every row in it, counting into `seen`; False
    when the index cannot be read."""
    seq_len, dtype = manifest["seq_len"], np.dtype(manifest["dtype"])
    expected_columns = manifest["columns"]
    try:
        index = mds.read_index(split_dir)
    except (OSError, ValueError) as exc:
        problem(f"{split}: cannot read {split_dir / INDEX}: {exc}")
        return False
    for shard in index["shards"]:
        name = mds.stored_file(shard)["basename"]
        where = f"{split}: shard {split_dir / name}"
        seen["shards"] += 1
        seen["bytes"] += mds.stored_file(shard)["bytes"]
        columns = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        if columns != expected_columns:
            problem(f"{where}: columns {columns}, the manifest says {expected_columns}")
            continue
        try:
            mds.check_decompressed_copy(split_dir, shard)
        except mds.ShardError as exc:
            problem(f"{split}: {exc}")
        try:
            tokens, doc_starts = mds.read_shard(split_dir, shard)
        except mds.ShardError as exc:
            problem(f"{where}: {exc}; {REWRITE}")
            continue
        seen["rows"] += len(tokens)
        for i, (row, column) in enumerate(zip(tokens, doc_starts)):
            message = _check_row(row, column, seq_len, dtype, manifest["tokenizer"])
            if message:
                problem(f"{where}: row {i}: {message}")
    return True


def _check_counts(split: str, m: dict, seen: dict, seq_len: int, problem) -> None:
    """The split's rows, shards and bytes read (`seen`) against its manifest entry `m`."""
    if seen["shards"] != m["shards"] or seen["bytes"] != m["bytes"]:
        problem(
            f"{split}: the index lists {seen['shards']} shards of {seen['bytes']:,} bytes, "
            f"the manifest says {m['shards']} shards of {m['bytes']:,} bytes"
        )
    if seen["rows"] != m["rows"]:
        problem(f"{split}: the shards hold {seen['rows']:,} rows, the manifest says {m['rows']:,}")
    if m["rows"] * seq_len + m["dropped_tail_tokens"] != m["tokens"]:
        problem(
            f"{split}: manifest counts do not add up: rows {m['rows']:,} * seq_len {seq_len} + "
            f"dropped {m['dropped_tail_tokens']:,} != tokens {m['tokens']:,}"
        )


def _verify_remote(uri: str, *, max_errors: int) -> VerifyReport:
    with tempfile.TemporaryDirectory(prefix="data_prep-verify-") as tmp:
        download_output(uri, tmp)
        report = verify(tmp, max_errors=max_errors)
    report.folder = uri.rstrip("/")
    report.errors = [e.replace(tmp, report.folder) for e in report.errors]
    return report


def download_output(uri: str, local: str | os.PathLike) -> None:
    """Download the manifest, each split's index and every shard it lists from `uri` into `local`.

    A file the remote copy lacks is skipped (`verify` of `local` then names it). Raises
    DataPrepError when `uri` holds no manifest (not a finished output) or cannot be read.
    """
    from streaming.base.storage import CloudDownloader

    uri = uri.rstrip("/")
    check_access(uri)
    downloader = CloudDownloader.get(uri)  # one client for every file

    def fetch(rel: str) -> bool:
        try:
            downloader.download(f"{uri}/{rel}", os.path.join(local, rel))
        except Exception as exc:
            if is_missing_object(exc):
                return False
            raise
        return True

    try:
        if not fetch(MANIFEST):
            raise DataPrepError(f"{uri} is not a finished data_prep output (no {MANIFEST})")
        for split in read_manifest(local)["splits"]:
            if fetch(f"{split}/{INDEX}"):
                for shard in mds.read_index(Path(local) / split)["shards"]:
                    fetch(f"{split}/{mds.stored_file(shard)['basename']}")
    except DataPrepError:
        raise
    except Exception as exc:  # credentials, bucket, network: one line naming the cause
        raise DataPrepError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        downloader.clean_up()


def is_missing_object(exc: BaseException) -> bool:
    """Whether a Streaming download error means "no such object" (not a bucket, credential or network error)."""
    if isinstance(exc, FileNotFoundError):
        return True
    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey")


def _check_row(row: np.ndarray, column: np.ndarray, seq_len: int, dtype: np.dtype, tok: dict) -> str | None:
    """What is wrong with one row, or None."""
    if row.shape != (seq_len,) or row.dtype != dtype:
        return f"tokens have shape {row.shape} and dtype {row.dtype}, expected ({seq_len},) {dtype}"
    if int(row.max()) >= tok["vocab_size"]:
        return f"token id {int(row.max())} >= vocab size {tok['vocab_size']}"
    if column.ndim != 1 or column.dtype != np.uint32:
        return f"doc_starts has shape {column.shape} and dtype {column.dtype}, expected 1-D uint32"
    starts = mds.doc_starts_from_column(column, seq_len)
    if len(starts) != len(column) and not (len(column) == 1 and column[0] == seq_len):
        return f"doc_starts {column.tolist()} has positions >= seq_len {seq_len}"
    if np.any(np.diff(starts.astype(np.int64)) <= 0):
        return f"doc_starts {starts.tolist()} are not strictly increasing"
    inner = starts[starts > 0].astype(np.int64)
    if np.any(row[inner - 1] != tok["eos_id"]):
        return f"a document start in {starts.tolist()} does not follow an EOS ({tok['eos_id']})"
    if tok.get("bos_id") is not None and np.any(row[starts.astype(np.int64)] != tok["bos_id"]):
        return f"a document start in {starts.tolist()} is not a BOS ({tok['bos_id']})"
    return None
