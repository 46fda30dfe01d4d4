"""Uploading a finished output: every file, the manifest last."""

from data_prep.remote import upload_tree


def test_upload_tree_copies_everything_manifest_last(tmp_path):
    local = tmp_path / "local"
    for rel in (
        "manifest.json",
        "train/index.json",
        "train/part-00000/index.json",
        "train/part-00000/shard.00000.mds",
    ):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(rel)
    (local / ".uploaded.json").write_text("{}")
    order = upload_tree(local, str(tmp_path / "remote"))
    assert order == [
        "train/part-00000/shard.00000.mds",
        "train/part-00000/index.json",
        "train/index.json",
        "manifest.json",
    ]
    assert all((tmp_path / "remote" / rel).read_text() == rel for rel in order)
