import json
import shutil

import numpy as np
import pytest

from data_prep import mds
from data_prep.__main__ import main
from data_prep.convert import convert
from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST, STATE
from data_prep.remote import upload_tree
from data_prep.verify import _check_row, verify

TOK = {"vocab_size": 100, "eos_id": 0, "bos_id": None}


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer_path):
    from .conftest import make_docs, write_jsonl

    base = tmp_path_factory.mktemp("verify")
    corpus = write_jsonl(base / "c.jsonl", make_docs(100))
    out = base / "out"
    convert(
        [str(corpus)],
        str(out),
        str(tokenizer_path),
        32,
        val_docs=10,
        docs_per_part=40,
        workers=1,
        progress=False,
        shard_size_limit="2kb",
    )
    return out


@pytest.fixture
def copy(good, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(good, out)
    return out


def shard_path(out, split="train", i=1):
    return out / split / mds.stored_file(mds.read_index(out / split)["shards"][i])["basename"]


def test_good_output_passes_with_a_one_line_summary(good, capsys):
    report = verify(good)
    assert report.ok and report.errors == []
    assert report.summary().startswith(f"OK {good}: train ")
    assert main(["verify", str(good)]) == 0
    assert capsys.readouterr().out.strip() == report.summary()


def test_truncated_shard_is_named(copy, capsys):
    path = shard_path(copy)
    path.write_bytes(path.read_bytes()[:-10])
    report = verify(copy)
    assert not report.ok
    assert any(e.startswith(f"train: shard {path}: file has") and "truncated" in e for e in report.errors)
    assert main(["verify", str(copy)]) == 1
    assert str(path) in capsys.readouterr().err


def test_missing_shard_is_named(copy):
    path = shard_path(copy, "val", 0)
    path.unlink()
    missing = f"val: shard {path}: file is missing; re-run the data_prep convert command"
    assert any(e.startswith(missing) for e in verify(copy).errors)


def test_corrupted_shard_fails_its_hash(copy):
    path = shard_path(copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert any(str(path) in e and "sha1 hash does not match" in e for e in verify(copy).errors)


def test_manifest_counts_that_disagree_are_reported(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["splits"]["train"]["rows"] += 1
    manifest["splits"]["val"]["tokens"] += 5
    (copy / MANIFEST).write_text(json.dumps(manifest))
    errors = verify(copy).errors
    assert any(e.startswith("train: the shards hold") and "the manifest says" in e for e in errors)
    assert any(e.startswith("val: manifest counts do not add up") for e in errors)


def test_unfinished_or_foreign_folders_are_refused(tmp_path, copy):
    (copy / MANIFEST).unlink()
    (copy / STATE).write_text("{}")
    with pytest.raises(DataPrepError, match="incomplete data_prep output.*rerun the same"):
        verify(copy)
    with pytest.raises(
        DataPrepError, match="not a finished data_prep output.*run `python -m data_prep convert"
    ):
        verify(tmp_path / "nothing")
    assert main(["verify", str(tmp_path / "nothing")]) == 2


def test_row_checks_catch_bad_rows():
    ok_row = np.array([5, 0, 7, 8, 0, 9, 9, 9], np.uint16)
    assert _check_row(ok_row, np.array([2, 5], np.uint32), 8, np.dtype("uint16"), TOK) is None
    assert _check_row(ok_row, np.array([8], np.uint32), 8, np.dtype("uint16"), TOK) is None  # no start
    bad = {
        "shape": (ok_row[:7], np.array([2], np.uint32)),
        "dtype": (ok_row.astype(np.uint32), np.array([2], np.uint32)),
        ">= vocab size": (np.where(ok_row == 9, 100, ok_row).astype(np.uint16), np.array([2], np.uint32)),
        ">= seq_len": (ok_row, np.array([2, 9], np.uint32)),
        "not strictly increasing": (ok_row, np.array([5, 2], np.uint32)),
        "does not follow an EOS": (ok_row, np.array([3], np.uint32)),
    }
    for what, (row, starts) in bad.items():
        assert what in _check_row(row, starts, 8, np.dtype("uint16"), TOK)


def test_remote_copy_on_s3_is_verified_and_damage_is_named(good, s3, capsys):
    uri = f"{s3.uri}/owt"
    upload_tree(good, uri)
    assert main(["verify", uri]) == 0
    assert capsys.readouterr().out.startswith(f"OK {uri}: train ")
    key = "owt/" + str(shard_path(good).relative_to(good))
    data = s3.get(key)
    s3.server.client().put_object(Bucket=s3.name, Key=key, Body=data[:-10])
    report = verify(uri)
    assert any(e.startswith(f"train: shard {s3.uri}/{key}: file has") for e in report.errors)
    s3.server.client().delete_object(Bucket=s3.name, Key=key)
    assert any(f"{s3.uri}/{key}: file is missing" in e for e in verify(uri).errors)


def test_remote_folder_without_manifest_or_bucket_is_refused(s3):
    with pytest.raises(DataPrepError, match="not a finished data_prep output"):
        verify(f"{s3.uri}/nothing-here")
    with pytest.raises(
        DataPrepError, match=r"bucket s3://no-such-bucket-x at http://127.0.0.1:\d+ does not exist"
    ):
        verify("s3://no-such-bucket-x/owt")
