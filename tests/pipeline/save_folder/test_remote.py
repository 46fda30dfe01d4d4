"""A save_folder in a bucket (``pipeline.save_folder.remote``, ``repair``) on the moto S3 server;
training runs against it are in tests/pipeline/trainer/test_object_storage.py."""

from __future__ import annotations

import pytest

from pipeline.save_folder import (
    fetch_save_folder,
    remote_checkpoints,
    repair_remote_save_folder,
    rotate_remote_checkpoints,
)


def test_sharded_checkpoint_folders_are_listed_rotated_repaired_and_fetched(s3, tmp_path):
    """FSDP sharded checkpoints in a bucket (a folder of objects per batch): the latest symlink names
    a folder; a killed run's newer folder (one shard, no .metadata) is removed by the start-up repair,
    rotation deletes every object of the older folder, and the fetch copies the whole latest folder."""
    client, run = s3.server.client(), "runs/fsdp"
    shards = {
        f"{b}/{f}": f"{b}:{f}"
        for b in ("ep0-ba5", "ep0-ba10")
        for f in ("__0_0.distcp", "__1_0.distcp", ".metadata")
    }
    objects = {
        **shards,
        "ep0-ba15/__1_0.distcp": "killed",
        "hf_config.json": "{}",
        "latest-rank0.pt.symlink": f"{run}/ep0-ba10",
    }
    for name, body in objects.items():
        client.put_object(Bucket=s3.name, Key=f"{run}/{name}", Body=body.encode())
    uri = f"{s3.uri}/{run}"
    assert remote_checkpoints(uri) == (
        {5: f"{run}/ep0-ba5/", 10: f"{run}/ep0-ba10/", 15: f"{run}/ep0-ba15/"},
        10,
    )
    assert repair_remote_save_folder(uri) == [15]
    assert rotate_remote_checkpoints(uri, keep=1) == [5]
    left = {k[len(run) + 1 :] for k in s3.keys(f"{run}/")}
    assert left == {
        "ep0-ba10/__0_0.distcp",
        "ep0-ba10/__1_0.distcp",
        "ep0-ba10/.metadata",
        "hf_config.json",
        "latest-rank0.pt.symlink",
    }
    local = fetch_save_folder(uri, cache=tmp_path / "copy")
    assert (local / "latest-rank0.pt").resolve() == local / "ep0-ba10"
    assert {p.name: p.read_text() for p in (local / "ep0-ba10").iterdir()} == {
        f: f"ep0-ba10:{f}" for f in ("__0_0.distcp", "__1_0.distcp", ".metadata")
    }
    with pytest.raises(FileNotFoundError, match="no checkpoint of batch 5"):
        fetch_save_folder(uri, cache=tmp_path / "copy5", batch=5)
