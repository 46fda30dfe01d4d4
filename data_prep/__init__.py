"""Corpus to MosaicML Streaming (MDS) shards of packed token rows, for BD3 pretraining."""
