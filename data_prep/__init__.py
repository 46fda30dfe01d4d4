"""Corpus to MosaicML Streaming (MDS) shards of packed token rows, for BD3 pretraining.

Importing this package is cheap: `streaming` (which imports torch and transformers, several
seconds) is only imported by the functions that read shards or upload them; `convert` writes
shards without it.
"""

from data_prep.errors import DataPrepError

__all__ = ["DataPrepError"]
