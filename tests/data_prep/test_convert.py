import json
import logging
import time

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data_prep import mds
from data_prep.convert import convert
from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST, STATE, read_manifest

from .conftest import EOS, file_states, make_docs, read_rows, reference_stream, write_jsonl

SEQ = 32


def run(inputs, out, tokenizer, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return convert([str(p) for p in inputs], str(out), str(tokenizer), kw.pop("seq_len", SEQ), **kw)


def test_tokens_are_conserved_and_rows_reproduce_the_stream_per_split(
    tmp_path, corpus, docs, tok, tokenizer_path
):
    k = 30
    result = run([corpus], tmp_path / "out", tokenizer_path, val_docs=k, docs_per_part=25)
    for split, split_docs in (("train", docs[:-k]), ("val", docs[-k:])):
        stream, starts = reference_stream(tok, split_docs)
        stats = result.manifest["splits"][split]
        rows, row_starts = read_rows(tmp_path / "out" / split)
        n = len(rows)
        assert rows.dtype == np.uint16 and rows.shape == (len(stream) // SEQ, SEQ)
        assert stats["tokens"] == len(stream) == n * SEQ + stats["dropped_tail_tokens"]
        assert stats["rows"] == n and stats["dropped_tail_tokens"] < SEQ
        assert rows.reshape(-1).tolist() == stream[: n * SEQ]
        got_starts = [r * SEQ + int(p) for r, s in enumerate(row_starts) for p in s]
        assert got_starts == [p for p in starts if p < n * SEQ]
        assert stats["documents"] == len(starts)
        assert stats["empty_documents_skipped"] == sum(1 for d in split_docs if not d.strip())
    assert result.manifest["splits"]["val"]["doc_range"] == [len(docs) - k, len(docs)]


def test_streaming_dataset_reads_the_contract_columns(tmp_path, corpus, tokenizer_path):
    from streaming import StreamingDataset

    result = run(
        [corpus], tmp_path / "out", tokenizer_path, val_docs=20, docs_per_part=30, shard_size_limit="1kb"
    )
    manifest = read_manifest(tmp_path / "out")
    assert manifest["columns"] == {"tokens": f"ndarray:uint16:{SEQ}", "doc_starts": "ndarray:uint32"}
    rows, starts = read_rows(tmp_path / "out" / "train")
    ds = StreamingDataset(local=str(tmp_path / "out" / "train"), shuffle=False, batch_size=1)
    assert len(ds) == len(rows) == result.manifest["splits"]["train"]["rows"]
    assert result.manifest["splits"]["train"]["shards"] > 2  # several parts and shards, one dataset
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["tokens"].dtype == np.uint16 and sample["tokens"].shape == (SEQ,)
        assert np.array_equal(sample["tokens"], rows[i])
        assert np.array_equal(mds.doc_starts_from_column(sample["doc_starts"], SEQ), starts[i])
    # The training code may point at the split folder.
    assert read_manifest(tmp_path / "out" / "train")["seq_len"] == SEQ


@pytest.mark.multiprocess
def test_rows_do_not_depend_on_workers_or_parts(tmp_path, corpus, tokenizer_path):
    outputs = []
    for i, (workers, per_part) in enumerate([(1, 1000), (2, 1000), (2, 7), (1, 13)]):
        run(
            [corpus], tmp_path / f"o{i}", tokenizer_path, val_docs=10, workers=workers, docs_per_part=per_part
        )
        outputs.append([read_rows(tmp_path / f"o{i}" / split) for split in ("train", "val")])
    for other in outputs[1:]:
        for (rows_a, starts_a), (rows_b, starts_b) in zip(outputs[0], other):
            assert np.array_equal(rows_a, rows_b)
            assert all(np.array_equal(a, b) for a, b in zip(starts_a, starts_b))


def test_rerun_of_a_finished_output_rewrites_nothing(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "out"
    first = run([corpus], out, tokenizer_path, val_docs=10)
    before = file_states(out)
    again = run([corpus], out, tokenizer_path, val_docs=10, workers=2)  # workers do not change the output
    assert again.already_complete and again.tokens_this_run == 0
    assert file_states(out) == before
    assert again.manifest == first.manifest


def test_different_arguments_are_refused_by_name_unless_overwrite(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "out"
    run([corpus], out, tokenizer_path, val_docs=10)
    with pytest.raises(
        DataPrepError, match=r"different arguments:\n  seq_len: existing 32, requested 16\n  val_docs"
    ):
        run([corpus], out, tokenizer_path, val_docs=5, seq_len=16)
    assert read_manifest(out)["seq_len"] == SEQ  # untouched
    result = run([corpus], out, tokenizer_path, val_docs=5, seq_len=16, overwrite=True)
    assert not result.already_complete and read_manifest(out)["seq_len"] == 16
    assert read_rows(out / "train")[0].shape[1] == 16


def test_unfinished_output_with_other_arguments_is_refused(tmp_path, corpus, tokenizer_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE).write_text(json.dumps({"args": {"seq_len": 64}}))
    with pytest.raises(DataPrepError, match="an unfinished output made with different arguments"):
        run([corpus], out, tokenizer_path)


def test_a_foreign_folder_is_never_written_into(tmp_path, corpus, tokenizer_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(DataPrepError, match="is not a data_prep output"):
            run([corpus], tmp_path / "mine", tokenizer_path, overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_bos_eos_override_and_max_docs(tmp_path, corpus, docs, tok, tokenizer_path):
    result = run([corpus], tmp_path / "out", tokenizer_path, bos=True, eos_token="<|mask|>", max_docs=50)
    assert result.manifest["tokenizer"]["bos_token"] == "<s>"
    assert result.manifest["corpus"]["used_documents"] == 50
    mask, bos = tok.token_to_id("<|mask|>"), tok.token_to_id("<s>")
    stream = []
    for d in docs[:50]:
        if d.strip():
            stream += [bos] + tok.encode(d, add_special_tokens=False).ids + [mask]
    rows, _ = read_rows(tmp_path / "out" / "train")
    assert result.manifest["splits"]["train"]["tokens"] == len(stream)
    assert rows.reshape(-1).tolist() == stream[: rows.size]


def test_special_token_strings_in_text_are_ordinary_text(tmp_path, tok, tokenizer_path):
    docs = ["quoting <|endoftext|> and <|mask|> in a web page " * 3, "next document"]
    write_jsonl(tmp_path / "c.jsonl", docs)
    result = run([tmp_path / "c.jsonl"], tmp_path / "out", tokenizer_path, seq_len=4, workers=2)
    rows, _ = read_rows(tmp_path / "out" / "train")
    stream, starts = reference_stream(tok, docs)
    assert rows.reshape(-1).tolist() == stream[: rows.size]
    eos = tok.token_to_id(EOS)
    # The only EOS ids are the ones that end the two documents.
    assert [i for i, t in enumerate(stream) if t == eos] == [starts[1] - 1, len(stream) - 1]
    assert result.manifest["splits"]["train"]["tokens"] == len(stream)


def test_big_vocabulary_gives_uint32_and_uint16_is_refused(tmp_path, corpus):
    vocab = {EOS: 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.add_special_tokens([EOS])
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(DataPrepError, match="--dtype uint16 cannot hold the ids of a vocabulary of 70,002"):
        run([corpus], tmp_path / "o16", tmp_path / "big.json", dtype="uint16")
    result = run([corpus], tmp_path / "o32", tmp_path / "big.json")
    assert result.manifest["dtype"] == "uint32"
    assert result.manifest["columns"]["tokens"] == f"ndarray:uint32:{SEQ}"
    assert read_rows(tmp_path / "o32" / "train")[0].dtype == np.uint32


def test_txt_with_doc_sep_and_invalid_utf8_counted(tmp_path, tok, tokenizer_path, caplog):
    docs = make_docs(60)
    raw = b"\n\n".join(d.encode() for d in docs if d.strip())
    raw += b"\n\nbroken \xff\xfe bytes " + b"ka " * 20
    (tmp_path / "c.txt").write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="data_prep"):
        result = run([tmp_path / "c.txt"], tmp_path / "out", tokenizer_path, doc_sep="\n\n")
    stats = result.manifest["splits"]["train"]
    assert (
        stats["invalid_utf8_documents"] == 1 and stats["documents"] == sum(1 for d in docs if d.strip()) + 1
    )
    assert any("c.txt" in r.getMessage() and "UTF-8" in r.getMessage() for r in caplog.records)
    expected, _ = reference_stream(
        tok, [d for d in docs if d.strip()] + ["broken \ufffd\ufffd bytes " + "ka " * 20]
    )
    assert stats["tokens"] == len(expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seq_len=1), "--seq-len 1: must be at least 2"),
        (dict(val_docs=120), r"--val-docs 120 must be smaller than the number of documents \(120\)"),
        (dict(slice="2/2"), r"--slice '2/2': expected i/n"),
        (dict(slice="one/two"), r"--slice 'one/two': expected i/n"),
        (dict(shard_size_limit="lots"), "--shard-size-limit 'lots'"),
        (dict(seq_len=2000, val_docs=1), "split val has .* tokens, less than one row of --seq-len 2000"),
        (dict(out="ftp://host/x"), r"no uploader for ftp://"),
    ],
)
def test_bad_arguments_fail_clearly_and_leave_nothing_finished(
    tmp_path, corpus, tokenizer_path, change, message
):
    out = change.pop("out", tmp_path / "out")
    with pytest.raises(DataPrepError, match=message):
        run([corpus], out, tokenizer_path, **change)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_empty_corpora_are_refused(tmp_path, tokenizer_path):
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(DataPrepError, match="the inputs hold no documents"):
        run([tmp_path / "none.jsonl"], tmp_path / "a", tokenizer_path)
    write_jsonl(tmp_path / "blank.jsonl", ["", "  ", "\n"])
    with pytest.raises(
        DataPrepError, match=r"split train has no non-empty document \(3 empty ones skipped\)"
    ):
        run([tmp_path / "blank.jsonl"], tmp_path / "b", tokenizer_path)
    assert not (tmp_path / "b" / MANIFEST).exists()


def test_remote_out_uploads_to_s3_after_completion_and_only_once(tmp_path, corpus, tokenizer_path, s3):
    from streaming import StreamingDataset

    kw = dict(local_cache=str(tmp_path / "cache"), slice="0/1", val_docs=10)
    result = run([corpus], f"{s3.uri}/data", tokenizer_path, **kw)
    assert result.out == f"{s3.uri}/data/slice-0-of-1"
    local = tmp_path / "cache"
    stored = s3.keys("data/slice-0-of-1/")
    assert f"data/slice-0-of-1/{MANIFEST}" in stored and not any("/." in k for k in stored)
    uploaded = {k.removeprefix("data/slice-0-of-1/"): size for k, size in stored.items()}
    built = next(p for p in local.rglob(MANIFEST)).parent
    assert uploaded == {
        str(p.relative_to(built)): p.stat().st_size
        for p in built.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    # Streaming reads it back over HTTP into a fresh cache.
    ds = StreamingDataset(
        remote=f"{result.out}/train", local=str(tmp_path / "read"), shuffle=False, batch_size=1
    )
    rows, _ = read_rows(built / "train")
    assert len(ds) == result.manifest["splits"]["train"]["rows"] == len(rows)
    assert all(np.array_equal(ds[i]["tokens"], rows[i]) for i in range(len(ds)))

    def stamps():
        head = s3.server.client().head_object
        return {k: head(Bucket=s3.name, Key=k)["LastModified"] for k in stored}

    before = stamps()
    time.sleep(1.1)  # LastModified has one-second resolution
    assert run([corpus], f"{s3.uri}/data", tokenizer_path, **kw).already_complete
    assert stamps() == before  # uploaded once: the rerun writes nothing


@pytest.mark.multiprocess
def test_one_batch_across_files_of_every_kind_gives_the_reference_rows(tmp_path, tok, tokenizer_path):
    """Records of several files in one batch: byte ranges (.jsonl, whole .txt) and row positions
    (.parquet) that the workers read, and text (.jsonl.zst) sent to them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = make_docs(60, seed=11)
    write_jsonl(tmp_path / "a.jsonl", docs[:20])
    for i, d in enumerate(docs[20:30]):
        (tmp_path / f"t{i:02d}.txt").write_text(d, encoding="utf-8")
    payload = "".join(json.dumps({"text": d}) + "\n" for d in docs[30:45])
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload.encode()))
    pq.write_table(pa.table({"text": docs[45:]}), tmp_path / "d.parquet", row_group_size=4)
    inputs = [
        tmp_path / "a.jsonl",
        str(tmp_path / "t*.txt"),
        tmp_path / "c.jsonl.zst",
        tmp_path / "d.parquet",
    ]
    for workers, per_part in [(1, 1000), (2, 1000), (2, 7)]:  # parts of 7 cut row groups and batches
        out = tmp_path / f"out{workers}-{per_part}"
        result = run(inputs, out, tokenizer_path, workers=workers, seq_len=16, docs_per_part=per_part)
        stream, starts = reference_stream(tok, docs)
        rows, row_starts = read_rows(out / "train")
        assert rows.reshape(-1).tolist() == stream[: rows.size] and len(stream) - rows.size < 16
        assert [r * 16 + int(p) for r, s in enumerate(row_starts) for p in s] == [
            p for p in starts if p < rows.size
        ]
        assert result.manifest["splits"]["train"]["empty_documents_skipped"] == sum(
            1 for d in docs if not d.strip()
        )


def test_remote_out_with_a_missing_bucket_or_bad_credentials_fails_before_tokenizing(
    tmp_path, corpus, tokenizer_path, s3, monkeypatch
):
    cache = tmp_path / "cache"
    with pytest.raises(DataPrepError, match="bucket s3://no-such-bucket .*does not exist"):
        run([corpus], "s3://no-such-bucket/data", tokenizer_path, local_cache=str(cache))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(DataPrepError, match="no credentials for s3://"):
        run([corpus], f"{s3.uri}/data", tokenizer_path, local_cache=str(cache))
    assert not cache.exists()  # nothing was built
