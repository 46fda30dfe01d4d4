"""Training against a real S3 API (moto's server on 127.0.0.1, fixture ``s3``): data read from the
bucket through a node-local cache, checkpoints written to and resumed from the bucket.

Every byte goes through boto3 and HTTP; nothing in the project is patched.
"""

from __future__ import annotations

import pytest

from data_prep import mds
from pipeline.trainer import ConfigError, load_config
from pipeline.trainer.run_inputs import resolve_run_inputs
from tests.pipeline.train.conftest import YAMLS, tiny_overrides
from tests.pipeline.train.launch import launch, records


def test_missing_bucket_or_credentials_is_a_config_error_before_any_model(
    tiny_data, tmp_path, s3, monkeypatch
):
    data, tok = tiny_data

    def inputs(remote):
        overrides = tiny_overrides(data, tok, tmp_path / "ckpt", f"variables.data_remote={remote}")
        cfg = load_config(YAMLS / "bd3_tiny.yaml", [*overrides, f"variables.data_local={tmp_path / 'cache'}"])
        return resolve_run_inputs(cfg)

    with pytest.raises(
        ConfigError,
        match=r"train_loader.remote.*bucket s3://no-such-bucket at http://127.0.0.1:\d+ does not exist",
    ):
        inputs("s3://no-such-bucket/owt")
    mds.upload_tree(data, f"{s3.uri}/owt")
    assert inputs(f"{s3.uri}/owt")  # the same config with the right bucket passes
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="train_loader.remote.*no credentials"):
        inputs(f"{s3.uri}/owt")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_on_remote_data_train_exactly_like_on_the_local_copy(tiny_data, tmp_path, s3):
    data, _ = tiny_data
    mds.upload_tree(data, f"{s3.uri}/owt")
    cache = tmp_path / "cache"
    launch(tiny_data, tmp_path / "local")
    launch(
        tiny_data,
        tmp_path / "remote",
        f"variables.data_remote={s3.uri}/owt",
        f"variables.data_local={cache}",
    )
    local, remote = records(tmp_path / "local" / "loss.jsonl"), records(tmp_path / "remote" / "loss.jsonl")
    assert [r["batch"] for r in remote] == list(range(1, 21))
    assert [r["loss/train/total"] for r in remote] == [r["loss/train/total"] for r in local]
    # The run read the bucket: the shards it trained on are now in the (empty before) node cache.
    index = mds.read_index(data / "train")
    assert all((cache / "train" / mds.stored_file(s)["basename"]).is_file() for s in index["shards"])
