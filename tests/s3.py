"""A real S3 API for tests: moto's server mode on 127.0.0.1, reached over HTTP by boto3 and Streaming.

Nothing in the project is patched: the code under test finds the server through ``S3_ENDPOINT_URL``
and dummy credentials in the environment, exactly as it would find any S3-compatible endpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.request
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

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )

    def require_signatures(self) -> dict[str, str]:
        """Turn on moto's IAM authentication and return the environment of a user allowed every s3
        action (its own access key): from now on a wrong key or secret is refused with 403.
        Process-wide in moto: call ``allow_anyone`` when done."""
        iam = self.client("iam")
        iam.create_user(UserName="trainer")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        self._auth(0)
        return {
            **self.env(),
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    def allow_anyone(self) -> None:
        """Turn moto's IAM authentication off again (the default: any credentials are accepted)."""
        self._auth(float("inf"))

    def _auth(self, free_requests: float) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=str(free_requests).encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form body would be parsed away
        )
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(request, timeout=30) as response:
            assert response.status == 200

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

    def put(self, key: str, body: bytes) -> None:
        self.server.client().put_object(Bucket=self.name, Key=key, Body=body)
