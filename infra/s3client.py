"""A boto3 S3 client that works against OpenStack Swift's s3api middleware.

Why a helper: boto3 >= 1.36 adds CRC checksums (and aws-chunked uploads) by default, which
Swift's s3api rejects, and it no longer sends the ``Content-MD5`` header that s3api requires for
DeleteObjects. Everything here is harmless against AWS S3 or MinIO too.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import boto3
from botocore.config import Config

# Operations for which s3api insists on Content-MD5 (AWS requires "a checksum" for them).
_MD5_OPERATIONS = ("DeleteObjects", "PutBucketLifecycleConfiguration", "PutBucketCors")


def s3_config() -> Config:
    """The botocore ``Config`` for Swift: path style, SigV4, checksums only when required."""
    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 3, "mode": "standard"},
    )


def _add_content_md5(params: dict[str, Any], **_: Any) -> None:
    """botocore ``before-call`` hook: set Content-MD5 from the serialized body if missing."""
    headers = params.setdefault("headers", {})
    if any(name.lower() == "content-md5" for name in headers):
        return
    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        return  # a stream: not the case for the small XML bodies of these operations
    headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode("ascii")


def make_s3_client(endpoint: str | None, key: str | None, secret: str | None,
                   region: str = "us-east-1") -> Any:
    """A boto3 S3 client for ``endpoint`` (None: boto3's default resolution, e.g.
    ``AWS_ENDPOINT_URL``) that works with Swift s3api, MinIO and AWS."""
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint or None,
        aws_access_key_id=key or None,
        aws_secret_access_key=secret or None,
        region_name=region or "us-east-1",
        config=s3_config(),
    )
    for operation in _MD5_OPERATIONS:
        client.meta.events.register(f"before-call.s3.{operation}", _add_content_md5)
    return client
