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
