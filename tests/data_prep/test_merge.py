import shutil

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.convert import convert
from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST, STATE, read_manifest
from data_prep.merge import merge
from data_prep.verify import verify

from .conftest import file_states, read_rows, reference_stream

SEQ, VAL = 16, 25


def run(corpus, out, tokenizer, **kw):
    return convert(
        [str(corpus)],
        str(out),
        str(tokenizer),
        kw.pop("seq_len", SEQ),
        val_docs=VAL,
        workers=1,
        progress=False,
        docs_per_part=15,
        **kw,
    )


@pytest.fixture
def sliced(tmp_path, corpus, tokenizer_path):
    for i in range(3):
        run(corpus, tmp_path / "sliced", tokenizer_path, slice=f"{i}/3")
    return tmp_path / "sliced"


def test_slices_cover_the_corpus_and_merge_conserves_documents_and_tokens(
    tmp_path, sliced, corpus, docs, tok, tokenizer_path
):
    whole = run(corpus, tmp_path / "whole", tokenizer_path).manifest
    # 120 documents in 3 slices; val is the last 25 of the whole corpus: only slice 2 has val.
    ranges = {i: read_manifest(sliced / f"slice-{i}-of-3")["splits"] for i in range(3)}
    assert {i: {k: v["doc_range"] for k, v in s.items()} for i, s in ranges.items()} == {
        0: {"train": [0, 40]},
        1: {"train": [40, 80]},
        2: {"train": [80, 95], "val": [95, 120]},
    }
    # Each slice packs its own documents, in order.
    for i, (lo, hi) in enumerate([(0, 40), (40, 80), (80, 95)]):
        stream, _ = reference_stream(tok, docs[lo:hi])
        rows, _ = read_rows(sliced / f"slice-{i}-of-3" / "train")
        assert rows.reshape(-1).tolist() == stream[: rows.size]

    result = merge([str(sliced)], str(tmp_path / "merged"))
    merged = result.manifest
    for split in ("train", "val"):
        for key in ("documents", "tokens", "empty_documents_skipped", "invalid_utf8_documents"):
            assert merged["splits"][split][key] == whole["splits"][split][key]
        s, w = merged["splits"][split], whole["splits"][split]
        assert s["rows"] * SEQ + s["dropped_tail_tokens"] == s["tokens"]
        n_slices = sum(split in r for r in ranges.values())
        assert w["rows"] - (n_slices - 1) <= s["rows"] <= w["rows"]  # rows differ only at slice boundaries
    assert [m["slice"]["index"] for m in merged["merged_from"]] == [0, 1, 2]

    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(tmp_path / "merged" / "train"), shuffle=False, batch_size=1)
    expected = np.concatenate([read_rows(sliced / f"slice-{i}-of-3" / "train")[0] for i in range(3)])
    assert len(ds) == len(expected)
    assert all(np.array_equal(ds[i]["tokens"], expected[i]) for i in range(len(ds)))
    assert verify(tmp_path / "merged").ok
    # The merged output stands alone: shards are linked or copied, not referenced.
    shutil.rmtree(sliced)
    assert verify(tmp_path / "merged").ok


def test_merge_puts_slices_in_order_and_is_idempotent(tmp_path, sliced, capsys):
    parts = [str(sliced / f"slice-{i}-of-3") for i in (2, 0, 1)]
    merge(parts, str(tmp_path / "m"))
    assert [m["folder"] for m in read_manifest(tmp_path / "m")["merged_from"]] == [
        "slice-0-of-3",
        "slice-1-of-3",
        "slice-2-of-3",
    ]
    before = file_states(tmp_path / "m")
    assert main(["merge", *parts, "--out", str(tmp_path / "m")]) == 0
    assert "already complete" in capsys.readouterr().out
    assert file_states(tmp_path / "m") == before


def test_merge_refuses_missing_incomplete_and_incompatible_slices(tmp_path, sliced, corpus, tokenizer_path):
    with pytest.raises(DataPrepError, match=r"slice\(s\) \[1\] missing of 3.*--slice i/3"):
        merge([str(sliced / "slice-0-of-3"), str(sliced / "slice-2-of-3")], str(tmp_path / "m"))

    (sliced / "slice-1-of-3" / MANIFEST).rename(sliced / "slice-1-of-3" / STATE)
    with pytest.raises(DataPrepError, match="slice-1-of-3 is an incomplete data_prep output"):
        merge([str(sliced)], str(tmp_path / "m"))
    (sliced / "slice-1-of-3" / STATE).rename(sliced / "slice-1-of-3" / MANIFEST)

    run(corpus, tmp_path / "other", tokenizer_path, seq_len=8)
    with pytest.raises(
        DataPrepError, match=r"cannot merge .*other with .*slice-0-of-3: seq_len differs \(8 vs 16\)"
    ):
        merge([str(sliced), str(tmp_path / "other")], str(tmp_path / "m"))
    with pytest.raises(DataPrepError, match="must be a new folder outside the inputs"):
        merge([str(sliced)], str(sliced))
    assert not (tmp_path / "m").exists()
