from concurrent.futures import Future

import numpy as np
import pytest

from data_prep import mds
from data_prep.packing import RowPacker, start_bounds
from data_prep.shard_writer import ShardWriter, encode_row


def _inline(fn, *args):
    future = Future()
    future.set_result(fn(*args))
    return future


def test_encode_row_is_byte_identical_to_mdswriter(tmp_path):
    from streaming import MDSWriter

    writer = MDSWriter(out=str(tmp_path / "w"), columns=mds.mds_columns("uint16", 600))
    rng = np.random.default_rng(0)
    for n in (1, 2, 255, 256, 600):  # the shape header switches from uint8 to uint16 at 256
        tokens = rng.integers(0, 65535, 600).astype(np.uint16)
        starts = np.sort(rng.choice(601, n, replace=False)).astype(np.uint32)
        assert encode_row(tokens, starts) == writer.encode_sample({"tokens": tokens, "doc_starts": starts})
    writer.finish()


def _packed_rows(seed, n_docs, seq_len):
    """Rows as convert packs them: many short documents, a few with hundreds of starts per row."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice([1, 2, 30, 200, 3 * seq_len], size=n_docs, p=[0.3, 0.2, 0.3, 0.15, 0.05])
    lengths[n_docs // 2 : n_docs // 2 + 700] = 1  # rows with 256 or more document starts
    packer = RowPacker(seq_len, "uint16")
    return packer.add_flat(rng.integers(0, 60000, int(lengths.sum())).astype(np.uint16), lengths)


@pytest.mark.parametrize("compression, size_limit", [(None, 100_000), ("zstd", 5000), ("zstd:7", 3000)])
def test_shard_writer_matches_mdswriter_shard_for_shard(tmp_path, compression, size_limit):
    """The fast writer (rows appended to a file, shards encoded later and elsewhere) against MDSWriter:
    same shard cuts, same decompressed bytes, same index entries, and Streaming reads the same rows."""
    from streaming import StreamingDataset
    from streaming.base.compression import decompress

    seq_len = 300
    rows, starts, counts = _packed_rows(0, 2000, seq_len)
    assert counts.max() >= 256 and (counts == 0).any()
    fast = ShardWriter(
        tmp_path / "fast",
        dtype="uint16",
        seq_len=seq_len,
        compression=compression,
        size_limit=size_limit,
        submit=_inline,
    )
    first = start_bounds(counts)
    for lo, hi in [(0, 1), (1, 40), (40, 41), (41, len(rows))]:  # uneven calls: batching is invisible
        fast.write(rows[lo:hi], starts[first[lo] : first[hi]], counts[lo:hi])
    fast_index = fast.finish()

    slow = mds.open_writer(
        tmp_path / "slow", dtype="uint16", seq_len=seq_len, compression=compression, size_limit=size_limit
    )
    for r in range(len(rows)):
        row_starts = starts[first[r] : first[r + 1]]
        slow.write({"tokens": rows[r], "doc_starts": mds.doc_starts_column(row_starts, seq_len)})
    slow.finish()
    slow_index = mds.read_index(tmp_path / "slow")

    assert len(fast_index["shards"]) == len(slow_index["shards"]) > 2
    assert fast_index == mds.read_index(tmp_path / "fast")
    for a, b in zip(fast_index["shards"], slow_index["shards"]):
        raw = {}
        for name, index in (("fast", a), ("slow", b)):
            data = (tmp_path / name / mds.stored_file(index)["basename"]).read_bytes()
            raw[name] = decompress(index["compression"], data) if compression else data
        assert raw["fast"] == raw["slow"]
        if compression:  # the compressed bytes may differ (compressed as a stream)
            assert a.pop("zip_data")["basename"] == b.pop("zip_data")["basename"]
        assert a == b
    assert not [p.name for p in (tmp_path / "fast").iterdir() if p.name.startswith(".")]  # no temporary files

    ds = StreamingDataset(local=str(tmp_path / "fast"), shuffle=False, batch_size=1)
    assert len(ds) == len(rows)
    for r in range(0, len(rows), 7):
        assert np.array_equal(ds[r]["tokens"], rows[r])
        assert np.array_equal(
            mds.doc_starts_from_column(ds[r]["doc_starts"], seq_len), starts[first[r] : first[r + 1]]
        )
