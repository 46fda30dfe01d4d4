"""The arguments of `convert`, checked when they are made (litgpt style): `ConvertArgs`.

`python -m data_prep convert` builds its flags from this dataclass (defaults and choices), so a
default is written once, here. A bad value raises DataPrepError naming the flag and what to change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from data_prep.errors import DataPrepError
from data_prep.manifest import TOKEN_DTYPES


@dataclass
class ConvertArgs:
    """What to convert and how; see `convert.convert` for what each does.

    `workers` None means all cores (set here). `shard_size_limit` is bytes or a size like '64mb'
    (see `parse_size`); `slice` is 'i/n' (see `parse_slice`). Both are parsed here into
    `size_limit` and `slice_ix`.
    """

    DTYPES: ClassVar[tuple[str, ...]] = ("auto", *TOKEN_DTYPES)
    COMPRESSIONS: ClassVar[tuple[str, ...]] = ("zstd", "none")

    inputs: Sequence[str]
    out: str
    tokenizer: str
    seq_len: int
    val_docs: int = 0
    workers: int | None = None
    text_field: str = "text"
    doc_sep: str | None = None
    bos: bool = False
    eos_token: str | None = None
    dtype: str = "auto"
    compression: str = "zstd"
    shard_size_limit: int | str = "64mb"  # Streaming's default
    slice: str | None = None
    docs_per_part: int = 20_000
    max_docs: int | None = None
    overwrite: bool = False
    local_cache: str | None = None
    progress: bool = True
    size_limit: int = field(init=False)
    slice_ix: tuple[int, int] | None = field(init=False)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise DataPrepError(f"--seq-len {self.seq_len}: must be at least 2")
        for name, value, low in (
            ("--val-docs", self.val_docs, 0),
            ("--docs-per-part", self.docs_per_part, 1),
        ):
            if value < low:
                raise DataPrepError(f"{name} {value}: must be at least {low}")
        if self.max_docs is not None and self.max_docs < 1:
            raise DataPrepError(f"--max-docs {self.max_docs}: must be at least 1")
        if self.workers is None:
            self.workers = os.cpu_count() or 1
        if self.workers < 1:
            raise DataPrepError(f"--workers {self.workers}: must be at least 1")
        if self.compression not in self.COMPRESSIONS:
            raise DataPrepError(f"--compression {self.compression!r}: expected {_one_of(self.COMPRESSIONS)}")
        self.size_limit = parse_size(self.shard_size_limit)
        self.slice_ix = parse_slice(self.slice) if self.slice else None
        if self.dtype not in self.DTYPES:
            raise DataPrepError(f"--dtype {self.dtype!r}: expected {_one_of(self.DTYPES)}")


def _one_of(choices: Sequence[str]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


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


def resolve_dtype(requested: str, vocab_size: int) -> str:
    """The token dtype for a vocabulary of `vocab_size` ids: the smallest of TOKEN_DTYPES that holds
    them all for 'auto'; an explicit choice is checked."""
    if requested == "auto":
        return next((dtype for dtype, ids in TOKEN_DTYPES.items() if vocab_size <= ids), "uint32")
    if vocab_size > TOKEN_DTYPES[requested]:
        raise DataPrepError(
            f"--dtype {requested} cannot hold the ids of a vocabulary of {vocab_size:,}; use uint32 or auto"
        )
    return requested
