"""Started via PYTHONPATH in the MLflow server's processes only: makes every botocore session
send Content-MD5 on DeleteObjects.

Why: MLflow deletes artifacts with S3 DeleteObjects; Swift's s3api requires Content-MD5 there,
which boto3 >= 1.36 no longer sends. The server (and the uvicorn process it spawns) builds its
own boto3 clients, so the hook of ``infra.s3client`` has to be added globally. Never fails the
interpreter: on any problem it does nothing.
"""

try:
    import base64
    import hashlib

    import botocore.handlers

    def _fsad_content_md5(params, **_):
        headers = params.setdefault("headers", {})
        body = params.get("body") or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        if isinstance(body, (bytes, bytearray)) and not any(
                h.lower() == "content-md5" for h in headers):
            headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()

    botocore.handlers.BUILTIN_HANDLERS.append(("before-call.s3.DeleteObjects", _fsad_content_md5))
except Exception:  # noqa: BLE001 - never break interpreter start-up
    pass
