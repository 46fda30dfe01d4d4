"""The corpus: the input files (local .txt, .jsonl, .jsonl.zst, .parquet, or a Hugging Face hub
dataset's parquet files) and their documents by number.

A corpus is an ordered list of `Source`s; document i of the corpus is found by walking the sources
in order. Every file can count its documents before reading them (parquet from metadata, the
others with one cheap pass) and can start at any document, which is what --val-docs, --slice and
resuming need. Nothing is written to disk: hub parquet files are read remotely, row group by
row group, exactly like local ones. What a document is in each format: see `formats`. A
document that is not UTF-8 is logged once per file.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import IO

from data_prep import formats
from data_prep.errors import DataPrepError
from data_prep.formats import RowRef

log = logging.getLogger(__name__)

# Short names a user may type for hub datasets.
HUB_ALIASES = {"openwebtext": "Skylion007/openwebtext"}

# The hub keeps an automatic parquet conversion of every public dataset on this revision.
HUB_PARQUET_REVISION = "refs/convert/parquet"

_KINDS = ((".jsonl.zst", "jsonl.zst"), (".jsonl", "jsonl"), (".parquet", "parquet"), (".txt", "txt"))
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """One input file. `path` is an absolute local path or an `hf://datasets/...` URL."""

    path: str
    kind: str  # "txt" | "jsonl" | "jsonl.zst" | "parquet"

    @property
    def is_hub(self) -> bool:
        return self.path.startswith("hf://")

    def open(self) -> IO[bytes]:
        """The raw bytes of the file; the only place where local and hub files differ."""
        if self.is_hub:
            return _hub_fs().open(self.path[len("hf://") :], "rb")
        return open(self.path, "rb")


def unescape(text: str) -> str:
    """The escapes \\n, \\t, \\r and \\\\ as typed on a command line, turned into those characters."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def resolve_hub_dataset(name: str) -> str:
    """Hub repository id for `name` ('openwebtext' -> 'Skylion007/openwebtext'); others unchanged."""
    return HUB_ALIASES.get(name, name)


def resolve_inputs(inputs: Sequence[str]) -> list[Source]:
    """Expand the user's inputs (files, globs, hub dataset names) into sources, in corpus order.

    Globs are expanded in sorted order; otherwise the order of `inputs` is kept, duplicates too.
    A hub name is `NAME` or `NAME:CONFIG` (the split read is `train`).
    """
    if not inputs:
        raise DataPrepError("no --input given")
    sources: list[Source] = []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataPrepError(f"input glob {item!r} matched no files")
            sources.extend(_local_source(p) for p in matches)
        elif os.path.isdir(item):
            scripts = sorted(glob.glob(os.path.join(item, "*.py")))
            if scripts and not any(_kind_of(name) for name in os.listdir(item)):
                raise DataPrepError(_script_refusal(f"folder {item!r}", scripts[0]))
            raise DataPrepError(
                f"input {item!r} is a directory; pass its files or a glob such as '{item}/*.jsonl'"
            )
        elif os.path.exists(item):
            sources.append(_local_source(item))
        elif _kind_of(item) is None and _HUB_NAME.match(item):
            sources.extend(_hub_sources(item))
        else:
            raise DataPrepError(f"input file not found: {item}")
    return sources


def _kind_of(path: str) -> str | None:
    for suffix, kind in _KINDS:
        if path.endswith(suffix):
            return kind
    return None


def _script_refusal(where: str, script: str) -> str:
    return (
        f"{where} holds the dataset loading script {script} and no .parquet, .jsonl or .txt files: data_prep "
        "never runs dataset scripts (they are arbitrary code); convert the dataset to parquet or jsonl "
        "and pass those files"
    )


def _local_source(path: str) -> Source:
    kind = _kind_of(path)
    if kind is None and path.endswith(".py"):
        raise DataPrepError(_script_refusal(f"input {path}", os.path.basename(path)))
    if kind is None:
        raise DataPrepError(
            f"input {path}: unsupported file type (expected .txt, .jsonl, .jsonl.zst or .parquet)"
        )
    return Source(os.path.abspath(path), kind)


def _hub_fs():
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def hub_parquet_glob(repo: str, config: str, split: str) -> str:
    """HfFileSystem glob of the parquet files of one split of the hub's parquet conversion."""
    return f"datasets/{repo}@{HUB_PARQUET_REVISION}/{config}/{split}/*.parquet"


def _hub_sources(name: str, split: str = "train") -> list[Source]:
    name, _, config = name.partition(":")
    repo = resolve_hub_dataset(name)
    try:
        fs = _hub_fs()
        files = sorted(fs.glob(hub_parquet_glob(repo, config or "*", split)))
        if not files:
            # Datasets over 5 GB are converted only partly, under "partial-<split>".
            files = sorted(fs.glob(hub_parquet_glob(repo, config or "*", f"partial-{split}")))
            if files:
                log.warning("hub dataset %s: only a partial parquet conversion exists; reading it", repo)
    except Exception as exc:  # any network or auth failure: say what was tried
        raise DataPrepError(
            f"input {name!r} is not a local file, and reading it as the hub dataset {repo!r} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not files:
        try:
            scripts = sorted(fs.glob(f"datasets/{repo}/*.py"))
        except Exception:  # only for a better message: the lookup itself may fail
            scripts = []
        if scripts:
            raise DataPrepError(_script_refusal(f"hub dataset {repo!r}", scripts[0].rsplit("/", 1)[-1]))
        raise DataPrepError(f"hub dataset {repo!r} has no parquet files for split {split!r}")
    configs = sorted({f.split("/")[-3] for f in files})  # .../{config}/{split}/0000.parquet
    if len(configs) > 1:
        raise DataPrepError(f"hub dataset {repo!r} has several configs {configs}; pick one as {name}:CONFIG")
    return [Source("hf://" + f, "parquet") for f in files]


# ----------------------------------------------------------------------------- counting


def count_documents(source: Source, *, text_field: str = "text", doc_sep: str | None = None) -> int:
    """Number of documents in `source`, by the same rules the reader uses (see `formats`)."""
    try:
        return formats.count(source, text_field, doc_sep)
    except OSError as exc:
        raise DataPrepError(f"cannot read input {source.path}: {exc}") from exc


# ----------------------------------------------------------------------------- reading


def iter_documents(
    sources: Sequence[Source],
    counts: Sequence[int],
    start: int,
    stop: int,
    *,
    text_field: str = "text",
    doc_sep: str | None = None,
) -> Iterator[tuple[str, bool]]:
    """Yield (text, had_invalid_utf8) for corpus documents start..stop-1, in order.

    `counts[i]` is `count_documents(sources[i])`; sources wholly before `start` are not opened.
    Invalid UTF-8 is logged once per file.
    """
    warned = set()
    for i, number, raw in iter_records(sources, counts, start, stop, text_field=text_field, doc_sep=doc_sep):
        source = sources[i]
        text, invalid = formats.decode_record(source.kind, raw, text_field, source.path, number)
        if invalid and i not in warned:
            warned.add(i)
            warn_invalid_utf8(source.path, number)
        yield text, invalid


def warn_invalid_utf8(path: str, number: int) -> None:
    """The once-per-file warning for a document that is not valid UTF-8 (`number` as in `iter_records`)."""
    log.warning(
        "%s: document %d (and maybe more in this file) is not valid UTF-8; "
        "decoded with U+FFFD replacement and counted in the manifest",
        path,
        number,
    )


def iter_records(
    sources: Sequence[Source],
    counts: Sequence[int],
    start: int,
    stop: int,
    *,
    text_field: str = "text",
    doc_sep: str | None = None,
    spans: bool = False,
) -> Iterator[tuple[int, int, bytes | tuple[int, int] | RowRef | None]]:
    """Yield (source index, number, raw record) for corpus documents start..stop-1, undecoded.

    The raw record is what `formats.decode_record` turns into text: a jsonl line, a txt piece or file, a
    parquet value (bytes, or None for a null). `number` locates it in its file for messages: the
    line number for jsonl, else the document's index in the file. Reading this way costs no work
    per character, so the text can be decoded where it is tokenized (in worker processes).
    With `spans`, a record of a local .jsonl file or a whole .txt file is its (start, end) byte
    range in the file instead (see `formats.read_spans`), and one of a parquet file with small
    row groups a `RowRef` (see `formats.read_rows`): the caller does not even read the text.
    """
    offset = 0
    for i, (source, count) in enumerate(zip(sources, counts)):
        lo, hi = max(start - offset, 0), min(stop - offset, count)
        offset += count
        if lo >= hi:
            continue
        n = 0
        for number, raw in islice(formats.records(source, lo, text_field, doc_sep, spans), hi - lo):
            n += 1
            yield i, number, raw
        if n != hi - lo:
            raise DataPrepError(
                f"input {source.path} has fewer documents than counted ({lo + n} < {hi}); "
                "did it change during the run?"
            )
        if offset >= stop:
            return
