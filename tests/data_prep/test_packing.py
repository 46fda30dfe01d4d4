from concurrent.futures import Future

import numpy as np
import pytest

from data_prep import mds
from data_prep.packing import RowPacker


def _docs(rng, n):
    lengths = rng.choice([1, 2, 5, 13, 40, 100], size=n)
    return [rng.integers(1, 1000, size=k) for k in lengths]


@pytest.mark.parametrize("seq_len", [2, 7, 32])
def test_rows_are_the_stream_cut_in_pieces_and_starts_are_document_boundaries(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = _docs(rng, 60)
    stream = np.concatenate(docs)
    boundaries = np.cumsum([0] + [len(d) for d in docs[:-1]])

    packer = RowPacker(seq_len, "uint16")
    rows, starts = [], []
    # Feed in uneven batches: the carry must make batching invisible.
    cuts = sorted(rng.choice(np.arange(1, len(docs)), size=8, replace=False))
    for batch in np.split(np.arange(len(docs)), cuts):
        parts = [docs[i] for i in batch]
        r, s = packer.add(np.concatenate(parts) if parts else np.zeros(0), np.array([len(p) for p in parts]))
        rows.append(r)
        starts += s

    rows = np.concatenate(rows)
    n = len(rows)
    assert rows.shape == (len(stream) // seq_len, seq_len) and rows.dtype == np.uint16
    assert np.array_equal(rows.reshape(-1), stream[: n * seq_len])
    assert np.array_equal(packer.carry_tokens, stream[n * seq_len :])
    for r, s in enumerate(starts):
        expected = boundaries[(boundaries >= r * seq_len) & (boundaries < (r + 1) * seq_len)] - r * seq_len
        assert np.array_equal(s, expected)
    expected_carry = boundaries[boundaries >= n * seq_len] - n * seq_len
    assert np.array_equal(packer.carry_doc_starts, expected_carry)


def test_restarting_from_a_saved_carry_continues_identically():
    rng = np.random.default_rng(0)
    docs = _docs(rng, 30)
    whole = RowPacker(16, "uint32")
    rows_whole, starts_whole = whole.add(np.concatenate(docs), np.array([len(d) for d in docs]))

    first = RowPacker(16, "uint32")
    r1, s1 = first.add(np.concatenate(docs[:11]), np.array([len(d) for d in docs[:11]]))
    # What a done-marker stores is JSON lists.
    second = RowPacker(16, "uint32", first.carry_tokens.tolist(), first.carry_doc_starts.tolist())
    r2, s2 = second.add(np.concatenate(docs[11:]), np.array([len(d) for d in docs[11:]]))
    assert np.array_equal(np.concatenate([r1, r2]), rows_whole)
    assert all(np.array_equal(a, b) for a, b in zip(s1 + s2, starts_whole))


def test_doc_starts_column_stores_no_start_as_seq_len_and_round_trips():
    assert mds.doc_starts_column(np.array([], np.int64), 8).tolist() == [8]
    assert mds.doc_starts_from_column(np.array([8], np.uint32), 8).tolist() == []
    col = mds.doc_starts_column(np.array([0, 3]), 8)
    assert col.dtype == np.uint32 and mds.doc_starts_from_column(col, 8).tolist() == [0, 3]


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
        assert mds.encode_row(tokens, starts) == writer.encode_sample(
            {"tokens": tokens, "doc_starts": starts}
        )
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
    fast = mds.ShardWriter(
        tmp_path / "fast",
        dtype="uint16",
        seq_len=seq_len,
        compression=compression,
        size_limit=size_limit,
        submit=_inline,
    )
    first = np.concatenate([[0], np.cumsum(counts)])
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
