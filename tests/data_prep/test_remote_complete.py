"""`convert --out s3://...` judges "complete" by the bucket, not by a local staging copy (moto S3).

The case a user met: a staging folder of an earlier conversion to the same URL (on another server)
was still in the temp directory; the rerun said "already complete" and the bucket held nothing.
"""

from __future__ import annotations

import pytest

from data_prep.convert import convert
from data_prep.manifest import MANIFEST

SEQ = 32


def _run(corpus, out, tokenizer_path, cache):
    return convert(
        [str(corpus)],
        out,
        str(tokenizer_path),
        SEQ,
        workers=1,
        progress=False,
        val_docs=10,
        local_cache=str(cache),
    )


@pytest.fixture
def converted(tmp_path, corpus, tokenizer_path, s3):
    """A conversion to s3://bucket/mds staged in tmp_path/cache: (result, its keys {key: size})."""
    result = _run(corpus, f"{s3.uri}/mds", tokenizer_path, tmp_path / "cache")
    assert not result.already_complete
    return result, s3.keys("mds/")


def test_an_empty_bucket_gets_the_complete_staging_copy(tmp_path, corpus, tokenizer_path, s3, converted):
    result, stored = converted
    s3.server.client().delete_objects(
        Bucket=s3.name, Delete={"Objects": [{"Key": k} for k in stored]}
    )  # as a fresh server behind the same URL: nothing there, the staging copy still here
    again = _run(corpus, f"{s3.uri}/mds", tokenizer_path, tmp_path / "cache")
    assert again.tokens_this_run == 0  # uploaded, not converted again
    assert s3.keys("mds/") == stored


def test_a_missing_or_short_shard_in_the_bucket_is_uploaded_again(
    tmp_path, corpus, tokenizer_path, s3, converted
):
    _, stored = converted
    shard = next(k for k in stored if k.endswith(".zstd") or k.endswith(".mds"))
    client = s3.server.client()
    client.put_object(Bucket=s3.name, Key=shard, Body=s3.get(shard)[:-1])
    again = _run(corpus, f"{s3.uri}/mds", tokenizer_path, tmp_path / "cache")
    assert again.tokens_this_run == 0 and s3.keys("mds/") == stored  # uploaded again
    client.delete_object(Bucket=s3.name, Key=shard)
    _run(corpus, f"{s3.uri}/mds", tokenizer_path, tmp_path / "cache")
    assert s3.keys("mds/") == stored


def test_a_complete_bucket_needs_no_staging_copy(tmp_path, corpus, tokenizer_path, s3, converted):
    _, stored = converted
    again = _run(corpus, f"{s3.uri}/mds", tokenizer_path, tmp_path / "elsewhere")
    assert again.already_complete and again.tokens_this_run == 0
    assert not (tmp_path / "elsewhere").exists()  # judged by the bucket: nothing converted or staged


def test_a_damaged_staging_copy_is_converted_again(tmp_path, corpus, tokenizer_path, s3, converted):
    result, stored = converted
    s3.server.client().delete_object(Bucket=s3.name, Key=f"mds/{MANIFEST}")
    shard = next(p for p in (tmp_path / "cache").rglob("shard.*") if p.is_file())
    shard.write_bytes(b"")
    again = _run(corpus, f"{s3.uri}/mds", tokenizer_path, tmp_path / "cache")
    assert again.tokens_this_run == result.tokens_this_run > 0 and s3.keys("mds/") == stored
