"""An S3-compatible server (moto's server mode) on a loopback port, started by the tests.

One server a session; each test gets a bucket of its own and the AWS environment that points
both this process and its children at the server (never at AWS: the credentials are fake).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
boto3 = pytest.importorskip("boto3", reason="boto3 is in the test extra")


@dataclass(frozen=True)
class S3:
    """A bucket on the test server and the environment that reaches it."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def uri(self, prefix: str = "harvest") -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{prefix}"

    def client(self) -> Any:
        """A boto3 client on the server."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix``, sorted."""
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The moto server's URL, for the whole session."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3:
    """A fresh bucket, with the AWS environment set for this process and its children."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"harvest-{uuid.uuid4().hex[:12]}"
    s3 = S3(s3_endpoint, bucket, env)
    s3.client().create_bucket(Bucket=bucket)
    return s3
