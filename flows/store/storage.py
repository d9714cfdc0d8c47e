"""Object storage behind one small interface: a local folder or an S3 bucket, same layout.

The pipeline only ever sees keys like ``products/P/uploads/U/train/good/001.png``; which backend
holds them is decided by ``open_store()`` from ``FSAD_STORAGE``. Keys are validated the same way
for both backends so that a key accepted locally is also safe on S3 and can never escape the root.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.config import fsad_home

UPLOADS = "uploads"
PRODUCTS = "products"
QUARANTINE = "quarantine"
MANIFEST_NAME = "manifest.json"
VALIDATION_NAME = "validation.json"
TRAINING_NAME = "training.json"
SPLITS_LABELS = (("train", "good"), ("eval", "good"), ("eval", "defect"))

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UPLOAD_ID_TIME = re.compile(r"(\d{8}T\d{6}Z)(?:-.*)?")
_TMP_SUFFIX = ".fsadtmp"  # reserved: partial local writes, never listed, never a valid key
_MAX_KEY_BYTES = 1024  # the S3 limit
_MAX_SEGMENT_BYTES = 255  # a file name on common file systems (NAME_MAX): a key must fit a local store too


class StorageError(Exception):
    """A storage operation failed; the message names the key or location."""


class StorageKeyError(StorageError, ValueError):
    """A key (or product / upload id) that is not safe to use as an object name."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No object under that key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` unchanged if it is a safe relative object name, else raise StorageKeyError.

    A prefix (``prefix=True``) may be empty or end with ``/``; a key may not.
    """
    if not isinstance(key, str):
        raise StorageKeyError(f"key must be a string, got {type(key).__name__}")
    shown = ascii(key)
    if prefix and key == "":
        return key
    if key == "":
        raise StorageKeyError("empty key")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise StorageKeyError(f"key {shown}: not valid UTF-8 (undecodable file name?)") from None
    if len(encoded) > _MAX_KEY_BYTES:
        raise StorageKeyError(f"key {shown}: longer than {_MAX_KEY_BYTES} bytes")
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise StorageKeyError(f"key {shown}: contains control characters")
    if "\\" in key:
        raise StorageKeyError(f"key {shown}: contains a backslash")
    if key.startswith("/") or re.match(r"[A-Za-z]:", key):
        raise StorageKeyError(f"key {shown}: absolute paths are not allowed")
    segments = key.split("/")
    if prefix and key.endswith("/"):
        segments = segments[:-1]
    for seg in segments:
        if seg == "":
            raise StorageKeyError(f"key {shown}: empty path segment")
        if seg in (".", ".."):
            raise StorageKeyError(f"key {shown}: '{seg}' segments are not allowed")
        if len(seg.encode("utf-8")) > _MAX_SEGMENT_BYTES:
            raise StorageKeyError(f"key {shown}: a name longer than {_MAX_SEGMENT_BYTES} bytes")
    if not prefix and key.endswith(_TMP_SUFFIX):
        raise StorageKeyError(f"key {shown}: the suffix {_TMP_SUFFIX} is reserved")
    return key


class Store(ABC):
    """The storage interface the flows use. Listing returns keys sorted; writes are all-or-nothing."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (plain string prefix, as in S3), sorted by key."""

    @abstractmethod
    def copy(self, src_key: str, dst_key: str) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object (tests, cleanup and a product's training settings; never an upload)."""

    @abstractmethod
    def uri(self, key: str = "") -> str: ...

    def list(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list_info(prefix)]

    def children(self, prefix: str) -> list[str]:
        """Names of the immediate 'sub-folders' under ``prefix`` (which must end with '/')."""
        names = {k[len(prefix):].split("/", 1)[0] for k in self.list(prefix) if "/" in k[len(prefix):]}
        return sorted(names)

    def put_json(self, key: str, obj: Any) -> None:
        data = json.dumps(obj, indent=2, sort_keys=False).encode("utf-8") + b"\n"
        self.put_bytes(key, data, content_type="application/json")

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{self.uri(key)}: not valid JSON ({exc})") from None


class LocalStore(Store):
    """A folder as an object store: atomic writes (temp file + os.replace), keys confined to root.

    Temporary names are short and fixed in length (``.XXXXXXXX.fsadtmp``), so any key that passes
    `validate_key` can be written: a long file name never fails half-way through an upload."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._real_root = self.root.resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str, *, prefix: bool = False) -> Path:
        validate_key(key, prefix=prefix)
        path = (self._real_root / key).resolve()
        if path != self._real_root and not path.is_relative_to(self._real_root):
            raise StorageKeyError(f"key {ascii(key)}: resolves outside the store root")
        return path

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._path(key)  # re-check: a symlinked parent created meanwhile must not escape
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=_TMP_SUFFIX)
        except OSError as exc:
            raise StorageError(f"{self.uri(key)}: cannot write ({exc.strerror or exc})") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"{self.uri(key)}: cannot write ({exc.strerror or exc})") from None
            raise

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri(key)}: no such object") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        validate_key(prefix, prefix=True)
        # Walk the deepest folder the prefix names; filter by plain string prefix like S3 does.
        base_rel = prefix if prefix.endswith("/") or prefix == "" else prefix.rpartition("/")[0]
        base = self._path(base_rel, prefix=True) if base_rel else self._real_root
        out: list[ObjectInfo] = []
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self._real_root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except OSError:
                    continue  # vanished meanwhile or a dangling link
                out.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        out.sort(key=lambda o: o.key)
        return out

    def copy(self, src_key: str, dst_key: str) -> None:
        src, dst = self._path(src_key), self._path(dst_key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri(src_key)}: no such object")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".", suffix=_TMP_SUFFIX)
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"copy {self.uri(src_key)} -> {self.uri(dst_key)} failed "
                               f"({exc.strerror or exc})") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)


class S3Store(Store):
    """An S3 bucket (optionally under a prefix). Settings suit Swift's s3api as well as AWS."""

    def __init__(self, bucket: str, prefix: str = "", client: Any | None = None):
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        validate_key(self.prefix, prefix=True)
        self.client = client if client is not None else make_s3_client()
        self.transfer = TransferConfig(multipart_threshold=8 * 1024 * 1024,
                                       multipart_chunksize=8 * 1024 * 1024, max_concurrency=4)

    def __repr__(self) -> str:
        return f"S3Store({self.uri()!r})"

    def _k(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @staticmethod
    def _is_missing(exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        if self._is_missing(exc):
            return ObjectNotFound(f"{self.uri(key)}: no such object")
        return StorageError(f"{what} {self.uri(key)} failed: {exc}")

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else None
        k = self._k(key)
        try:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, k,
                                       ExtraArgs=extra, Config=self.transfer)
        except Exception as exc:  # botocore/boto3 raise several unrelated types
            raise self._fail("put", key, exc) from None

    def get_bytes(self, key: str) -> bytes:
        buf, k = io.BytesIO(), self._k(key)
        try:
            self.client.download_fileobj(self.bucket, k, buf, Config=self.transfer)
        except Exception as exc:
            raise self._fail("get", key, exc) from None
        return buf.getvalue()

    def exists(self, key: str) -> bool:
        k = self._k(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=k)
            return True
        except Exception as exc:
            if self._is_missing(exc):
                return False
            raise self._fail("head", key, exc) from None

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        validate_key(prefix, prefix=True)
        out: list[ObjectInfo] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]), obj["LastModified"]))
        except Exception as exc:
            raise StorageError(f"list {self.uri(prefix)} failed: {exc}") from None
        out.sort(key=lambda o: o.key)
        return out

    def children(self, prefix: str) -> list[str]:
        validate_key(prefix, prefix=True)
        names: set[str] = set()
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix + prefix, Delimiter="/"):
                for cp in page.get("CommonPrefixes", []):
                    names.add(cp["Prefix"][len(self.prefix + prefix):].rstrip("/"))
        except Exception as exc:
            raise StorageError(f"list {self.uri(prefix)} failed: {exc}") from None
        return sorted(names)

    def copy(self, src_key: str, dst_key: str) -> None:
        src, dst = self._k(src_key), self._k(dst_key)
        try:
            self.client.copy({"Bucket": self.bucket, "Key": src}, self.bucket, dst, Config=self.transfer)
        except Exception as exc:
            raise self._fail("copy", src_key, exc) from None

    def delete(self, key: str) -> None:
        k = self._k(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=k)
        except Exception as exc:
            raise self._fail("delete", key, exc) from None

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"


def make_s3_client() -> Any:
    """A boto3 S3 client from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
    configured by infra.s3client for Swift's s3api (path style, checksums only when required)."""
    from infra.s3client import make_s3_client as _make

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _make(None, None, None, region)


def default_storage_url(env: Mapping[str, str] = os.environ) -> str:
    """``FSAD_STORAGE``, else the fsad home's ``store`` folder."""
    return env.get("FSAD_STORAGE") or str(fsad_home(env=env) / "store")


def open_store(url: str | None = None) -> Store:
    """``s3://BUCKET[/prefix]`` gives an S3Store, anything else a LocalStore folder."""
    url = url or default_storage_url()
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"storage URL {url!r}: missing bucket name")
        return S3Store(bucket, prefix)
    if "://" in url and not url.startswith("file://"):
        raise StorageError(f"storage URL {url!r}: only folders and s3://BUCKET are supported")
    return LocalStore(url.removeprefix("file://"))


# ---- layout: products/P/uploads/U/..., products/P/training.json, quarantine/P/U/... ----------

def validate_name(value: str, what: str = "name") -> str:
    """Product names and upload ids: 1-64 of [A-Za-z0-9._-], starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise StorageKeyError(f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
                              f"starting with a letter or digit")
    return value


def uploads_prefix(product: str) -> str:
    return f"{PRODUCTS}/{validate_name(product, 'product name')}/{UPLOADS}/"


def upload_prefix(product: str, upload_id: str) -> str:
    """``products/P/uploads/U/`` (with the trailing slash, ready for listing)."""
    return f"{uploads_prefix(product)}{validate_name(upload_id, 'upload id')}/"


def image_key(product: str, upload_id: str, split: str, label: str, filename: str) -> str:
    if (split, label) not in SPLITS_LABELS:
        raise StorageKeyError(f"unknown split/label {split}/{label}: use train/good, eval/good or eval/defect")
    if "/" in filename:
        raise StorageKeyError(f"file name {ascii(filename)} must not contain '/'")
    return validate_key(f"{upload_prefix(product, upload_id)}{split}/{label}/{filename}")


def train_key(product: str, upload_id: str, filename: str) -> str:
    return image_key(product, upload_id, "train", "good", filename)


def manifest_key(product: str, upload_id: str) -> str:
    return upload_prefix(product, upload_id) + MANIFEST_NAME


def validation_key(product: str, upload_id: str) -> str:
    return upload_prefix(product, upload_id) + VALIDATION_NAME


def training_key(product: str) -> str:
    """``products/P/training.json``: the product's own training settings, over FSAD_TRAIN_OVERRIDES."""
    return f"{PRODUCTS}/{validate_name(product, 'product name')}/{TRAINING_NAME}"


def quarantine_prefix(product: str, upload_id: str) -> str:
    """``quarantine/P/U/``: where a rejected upload is copied (never moved)."""
    return f"{QUARANTINE}/{validate_name(product, 'product name')}/{validate_name(upload_id, 'upload id')}/"


# ---- discovery -----------------------------------------------------------------------------

@dataclass(frozen=True)
class UploadInfo:
    product: str
    upload_id: str
    complete: bool  # manifest.json present
    created: datetime | None  # from the upload id's timestamp, None for foreign ids
    last_modified: datetime | None  # newest object of the upload
    n_objects: int


def upload_id_time(upload_id: str) -> datetime | None:
    """The UTC time encoded in an upload id (``20261129T101500Z-ab12cd``), or None."""
    m = _UPLOAD_ID_TIME.fullmatch(upload_id)
    if not m:
        return None
    try:
        return datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def list_uploads(store: Store, product: str) -> list[UploadInfo]:
    """All uploads of a product, oldest first (upload ids sort by time), from one listing."""
    base = uploads_prefix(product)
    groups: dict[str, list[ObjectInfo]] = {}
    for obj in store.list_info(base):
        upload_id, sep, _ = obj.key[len(base):].partition("/")
        if sep and _NAME_RE.fullmatch(upload_id):
            groups.setdefault(upload_id, []).append(obj)
    uploads = []
    for upload_id, objs in groups.items():
        complete = any(o.key == base + upload_id + "/" + MANIFEST_NAME for o in objs)
        newest = max((o.last_modified for o in objs), default=None)
        uploads.append(UploadInfo(product, upload_id, complete, upload_id_time(upload_id), newest, len(objs)))
    uploads.sort(key=lambda u: u.upload_id)
    return uploads


def latest_complete_upload(store: Store, product: str) -> UploadInfo | None:
    complete = [u for u in list_uploads(store, product) if u.complete]
    return complete[-1] if complete else None


def list_products(store: Store) -> list[str]:
    return [p for p in store.children(f"{PRODUCTS}/") if _NAME_RE.fullmatch(p)]


def stale_incomplete_uploads(store: Store, product: str, older_than_s: float,
                             now: datetime | None = None) -> list[UploadInfo]:
    """Uploads without a manifest whose newest object is older than ``older_than_s``.

    Only reported: an interrupted upload is evidence, so nothing is deleted here.
    """
    now = now or datetime.now(UTC)
    stale = []
    for u in list_uploads(store, product):
        when = u.last_modified or u.created
        if not u.complete and when is not None and (now - when).total_seconds() > older_than_s:
            stale.append(u)
    return stale
