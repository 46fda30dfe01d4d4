"""Object storage reachability: one request before any real work, so a wrong bucket or credential
is reported as one line naming what to change instead of a retry loop deep inside an upload."""

from __future__ import annotations

import os
import urllib.parse

from data_prep.errors import DataPrepError


def check_access(uri: str) -> None:
    """Raise DataPrepError unless the bucket of `uri` exists and the credentials may use it.

    s3:// (and any S3-compatible endpoint named by ``S3_ENDPOINT_URL``) is probed with one
    HeadBucket request; other schemes are left to the first real request. The message never
    includes credentials.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3":
        return
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    endpoint = os.environ.get("S3_ENDPOINT_URL")
    where = f"s3://{parsed.netloc}" + (f" at {endpoint}" if endpoint else "")
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 2}, connect_timeout=10)
    )
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
