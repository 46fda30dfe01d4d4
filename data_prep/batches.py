"""The documents of the corpus in batches for the tokenizer workers, read in corpus order.

The parent process does the reading and no work per character: local .jsonl and .txt documents
are listed as byte ranges and parquet documents as row positions, which the workers read
themselves (see `sources.iter_records`); other documents are sent as raw bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from data_prep.formats import RowRef
from data_prep.sources import Source, iter_records
from data_prep.usage import seconds_since_process_start

# A batch sent to a tokenizer worker: big enough that the per-task cost of the pool (pickling,
# pipes, two threads of the parent) is a small fraction of a percent of tokenizing it (about a
# quarter of a second of one core), small enough that a few in flight per worker keep every core
# busy without holding much text in memory.
BATCH_CHARS = 1 << 20
BATCH_DOCS = 4096


@dataclass
class RecordBatch:
    """Consecutive documents of the corpus as raw records (see `sources.iter_records`).

    `segments` says where each file's records begin: (first index in `records`, path, kind).
    `numbers[i]` locates record i in its file, for error messages. A record that is a (start,
    end) byte range or a parquet `RowRef` is read from the file by whoever decodes the batch.
    """

    part: int
    text_field: str = "text"
    records: list = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    segments: list[tuple[int, str, str]] = field(default_factory=list)
    chars: int = 0


class DocumentBatches:
    """Documents of the corpus by range, as batches of raw records (decoded by the workers)."""

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
