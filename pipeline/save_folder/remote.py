"""A save_folder in object storage (s3://, gs://, oci://): listing, upload, fetch and rotation.

The bucket holds the names of a local save_folder as objects. Composer uploads
``latest-rank0.pt.symlink`` (its text: the key of the newest checkpoint) only once every file of that
checkpoint exists remotely, so the symlink never names a partial checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from data_prep.remote import local_cache_dir
from pipeline.save_folder.layout import (
    DS_SUBDIR,
    LATEST,
    LATEST_ANY_RANK,
    MODEL_CONFIG_FILE,
    REMOTE_LATEST,
    RUN_CONFIG_FILE,
    TOKENIZER_FILE,
    batch_of,
    ds_batch,
    ds_folder,
    ds_tag,
    is_remote,
    partial_file,
    sharded_batch_of,
)


def _object_store(uri: str):
    """(Composer object store of ``uri``'s bucket, the key prefix of ``uri`` without a trailing '/')."""
    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    return maybe_create_object_store_from_uri(uri), parse_uri(uri)[2].strip("/")


def remote_checkpoints(uri: str) -> tuple[dict[int, str], int | None]:
    """({batch: object key} of the Composer checkpoints under ``uri``, the batch its latest symlink names).

    A monolithic checkpoint is the key of its file; an FSDP sharded one is the key prefix of its
    folder, ending in ``/`` (``runs/x/ep0-ba10/``: a shard per rank and ``.metadata``), listed as soon
    as any of its objects exists. The latest is None when no symlink exists yet (no checkpoint is
    known to be complete): Composer uploads the symlink only after every file it names.
    """
    store, prefix = _object_store(uri)
    try:
        keys = store.list_objects(f"{prefix}/")
        found = {}
        for key in keys:
            rel = key[len(prefix) + 1 :]
            if "/" not in rel and batch_of(rel) is not None:
                found[batch_of(rel)] = key
            elif "/" in rel and sharded_batch_of(rel.split("/", 1)[0]) is not None:
                folder = rel.split("/", 1)[0]
                found[sharded_batch_of(folder)] = f"{prefix}/{folder}/"
        latest = None
        if f"{prefix}/{REMOTE_LATEST}" in keys:
            with tempfile.TemporaryDirectory() as tmp:
                store.download_object(f"{prefix}/{REMOTE_LATEST}", f"{tmp}/latest")
                named = Path(Path(f"{tmp}/latest").read_text().strip()).name
                latest = batch_of(named) if batch_of(named) is not None else sharded_batch_of(named)
        return found, latest
    finally:
        store.close()


def fetch_save_folder(uri: str, cache: str | Path | None = None, batch: int | None = None) -> Path:
    """A local copy of what loading a remote ``save_folder`` needs: its model and run configs, its
    tokenizer and the checkpoint of ``batch`` (default: the one the latest symlink names, never a
    partial upload): Composer's file or FSDP shards, and the DeepSpeed partitions of that batch.

    The copy goes to ``cache`` (default: a folder under the temp dir named after ``uri``) and is laid
    out like a local save_folder, with ``latest-rank0.pt`` pointing at the fetched checkpoint.
    """
    found, latest = remote_checkpoints(uri)
    batch = latest if batch is None else batch
    if batch is None or batch not in found:
        what = (
            "no complete checkpoint (no latest symlink)"
            if batch is None
            else f"no checkpoint of batch {batch}"
        )
        raise FileNotFoundError(f"{uri} holds {what}; batches there: {sorted(found)}")
    local = Path(cache) if cache else local_cache_dir("pipeline-checkpoints", uri)
    local.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(found[batch]).name
    store, prefix = _object_store(uri)
    try:
        keys = store.list_objects(f"{prefix}/")
        for name in (MODEL_CONFIG_FILE, RUN_CONFIG_FILE, TOKENIZER_FILE):
            if f"{prefix}/{name}" in keys:
                store.download_object(f"{prefix}/{name}", str(local / name), overwrite=True)
        if found[batch].endswith("/"):  # FSDP sharded: every rank's shard and the metadata
            (local / checkpoint).mkdir(exist_ok=True)
            for key in keys:
                if key.startswith(found[batch]):
                    store.download_object(
                        key, str(local / checkpoint / key[len(found[batch]) :]), overwrite=True
                    )
        else:
            store.download_object(found[batch], str(local / checkpoint), overwrite=True)
        has_partitions = any(k.startswith(f"{prefix}/{DS_SUBDIR}/{ds_tag(batch)}/") for k in keys)
    finally:
        store.close()
    if has_partitions:  # DeepSpeed: every rank's partition of that batch
        download_ds_tag(uri, ds_tag(batch), ds_folder(local))
    tmp_link = local / partial_file(f"{LATEST}.{os.getpid()}")  # ranks of one eval may fetch at once
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(checkpoint)
    os.replace(tmp_link, local / LATEST)
    return local


def local_checkpoint(path: str | Path, batch: int | None = None) -> Path:
    """``path`` itself when local; for a remote save_folder, its fetched local copy (``fetch_save_folder``)."""
    return fetch_save_folder(str(path), batch=batch) if is_remote(path) else Path(path)


def remove_autoresume_copy(uri: str) -> None:
    """Remove the local copy of the latest checkpoint that Composer's autoresume downloads for a
    remote save_folder into ``os.path.abspath(uri)`` (``./s3:/bucket/...`` under the working
    directory), and the folders it made. A copy left there by an earlier run would be loaded instead
    of the bucket's newer latest checkpoint."""
    folder = Path(os.path.abspath(uri))
    for file in folder.glob(LATEST_ANY_RANK):
        file.unlink(missing_ok=True)
    root = Path(os.path.abspath(uri.split("://", 1)[0] + ":"))  # ./s3:
    while folder != root and root in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
    if folder == root and root.is_dir() and not any(root.iterdir()):
        shutil.rmtree(root, ignore_errors=True)


def upload_files(uri: str, folder: str | Path, under: str = "") -> None:
    """Upload the files of ``folder`` into the remote save_folder ``uri``, below ``under`` (e.g.
    ``deepspeed/ba10``); each returns once its object exists."""
    files = sorted(f for f in Path(folder).iterdir() if f.is_file())
    upload_paths(uri, {f"{under}/{f.name}".lstrip("/"): f for f in files})


def upload_paths(uri: str, files: dict[str, Path]) -> None:
    """Upload each local file of ``files`` ({name below ``uri``: path}) into the remote save_folder ``uri``."""
    store, prefix = _object_store(uri)
    try:
        for name, file in files.items():
            store.upload_object(f"{prefix}/{name}", str(file))
    finally:
        store.close()


def upload_ds_tag(uri: str, local_ds_dir: str | Path, tag: str) -> None:
    """Upload this rank's files of the DeepSpeed tag ``local_ds_dir/tag`` to ``uri``'s ``deepspeed/{tag}/``."""
    upload_files(uri, Path(local_ds_dir) / tag, under=f"{DS_SUBDIR}/{tag}")


def remote_ds_tag_files(uri: str, tag: str) -> list[str]:
    """The file names of ``uri``'s DeepSpeed tag ``deepspeed/{tag}/`` (empty: no such tag)."""
    store, prefix = _object_store(uri)
    try:
        return [key.rsplit("/", 1)[1] for key in store.list_objects(f"{prefix}/{DS_SUBDIR}/{tag}/")]
    finally:
        store.close()


def download_ds_tag(uri: str, tag: str, local_ds_dir: str | Path, wanted=lambda name: True) -> Path:
    """Download the objects of ``uri``'s ``deepspeed/{tag}/`` that ``wanted`` accepts into ``local_ds_dir/tag``."""
    store, prefix = _object_store(uri)
    out = Path(local_ds_dir) / tag
    out.mkdir(parents=True, exist_ok=True)
    try:
        for key in store.list_objects(f"{prefix}/{DS_SUBDIR}/{tag}/"):
            name = key.rsplit("/", 1)[1]
            if wanted(name):
                store.download_object(key, str(out / name), overwrite=True)
    finally:
        store.close()
    return out


def rotate_remote_checkpoints(uri: str, keep: int) -> list[int]:
    """Delete the remote Composer checkpoints older than the ``keep`` newest complete ones, with their
    DeepSpeed partitions, and partitions of older batches left by killed runs (s3:// only).

    Complete means: at or before the batch the latest symlink names; newer ones may still be
    uploading and are never touched. Returns the deleted Composer checkpoints' batches.
    """
    if keep <= 0 or not uri.startswith("s3://"):
        return []
    found, latest = remote_checkpoints(uri)
    if latest is None:
        return []
    complete = sorted(b for b in found if b <= latest)
    doomed = complete[: max(0, len(complete) - keep)]
    kept = set(complete) - set(doomed)
    delete_remote(uri, found, lambda b: b in doomed, lambda b: b < latest and b not in kept)
    return doomed


def delete_remote(uri: str, found: dict[int, str], composer_batch, ds_batch_) -> list[int]:
    """Delete the Composer checkpoints (``found``) whose batch ``composer_batch`` accepts and the
    DeepSpeed partition objects whose batch ``ds_batch_`` accepts; returns the batches touched."""
    store, prefix = _object_store(uri)
    touched = {b for b in found if composer_batch(b)}
    try:
        keys = []
        for b in sorted(touched):  # an FSDP sharded checkpoint is every object under its folder
            keys += store.list_objects(found[b]) if found[b].endswith("/") else [found[b]]
        for key in store.list_objects(f"{prefix}/{DS_SUBDIR}/"):
            batch = ds_batch(key[len(prefix) + len(DS_SUBDIR) + 2 :].split("/", 1)[0])
            if batch is not None and ds_batch_(batch):
                keys.append(key)
                touched.add(batch)
        for key in keys:
            store.client.delete_object(Bucket=store.bucket, Key=key)
    finally:
        store.close()
    return sorted(touched)
