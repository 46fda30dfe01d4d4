"""The file names of an output folder, its manifest (what the training code reads), and small
JSON file helpers.

A data_prep output folder holds:
    manifest.json      written last, atomically, only when everything is complete
    in_progress.json   while a convert runs (its arguments), removed when the manifest is written
    train/, val/       one MDS dataset each (index.json + part-XXXXX/ shard folders)
A convert with --slice i/n writes such a folder as slice-i-of-n/ inside its --out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.errors import DataPrepError

MANIFEST = "manifest.json"
STATE = "in_progress.json"
INDEX = "index.json"  # an MDS folder's list of shards (Streaming's name)
SLICE_GLOB = "slice-*-of-*"  # the folders of `slice_dirname`
FORMAT = "bd3-data-prep-mds"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# The dtypes a row's tokens may be stored in ("dtype"), each with the number of token ids it can hold.
TOKEN_DTYPES = {"uint16": 1 << 16, "uint32": 1 << 32}
# Per-split counts; a merged output sums them over its inputs.
COUNT_KEYS = (
    "documents",
    "tokens",
    "rows",
    "dropped_tail_tokens",
    "shards",
    "bytes",
    "invalid_utf8_documents",
    "empty_documents_skipped",
)


def slice_dirname(i: int, n: int) -> str:
    """The folder of slice i of n inside an output folder."""
    return f"slice-{i}-of-{n}"


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a finished data_prep output, as a plain dict.

    `folder` is the output folder, or one of its split folders (train/, val/). Keys the
    training code needs: "seq_len", "dtype", "columns", "tokenizer" (vocab_size, eos_id, bos_id,
    sha256), "splits" (per split: rows, tokens, documents, ...). Raises DataPrepError when the
    folder is not a finished output.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file() and (folder / INDEX).is_file() and (folder.parent / MANIFEST).is_file():
        path = folder.parent / MANIFEST  # a split folder of a finished output
    if not path.is_file():
        if (folder / STATE).is_file():
            raise DataPrepError(
                f"{folder} is an incomplete data_prep output (a convert started but did not finish): "
                "rerun the same `python -m data_prep convert` command to finish it"
            )
        if any(folder.glob(SLICE_GLOB)):
            raise DataPrepError(
                f"{folder} holds slices, not a dataset: combine them with `python -m data_prep merge {folder} --out OUT`"
            )
        raise DataPrepError(
            f"{folder} is not a finished data_prep output (no {MANIFEST}): run `python -m data_prep convert ... --out {folder}`"
        )
    manifest = load_json(path)
    if manifest.get("format") != FORMAT:
        raise DataPrepError(f"{path} is not a data_prep manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DataPrepError(
            f"{path} has format version {manifest['format_version']}; this data_prep reads up to {FORMAT_VERSION}"
        )
    return manifest


def check_split_has_rows(split: str, stats: dict, seq_len: int) -> None:
    """Refuse to finish an output whose split has no row to train or evaluate on."""
    if stats["documents"] == 0:
        raise DataPrepError(
            f"split {split} has no non-empty document ({stats['empty_documents_skipped']:,} empty ones skipped)"
        )
    if stats["rows"] == 0:
        raise DataPrepError(
            f"split {split} has {stats['tokens']:,} tokens, less than one row of --seq-len {seq_len}: "
            "give it more documents (--val-docs) or lower --seq-len"
        )


def load_json(path: str | os.PathLike) -> dict:
    """Parse a JSON file written by data_prep; a clear error when it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataPrepError(f"cannot read {path}: {exc}") from exc


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON so that a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def diff_args(existing: dict, requested: dict) -> list[str]:
    """Lines naming each argument that differs: '  seq_len: existing 128, requested 256'."""
    lines = []
    for key in sorted(set(existing) | set(requested)):
        old, new = existing.get(key), requested.get(key)
        if old != new:
            if isinstance(old, list) and isinstance(new, list) and len(old) + len(new) > 6:
                old, new = f"{len(old)} items", f"{len(new)} items (differing)"
            lines.append(f"  {key}: existing {old!r}, requested {new!r}")
    return lines


def format_size(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_summary(
    manifest: dict, *, location: str, elapsed_s: float | None = None, tokens_this_run: int = 0
) -> str:
    """The one-screen end-of-run summary: per split docs, tokens, rows, dropped tokens, size."""
    header = (
        f"{'split':<6} {'docs':>12} {'tokens':>15} {'rows':>12} {'dropped':>9} {'shards':>7} {'size':>11}"
    )
    lines = [f"data_prep output: {location}", header, "-" * len(header)]
    total_bytes = 0
    for split, s in manifest["splits"].items():
        total_bytes += s["bytes"]
        lines.append(
            f"{split:<6} {s['documents']:>12,} {s['tokens']:>15,} {s['rows']:>12,} "
            f"{s['dropped_tail_tokens']:>9,} {s['shards']:>7,} {format_size(s['bytes']):>11}"
        )
        notes = []
        if s["empty_documents_skipped"]:
            notes.append(f"{s['empty_documents_skipped']:,} empty documents skipped")
        if s["invalid_utf8_documents"]:
            notes.append(f"{s['invalid_utf8_documents']:,} documents with invalid UTF-8 (replaced)")
        if notes:
            lines.append(f"{'':<6} ({'; '.join(notes)})")
    tok = manifest["tokenizer"]
    lines.append(
        f"seq_len {manifest['seq_len']}, dtype {manifest['dtype']}, vocab {tok['vocab_size']:,}, "
        f"eos {tok['eos_token']!r}={tok['eos_id']}, total {format_size(total_bytes)}"
    )
    if elapsed_s is None:
        return "\n".join(lines)
    rate = tokens_this_run / elapsed_s if elapsed_s > 0 else 0.0
    lines.append(f"tokenized {tokens_this_run:,} tokens in this run, {elapsed_s:.1f} s, {rate:,.0f} tokens/s")
    return "\n".join(lines)
