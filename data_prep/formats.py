"""Reading one input file of each format: its documents counted, listed from any document on, decoded.

What a document is:
- .txt: the whole file, or with `doc_sep` each piece between separators that has a non-space
  character (runs of separators make no documents).
- .jsonl / .jsonl.zst: each non-blank line, a JSON object whose `text_field` is the text.
- .parquet: each row's `text_field`.
Bytes that are not UTF-8 are decoded with U+FFFD replacement and the document is flagged. An
empty text is still a document (the caller skips and counts it).

A document can be listed without reading its text: as its byte range in a local .jsonl or .txt
file (`read_spans`), or as its position in a parquet file with small row groups (`RowRef`,
`read_rows`), so that whoever tokenizes it reads it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import IO, NamedTuple, Protocol

from data_prep.errors import DataPrepError


class Source(Protocol):
    """What the readers need of an input file (``data_prep.sources.Source`` is one): its path, its
    kind ("txt", "jsonl", "jsonl.zst", "parquet") and its raw bytes. A protocol, so that the readers
    do not import the module that lists the files."""

    path: str
    kind: str

    def open(self) -> IO[bytes]: ...


_READ_CHUNK = 1 << 24
# Parquet documents are handed over by position (RowRef) only in files whose row groups hold at
# most this much text: each batch reads its row groups whole.
PARQUET_REF_GROUP_BYTES = 1 << 23


def count(source: Source, text_field: str, doc_sep: str | None) -> int:
    """Number of documents in `source` (see the module docstring); raises OSError when unreadable."""
    if source.kind == "parquet":
        with source.open() as f:
            return _parquet_file(source, f, text_field).metadata.num_rows
    if source.kind == "txt":
        if doc_sep is None:
            return 1
        with source.open() as f:
            return sum(1 for _ in _txt_pieces(f, doc_sep))
    with _open_jsonl(source) as f:
        n = 0
        for lineno, (start, end, buf, base) in enumerate(_spans(f, b"\n"), 1):
            if not _blank(buf, start - base, end - base):
                if n == 0:  # fail early, before hours of work, on a wrong --text-field
                    _jsonl_text(source.path, lineno, bytes(buf[start - base : end - base]), text_field)
                n += 1
        return n


def records(
    source: Source, skip: int, text_field: str, doc_sep: str | None, spans: bool
) -> Iterator[tuple[int, bytes | tuple[int, int] | RowRef | None]]:
    """(number, raw record) of the documents of `source` from its document `skip` on (see
    `sources.iter_records`, which documents `spans`)."""
    if source.kind == "parquet":
        return _iter_parquet(source, skip, text_field, spans)
    if source.kind == "txt":
        return _iter_txt(source, skip, doc_sep, spans and not source.is_hub)
    return _iter_jsonl(source, skip, spans and source.kind == "jsonl" and not source.is_hub)


def decode_record(
    kind: str, raw: bytes | str | None, text_field: str, path: str, number: int
) -> tuple[str, bool]:
    """(text, had_invalid_utf8) of a raw record of a `kind` file (see `sources.iter_records`)."""
    if kind in ("jsonl", "jsonl.zst"):
        return _jsonl_text(path, number, raw, text_field)
    if raw is None:
        return "", False
    if isinstance(raw, str):
        return raw, False
    return _decode(raw)


def read_spans(path: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (start, end) range of a local file, ranges in file order (one read)."""
    lo, hi = spans[0][0], spans[-1][1]
    with open(path, "rb") as f:
        f.seek(lo)
        data = f.read(hi - lo)
    return [data[a - lo : b - lo] for a, b in spans]


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _txt_pieces(f: IO[bytes], doc_sep: str) -> Iterator[tuple[int, int, bytearray, int]]:
    """As `_spans`: the pieces of the file between separators that hold a non-space byte."""
    for start, end, buf, base in _spans(f, doc_sep.encode("utf-8")):
        if not _blank(buf, start - base, end - base):
            yield start, end, buf, base


def _iter_txt(
    source: Source, skip: int, doc_sep: str | None, spans: bool
) -> Iterator[tuple[int, bytes | tuple[int, int]]]:
    if doc_sep is None:
        if skip == 0:
            if spans:
                yield 0, (0, os.path.getsize(source.path))
            else:
                with source.open() as f:
                    yield 0, f.read()
        return
    with source.open() as f:
        for i, (start, end, buf, base) in enumerate(_txt_pieces(f, doc_sep)):
            if i >= skip:
                yield i, (start, end) if spans else bytes(buf[start - base : end - base])


def _open_jsonl(source: Source) -> IO[bytes]:
    raw = source.open()
    if source.kind == "jsonl.zst":
        import zstandard

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        )
    return raw


def _jsonl_text(path: str, lineno: int, line: bytes, text_field: str) -> tuple[str, bool]:
    line_text, invalid = _decode(line)
    try:
        record = json.loads(line_text)
    except json.JSONDecodeError as exc:
        raise DataPrepError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise DataPrepError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise DataPrepError(
            f"{path}:{lineno}: no field {text_field!r} (fields present: {sorted(record)}); set --text-field"
        )
    text = record[text_field]
    if text is None:
        return "", invalid
    if not isinstance(text, str):
        raise DataPrepError(
            f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string"
        )
    # JSON escapes can encode lone surrogates, which are not UTF-8 and which the tokenizer rejects.
    if "\\ud" in line_text or "\\uD" in line_text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
            invalid = True
    return text, invalid


def _spans(f: IO[bytes], sep: bytes) -> Iterator[tuple[int, int, bytearray, int]]:
    """(start, end, buf, base) for every piece of `f` between separators `sep` (a line, for
    b"\n"): its byte range in the file, found in `buf`, which holds the file from offset `base`
    (valid until the next piece).

    One reusable buffer and `find`: no copy of the text, which matters because the parent
    process scans the whole corpus. The caller copies a piece out only if it wants its bytes.
    """
    try:  # no bigger than the file: many small files are common
        size = min(_READ_CHUNK, os.fstat(f.fileno()).st_size + 1)
    except (OSError, ValueError, AttributeError):  # a stream (decompressed, remote) has no size
        size = _READ_CHUNK
    buf = bytearray(max(size, 1))
    base = pos = 0
    n = f.readinto(buf)
    while n:
        found = buf.find(sep, pos, n)
        if found >= 0:
            yield base + pos, base + found, buf, base
            pos = found + len(sep)
            continue
        rest = n - pos  # a partial piece (maybe ending in part of a separator): to the front
        if rest == len(buf):
            buf.extend(bytes(len(buf)))  # a piece longer than the buffer
        buf[:rest] = buf[pos:n]
        base += pos
        with memoryview(buf) as view:
            got = f.readinto(view[rest:])
        if not got:
            if rest:
                yield base, base + rest, buf, base
            return
        n, pos = rest + got, 0


_SPACE = b" \t\n\r\x0b\x0c"  # what bytes.isspace() and bytes.strip() count as space


def _blank(buf: bytearray, start: int, end: int) -> bool:
    # Nearly every piece starts with a non-space byte ("{" in jsonl): no copy of it then.
    return start == end or (buf[start] in _SPACE and buf[start:end].isspace())


def _iter_jsonl(source: Source, skip: int, spans: bool) -> Iterator[tuple[int, bytes | tuple[int, int]]]:
    with _open_jsonl(source) as f:
        seen = 0
        for lineno, (start, end, buf, base) in enumerate(_spans(f, b"\n"), 1):
            if _blank(buf, start - base, end - base):
                continue
            seen += 1
            if seen > skip:
                yield lineno, (start, end) if spans else bytes(buf[start - base : end - base])


def _parquet_file(source: Source, f: IO[bytes], text_field: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends on a corrupt file
        raise DataPrepError(f"{source.path}: not a readable parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataPrepError(
            f"{source.path}: no column {text_field!r} (columns present: {names}); set --text-field"
        )
    return pf


class RowRef(NamedTuple):
    """A parquet document by position, for whoever tokenizes it to read (see `read_rows`)."""

    group: int  # row group
    row: int  # row within the row group
    size: int  # estimated bytes: the row group's uncompressed text column over its rows
    last: bool  # the last row of its row group


def read_rows(source: Source, text_field: str, refs: Sequence[RowRef]) -> list[bytes | None]:
    """The raw values of `refs` (in file order) of a parquet file, reading each row group once."""
    values: list = []
    out = []
    with source.open() as f:
        pf = _parquet_file(source, f, text_field)
        group = -1
        for ref in refs:
            if ref.group != group:
                group, values = ref.group, _row_group_values(source, pf, ref.group, text_field)
            out.append(values[ref.row])
    return out


def _row_group_values(source: Source, pf, g: int, text_field: str) -> list[bytes | None]:
    import pyarrow as pa

    column = pf.read_row_group(g, columns=[text_field]).column(0)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # Bytes, not str: decoding (and checking) UTF-8 is left to whoever tokenizes.
        column = column.cast(pa.large_binary())
    elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DataPrepError(f"{source.path}: column {text_field!r} has type {column.type}, expected string")
    return column.to_pylist()


def _group_sizes(pf, text_field: str) -> list[int]:
    """Uncompressed bytes of the text column in each row group (from the footer)."""
    sizes = []
    for g in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(g)
        sizes.append(
            sum(
                group.column(j).total_uncompressed_size
                for j in range(group.num_columns)
                if group.column(j).path_in_schema == text_field
            )
        )
    return sizes


def _iter_parquet(
    source: Source, skip: int, text_field: str, refs: bool = False
) -> Iterator[tuple[int, bytes | RowRef | None]]:
    with source.open() as f:
        pf = _parquet_file(source, f, text_field)
        sizes = _group_sizes(pf, text_field)
        # Positions only where row groups are small: a row group is read whole by whoever reads
        # a row of it, and the batches of the caller end at row group ends (see RowRef.last).
        refs = refs and max(sizes, default=0) <= PARQUET_REF_GROUP_BYTES
        number = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if skip >= n:  # whole row group before the start: never read
                skip -= n
                number += n
                continue
            if refs:
                size = sizes[g] // max(n, 1)
                for i in range(skip, n):
                    yield number + i, RowRef(g, i, size, i == n - 1)
            else:
                values = _row_group_values(source, pf, g, text_field)
                yield from enumerate(values[skip:], number + skip)
            number += n
            skip = 0
