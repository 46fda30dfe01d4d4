"""Object storage (s3://, gs://, oci://, ...): telling a URI from a local folder, checking that it can
be reached before any real work, and uploading a finished output, manifest last.

A finished conversion is judged by its destination (`remote_complete`: the manifest, the indexes and
every shard in the bucket with the recorded sizes), never by a local staging copy alone.
`check_access` makes one request first, so that a wrong bucket or credential is reported as one
line naming what to change instead of a retry loop deep inside an upload. Streaming's uploaders
do the uploading; `streaming` is imported only when one is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.manifest import INDEX, MANIFEST, load_json, write_json_atomic

log = logging.getLogger(__name__)

UPLOADED = ".uploaded.json"  # in a built output: the remote it was uploaded to, once complete


def is_remote(uri: str) -> bool:
    """Whether `uri` names object storage (s3://, gs://, oci://, ...) rather than a local folder."""
    return urllib.parse.urlparse(uri).scheme != ""


def local_cache_dir(kind: str, uri: str) -> Path:
    """A local folder for files of the remote `uri`: <temp dir>/`kind`/<16 hex digits of sha1(uri)>,
    the same in every process and run on this machine."""
    return Path(tempfile.gettempdir()) / kind / hashlib.sha1(uri.encode()).hexdigest()[:16]


def _s3_client():
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("S3_ENDPOINT_URL")
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 2}, connect_timeout=10)
    )


def can_list(uri: str) -> bool:
    """Whether ``remote_complete`` can judge `uri` (s3:// and S3-compatible endpoints)."""
    return urllib.parse.urlparse(uri).scheme == "s3"


def remote_complete(uri: str, recorded_args: dict) -> dict | None:
    """The manifest at s3:// `uri` when the bucket holds a complete output made with `recorded_args`:
    its manifest, each split's index.json and every shard the indexes list, with the recorded sizes.
    None otherwise (nothing there, other arguments, a file missing or of another size)."""
    import json

    from data_prep import mds
    from data_prep.manifest import diff_args

    parsed = urllib.parse.urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    client = _s3_client()
    try:
        sizes = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            sizes.update({o["Key"][len(prefix) :]: o["Size"] for o in page.get("Contents", [])})

        def get(rel: str) -> dict:
            return json.loads(client.get_object(Bucket=bucket, Key=prefix + rel)["Body"].read())

        if MANIFEST not in sizes:
            return None
        manifest = get(MANIFEST)
        if diff_args(manifest.get("args", {}), recorded_args):
            return None
        for split in manifest.get("splits", {}):
            if f"{split}/{INDEX}" not in sizes:
                return None
            for shard in get(f"{split}/{INDEX}").get("shards", []):
                info = mds.stored_file(shard)
                if sizes.get(f"{split}/{info['basename']}") != info["bytes"]:
                    log.info("%s/%s/%s is missing or has another size", uri, split, info["basename"])
                    return None
        return manifest
    finally:
        client.close()


def check_access(uri: str) -> None:
    """Raise DataPrepError unless the bucket of `uri` exists and the credentials may use it.

    s3:// (and any S3-compatible endpoint named by ``S3_ENDPOINT_URL``) is probed with one
    HeadBucket request; other schemes are left to the first real request. The message never
    includes credentials.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3":
        return
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    endpoint = os.environ.get("S3_ENDPOINT_URL")
    where = f"s3://{parsed.netloc}" + (f" at {endpoint}" if endpoint else "")
    client = _s3_client()
    try:
        client.head_bucket(Bucket=parsed.netloc)
    except NoCredentialsError as exc:
        raise DataPrepError(
            f"no credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment"
        ) from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchBucket"):
            raise DataPrepError(f"bucket {where} does not exist: create it or fix the URI {uri}") from exc
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise DataPrepError(
                f"access to {where} denied ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ) from exc
        raise DataPrepError(f"cannot use {where}: {code}") from exc
    except BotoCoreError as exc:
        raise DataPrepError(f"cannot reach {where}: {type(exc).__name__}; check S3_ENDPOINT_URL") from exc
    finally:
        client.close()


def check_remote(uri: str) -> None:
    """Raise ValueError when Streaming has no uploader for the scheme of `uri`."""
    from streaming.base.storage.upload import UPLOADERS

    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in UPLOADERS:
        known = sorted(f"{s}://" for s in UPLOADERS if s and "/" not in s)
        raise ValueError(f"no uploader for {scheme}:// (Streaming supports {', '.join(known)})")


def upload_tree(local_dir: str | os.PathLike, remote: str, *, last: Sequence[str] = (MANIFEST,)) -> list[str]:
    """Upload every file under `local_dir` to `remote` with Streaming's CloudUploader.

    Files named in `last` go after all others, so a remote reader that sees the manifest sees
    complete shards. `remote` may also be a local folder (a stand-in for object storage).
    Returns the uploaded relative paths in upload order.
    """
    from streaming.base.storage.upload import CloudUploader

    files = upload_order(local_dir, last=last)
    uploader = CloudUploader.get((str(local_dir), remote), keep_local=True, exist_ok=True)
    for rel in files:
        if not is_remote(remote):  # LocalUploader copies into existing folders only
            os.makedirs(os.path.dirname(os.path.join(remote, rel)), exist_ok=True)
        uploader.upload_file(rel)
    return files


def upload_order(local_dir: str | os.PathLike, *, last: Sequence[str] = (MANIFEST,)) -> list[str]:
    """Relative paths of the files under `local_dir`: shards first, then indexes, then `last`.

    Hidden bookkeeping files (starting with '.') are not part of the dataset and are left out.
    """
    files = []
    for root, dirs, names in os.walk(local_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                files.append(os.path.relpath(os.path.join(root, name), local_dir))
    rank = {name: i for i, name in enumerate(last)}

    def key(rel: str) -> tuple:
        if rel in rank:
            return (2, rank[rel], "")
        if os.path.basename(rel) == INDEX:  # part indexes before the split index above them
            return (1, -rel.count(os.sep), rel)
        return (0, 0, rel)

    return sorted(files, key=key)


def upload_pending(out_dir: Path, remote: str) -> bool:
    """Whether the finished output in `out_dir` still has to be uploaded to `remote`, for remotes
    that cannot be listed (``can_list``): judged by the marker an upload leaves in `out_dir`."""
    marker = out_dir / UPLOADED
    return not marker.is_file() or load_json(marker).get("remote") != remote


def upload_output(out_dir: Path, remote: str) -> None:
    """Upload the finished output in `out_dir` to `remote` (`upload_tree`) and record that it was."""
    log.info("uploading %s to %s", out_dir, remote)
    upload_tree(out_dir, remote)
    write_json_atomic(out_dir / UPLOADED, {"remote": remote})
