import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep import formats, sources
from data_prep.errors import DataPrepError
from data_prep.sources import count_documents, iter_documents, resolve_hub_dataset, resolve_inputs, unescape

from .conftest import make_docs, write_jsonl


def read_all(srcs, **kw):
    counts = [count_documents(s, **kw) for s in srcs]
    return counts, [t for t, _ in iter_documents(srcs, counts, 0, sum(counts), **kw)]


def write_parquet(path, docs, row_group_size=7, field="text"):
    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


def test_every_format_yields_the_same_documents_in_order(tmp_path):
    docs = make_docs(40)
    write_jsonl(tmp_path / "a.jsonl", docs[:25])
    with open(tmp_path / "b.jsonl.zst", "wb") as f:
        payload = "".join(json.dumps({"text": d}) + "\n" for d in docs[25:])
        f.write(zstandard.ZstdCompressor().compress(payload.encode()))
    write_parquet(tmp_path / "c.parquet", docs)
    for i, d in enumerate(docs[:3]):
        (tmp_path / f"t{i}.txt").write_text(d, encoding="utf-8")

    _, got = read_all(resolve_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.zst")]))
    assert got == docs
    _, got = read_all(resolve_inputs([str(tmp_path / "c.parquet")]))
    assert got == docs
    # A glob expands sorted; each .txt file is one document.
    _, got = read_all(resolve_inputs([str(tmp_path / "t*.txt")]))
    assert got == docs[:3]


def test_txt_doc_sep_splits_and_runs_of_separators_make_no_documents(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("\n\nfirst doc\nline two\n\n\n\nsecond\n\n  \n\nthird é", encoding="utf-8")
    counts, got = read_all(resolve_inputs([str(path)]), doc_sep="\n\n")
    assert got == ["first doc\nline two", "second", "third é"] and counts == [3]


def test_txt_splitting_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "_READ_CHUNK", 5)  # separators straddle chunk borders
    path = tmp_path / "x.txt"
    docs = [f"document number {i}" for i in range(20)]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    assert read_all(resolve_inputs([str(path)]), doc_sep="\n\n")[1] == docs


@pytest.mark.parametrize("start,stop", [(0, 60), (3, 4), (24, 26), (25, 60), (30, 31), (59, 60), (10, 50)])
def test_any_document_range_across_files_matches_slicing(tmp_path, start, stop):
    docs = make_docs(60, seed=3)
    write_jsonl(tmp_path / "a.jsonl", docs[:25])
    write_parquet(tmp_path / "b.parquet", docs[25:], row_group_size=4)
    srcs = resolve_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")])
    counts = [count_documents(s) for s in srcs]
    assert counts == [25, 35]
    assert [t for t, _ in iter_documents(srcs, counts, start, stop)] == docs[start:stop]


def test_jsonl_blank_lines_are_not_documents_and_null_text_is_empty(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": null}\n   \n{"text": "b"}\n', encoding="utf-8")
    counts, got = read_all(resolve_inputs([str(path)]))
    assert counts == [3] and got == ["a", "", "b"]


def test_invalid_utf8_is_replaced_flagged_and_warned_with_the_file_name(tmp_path, caplog):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good\n\nbad \xff\xfe bytes\n\nfine")
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(
        b'{"text": "caf\xe9"}\n{"text": "lone \\udc80 surrogate"}\n{"text": "ok \\ud83d\\ude00"}\n'
    )
    srcs = resolve_inputs([str(path), str(jl)])
    counts = [count_documents(s, doc_sep="\n\n") for s in srcs]
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        got = list(iter_documents(srcs, counts, 0, sum(counts), doc_sep="\n\n"))
    assert [flag for _, flag in got] == [False, True, False, True, True, False]
    assert got[1][0] == "bad \ufffd\ufffd bytes" and got[5][0] == "ok \U0001f600"
    "".join(t for t, _ in got).encode("utf-8")  # everything is valid UTF-8 now
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and str(path) in warned[0] and str(jl) in warned[1]


def test_missing_text_field_names_the_file_and_the_fields_present(tmp_path):
    jl = write_jsonl(tmp_path / "a.jsonl", ["x"], field="content")
    with pytest.raises(
        DataPrepError, match=r"a\.jsonl:1: no field 'text' \(fields present: \['content', 'id'\]\)"
    ):
        count_documents(resolve_inputs([str(jl)])[0])
    pqf = write_parquet(tmp_path / "b.parquet", ["x"], field="body")
    with pytest.raises(
        DataPrepError, match=r"b\.parquet: no column 'text' \(columns present: \['body', 'n'\]\)"
    ):
        count_documents(resolve_inputs([str(pqf)])[0])


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DataPrepError, match="input file not found: .*nope.jsonl"):
        resolve_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataPrepError, match=r"glob .*\*\.jsonl' matched no files"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataPrepError, match="x.csv: unsupported file type"):
        resolve_inputs([str(tmp_path / "x.csv")])
    with pytest.raises(DataPrepError, match="is a directory"):
        resolve_inputs([str(tmp_path)])
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    src = resolve_inputs([str(tmp_path / "bad.jsonl")])[0]
    with pytest.raises(DataPrepError, match=r"bad\.jsonl:2: expected a JSON object"):
        list(iter_documents([src], [2], 0, 2))


def test_hub_alias_and_parquet_location_need_no_network():
    assert resolve_hub_dataset("openwebtext") == "Skylion007/openwebtext"
    assert resolve_hub_dataset("allenai/c4") == "allenai/c4"
    assert (
        sources.hub_parquet_glob("Skylion007/openwebtext", "*", "train")
        == "datasets/Skylion007/openwebtext@refs/convert/parquet/*/train/*.parquet"
    )


class _FakeHubFS:
    """HfFileSystem stand-in serving a local folder laid out like the hub's parquet branch."""

    def __init__(self, root):
        self.root = root

    def _local(self, path):
        return self.root / path.replace("@refs/convert/parquet", "")

    def glob(self, pattern):
        return sorted(
            str(p.relative_to(self.root)).replace("/openwebtext/", "/openwebtext@refs/convert/parquet/", 1)
            for p in self.root.glob(pattern.replace("@refs/convert/parquet", ""))
        )

    def open(self, path, mode="rb"):
        return open(self._local(path), mode)


def test_hub_dataset_reads_its_parquet_files_like_local_ones(tmp_path, monkeypatch):
    docs = make_docs(30)
    folder = tmp_path / "datasets/Skylion007/openwebtext/plain_text/train"
    folder.mkdir(parents=True)
    write_parquet(folder / "0000.parquet", docs[:20], row_group_size=6)
    write_parquet(folder / "0001.parquet", docs[20:])
    monkeypatch.setattr(sources, "_hub_fs", lambda: _FakeHubFS(tmp_path))
    srcs = resolve_inputs(["openwebtext"])
    assert [s.path for s in srcs] == [
        "hf://datasets/Skylion007/openwebtext@refs/convert/parquet/plain_text/train/0000.parquet",
        "hf://datasets/Skylion007/openwebtext@refs/convert/parquet/plain_text/train/0001.parquet",
    ]
    counts = [count_documents(s) for s in srcs]
    assert counts == [20, 10]
    assert [t for t, _ in iter_documents(srcs, counts, 13, 25)] == docs[13:25]


def test_unreachable_hub_gives_a_clear_error(monkeypatch):
    class Down:
        def glob(self, pattern):
            raise ConnectionError("no network")

    monkeypatch.setattr(sources, "_hub_fs", lambda: Down())
    with pytest.raises(
        DataPrepError, match="'openwebtext' is not a local file.*Skylion007/openwebtext.*no network"
    ):
        resolve_inputs(["openwebtext"])


def test_unescape_turns_typed_escapes_into_characters():
    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"a\tb\\n") == "a\tb\\n"
    assert unescape("real\nnewline") == "real\nnewline"


@pytest.mark.parametrize(
    "chunk", [5, 64, 1 << 24]
)  # lines straddle reads, are longer than the buffer, or not
def test_byte_ranges_read_back_the_same_records_as_reading_the_text(tmp_path, monkeypatch, chunk):
    """The fast path (convert's parent lists byte ranges, the workers read them) against plain reading."""
    monkeypatch.setattr(formats, "_READ_CHUNK", chunk)
    docs = make_docs(40, seed=5)
    lines = [json.dumps({"text": d}) for d in docs]
    lines[3:3] = ["", "   ", "\t"]  # blank lines are not documents
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n  \n" + json.dumps({"text": "last, no newline"}))
    (tmp_path / "b.txt").write_text("a whole file é\n\nis one document\n", encoding="utf-8")
    srcs = resolve_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), str(tmp_path / "a.jsonl")])
    counts = [count_documents(s) for s in srcs]
    assert counts == [41, 1, 41]
    for start, stop in [(0, 83), (7, 50), (40, 42)]:
        plain = list(sources.iter_records(srcs, counts, start, stop))
        ranged = list(sources.iter_records(srcs, counts, start, stop, spans=True))
        assert all(isinstance(raw, tuple) for _, _, raw in ranged)
        assert [(i, n) for i, n, _ in ranged] == [(i, n) for i, n, _ in plain]
        read = [formats.read_spans(srcs[i].path, [raw])[0] for i, _, raw in ranged]
        assert read == [raw for _, _, raw in plain]
    texts = [t for t, _ in iter_documents(srcs, counts, 0, sum(counts))]
    assert texts == docs + ["last, no newline", "a whole file é\n\nis one document\n"] + docs + [
        "last, no newline"
    ]


@pytest.mark.parametrize("ref_limit", [1 << 24, 100])  # row positions, or (big row groups) the values
def test_parquet_row_positions_read_back_the_same_records(tmp_path, monkeypatch, ref_limit):
    monkeypatch.setattr(formats, "PARQUET_REF_GROUP_BYTES", ref_limit)
    docs = make_docs(50, seed=9)
    write_parquet(
        tmp_path / "a.parquet", [None if i == 7 else d for i, d in enumerate(docs)], row_group_size=6
    )
    srcs = resolve_inputs([str(tmp_path / "a.parquet")])
    for start, stop in [(0, 50), (5, 6), (11, 37)]:
        plain = list(sources.iter_records(srcs, [50], start, stop))
        ranged = list(sources.iter_records(srcs, [50], start, stop, spans=True))
        assert (
            [(i, n) for i, n, _ in ranged]
            == [(i, n) for i, n, _ in plain]
            == [(0, k) for k in range(start, stop)]
        )
        refs = [raw for _, _, raw in ranged]
        if ref_limit == 100:
            assert refs == [raw for _, _, raw in plain]  # row groups too big: the values themselves
            continue
        assert all(isinstance(r, formats.RowRef) for r in refs)
        assert [r.last for r in refs] == [(k + 1) % 6 == 0 or k == 49 for k in range(start, stop)]
        assert formats.read_rows(srcs[0], "text", refs) == [raw for _, _, raw in plain]


@pytest.mark.parametrize("chunk", [3, 64, 1 << 24])  # separators straddle reads, pieces outgrow the buffer
def test_txt_pieces_as_byte_ranges_read_back_the_same_records(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(formats, "_READ_CHUNK", chunk)
    docs = [d for d in make_docs(30, seed=6) if d.strip()]
    (tmp_path / "x.txt").write_text("\n\n  \n\n" + "\n\n".join(docs) + "\n\n\t\n\n\n", encoding="utf-8")
    srcs = resolve_inputs([str(tmp_path / "x.txt")])
    counts = [count_documents(s, doc_sep="\n\n") for s in srcs]
    assert counts == [len(docs)]
    plain = list(sources.iter_records(srcs, counts, 2, len(docs), doc_sep="\n\n"))
    ranged = list(sources.iter_records(srcs, counts, 2, len(docs), doc_sep="\n\n", spans=True))
    assert [n for _, n, _ in ranged] == [n for _, n, _ in plain] == list(range(2, len(docs)))
    assert formats.read_spans(srcs[0].path, [raw for _, _, raw in ranged]) == [raw for _, _, raw in plain]
    assert [raw.decode() for _, _, raw in plain] == docs[2:]
