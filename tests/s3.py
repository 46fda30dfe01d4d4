"""A real S3 API for tests: moto's server mode on 127.0.0.1, reached over HTTP by boto3 and Streaming.

Nothing in the project is patched: the code under test finds the server through ``S3_ENDPOINT_URL``
and dummy credentials in the environment, exactly as it would find any S3-compatible endpoint.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

# Dummy credentials; tests grep outputs for SECRET to prove it never leaks.
ACCESS_KEY = "testing-access-key"
SECRET = "testing-secret-Zq81fW3kT0"
REGION = "us-east-1"
_buckets = itertools.count()


@dataclass
class MotoS3:
    """One moto server thread on a free port of 127.0.0.1; ``stop`` ends it (requests then fail)."""

    server: object = field(default=None, repr=False)
    endpoint: str = ""

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def env(self) -> dict[str, str]:
        """The environment a client needs: endpoint, dummy credentials, region; no proxies."""
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name (buckets outlive a test: the server is per session)."""
        name = f"bucket-{os.getpid()}-{next(_buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under `prefix`."""
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return out


@dataclass
class S3Bucket:
    """What the ``s3`` fixture gives a test: the server, one empty bucket and its URI."""

    server: MotoS3
    name: str

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    def keys(self, prefix: str = "") -> dict[str, int]:
        return self.server.keys(self.name, prefix)

    def get(self, key: str) -> bytes:
        return self.server.client().get_object(Bucket=self.name, Key=key)["Body"].read()
