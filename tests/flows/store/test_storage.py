"""Store interface, key safety, atomic writes, layout helpers and upload discovery (no services)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.store import storage
from flows.store.storage import (
    LocalStore,
    ObjectNotFound,
    S3Store,
    StorageError,
    StorageKeyError,
    latest_complete_upload,
    list_products,
    list_uploads,
    manifest_key,
    open_store,
    quarantine_prefix,
    stale_incomplete_uploads,
    train_key,
    upload_id_time,
    upload_prefix,
    validation_key,
)

HOSTILE_KEYS = [
    "", "../escape.txt", "a/../../escape.txt", "a/..", "./a", "/etc/passwd", "//x", "a//b", "a/",
    "a\\..\\escape.txt", "a\x00b", "a\nb", "a\tb", "a\x7fb", "a\x85b", "C:/x", "c:x",
    os.fsdecode(b"bad\xff.png"), "x" * 1100, "obj.fsadtmp", "a/" + "n" * 252 + ".png",
]


def _outside_files(tmp_path: Path, root: Path) -> set[Path]:
    return {p for p in tmp_path.rglob("*") if root not in p.parents and p != root}


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "root")


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=ascii)
def test_hostile_keys_rejected_everywhere(store: LocalStore, tmp_path: Path, key: str) -> None:
    before = _outside_files(tmp_path, store.root)
    for op in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.exists(key),
               lambda: store.copy(key, "ok"), lambda: store.copy("ok", key), lambda: store.delete(key)):
        with pytest.raises(StorageKeyError):
            op()
    assert _outside_files(tmp_path, store.root) == before
    assert store.list() == []


def test_a_name_as_long_as_a_file_system_allows_is_written_and_copied(store: LocalStore) -> None:
    """255 bytes (NAME_MAX): the temporary name beside it must not be longer than any name."""
    key = "a/" + "n" * 251 + ".png"
    store.put_bytes(key, b"x")
    store.copy(key, "b/" + key[2:])
    assert store.list() == [key, "b/" + key[2:]] and store.get_bytes("b/" + key[2:]) == b"x"


def test_key_error_is_one_line_and_ascii(store: LocalStore) -> None:
    with pytest.raises(StorageKeyError) as info:
        store.put_bytes(os.fsdecode(b"bad\xff\n.png"), b"x")
    assert "\n" not in str(info.value) and str(info.value).isascii()


def test_symlink_cannot_escape_root(store: LocalStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StorageKeyError):
        store.put_bytes("link/x.bin", b"x")
    with pytest.raises(StorageKeyError):
        store.get_bytes("link/x.bin")
    assert list(outside.iterdir()) == []


def test_roundtrip_list_copy_delete(store: LocalStore) -> None:
    store.put_bytes("b/2.bin", b"two")
    store.put_bytes("a/1.bin", b"one", content_type="application/octet-stream")
    store.put_bytes("ab.bin", b"ab")
    assert store.get_bytes("a/1.bin") == b"one"
    assert store.exists("a/1.bin") and not store.exists("a/9.bin") and not store.exists("a")
    assert store.list() == ["a/1.bin", "ab.bin", "b/2.bin"]
    assert store.list("a/") == ["a/1.bin"]
    assert store.list("a") == ["a/1.bin", "ab.bin"]  # plain string prefix, as in S3
    assert store.list("nothing/") == []
    assert store.children("") == ["a", "b"]
    store.copy("a/1.bin", "c/d/1.bin")
    assert store.get_bytes("c/d/1.bin") == b"one" and store.exists("a/1.bin")
    store.delete("c/d/1.bin")
    assert not store.exists("c/d/1.bin")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("c/d/1.bin")
    with pytest.raises(ObjectNotFound):
        store.copy("nope", "x")
    store.put_json("j.json", {"a": [1]})
    assert store.get_json("j.json") == {"a": [1]}
    store.put_bytes("bad.json", b"{")
    with pytest.raises(StorageError, match="not valid JSON"):
        store.get_json("bad.json")
    assert store.uri("a/1.bin").endswith("root/a/1.bin")


def test_put_is_atomic(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put_bytes("k.bin", b"old")

    def fail(*_a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", fail)
    with pytest.raises(StorageError, match="No space left"):
        store.put_bytes("k.bin", b"new-but-never-visible")
    monkeypatch.undo()
    assert store.get_bytes("k.bin") == b"old"
    assert sorted(p.name for p in store.root.iterdir()) == ["k.bin"]  # temp file cleaned up


def test_temp_files_never_listed(store: LocalStore) -> None:
    store.put_bytes("d/a.bin", b"a")
    (store.root / "d" / ".a.bin.123.fsadtmp").write_bytes(b"half")
    assert store.list() == ["d/a.bin"]


def test_open_store_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSAD_STORAGE", raising=False)
    monkeypatch.setenv("FSAD_HOME", str(tmp_path / "home"))
    s = open_store()
    assert isinstance(s, LocalStore) and s.root == tmp_path / "home" / "store"
    monkeypatch.setenv("FSAD_STORAGE", str(tmp_path / "elsewhere"))
    assert open_store().root == tmp_path / "elsewhere"  # type: ignore[attr-defined]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    s3 = open_store("s3://bucket/some/prefix")
    assert isinstance(s3, S3Store) and s3.uri("k") == "s3://bucket/some/prefix/k"
    assert s3.client.meta.config.s3["addressing_style"] == "path"
    with pytest.raises(StorageError):
        open_store("s3://")
    with pytest.raises(StorageError):
        open_store("gs://bucket")


class _FakeS3:
    """The few client calls S3Store makes, over a dict (no network)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    @staticmethod
    def _missing() -> Exception:
        from botocore.exceptions import ClientError
        return ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")

    def upload_fileobj(self, fh, bucket, key, ExtraArgs=None, Config=None):  # noqa: N803
        self.objects[key] = fh.read()

    def download_fileobj(self, bucket, key, fh, Config=None):  # noqa: N803
        if key not in self.objects:
            raise self._missing()
        fh.write(self.objects[key])

    def head_object(self, Bucket, Key):  # noqa: N803
        if Key not in self.objects:
            raise self._missing()
        return {}

    def copy(self, src, bucket, key, Config=None):  # noqa: N803
        if src["Key"] not in self.objects:
            raise self._missing()
        self.objects[key] = self.objects[src["Key"]]

    def delete_object(self, Bucket, Key):  # noqa: N803
        self.objects.pop(Key, None)

    def get_paginator(self, name):
        fake = self

        class P:
            def paginate(self, Bucket, Prefix, Delimiter=None):  # noqa: N803
                keys = sorted(k for k in fake.objects if k.startswith(Prefix))
                if Delimiter:
                    cps = sorted({Prefix + k[len(Prefix):].split("/")[0] + "/" for k in keys if "/" in k[len(Prefix):]})
                    yield {"CommonPrefixes": [{"Prefix": p} for p in cps]}
                    return
                yield {"Contents": [{"Key": k, "Size": len(fake.objects[k]),
                                     "LastModified": datetime.now(UTC)} for k in keys]}
        return P()


def test_s3store_maps_keys_under_prefix_and_validates() -> None:
    fake = _FakeS3()
    s3 = S3Store("b", "pre/", client=fake)
    s3.put_bytes("products/p/x.bin", b"x")
    assert fake.objects == {"pre/products/p/x.bin": b"x"}
    assert s3.get_bytes("products/p/x.bin") == b"x"
    assert s3.exists("products/p/x.bin") and not s3.exists("nope")
    assert s3.list("products/") == ["products/p/x.bin"]
    assert s3.children("products/") == ["p"]
    with pytest.raises(ObjectNotFound):
        s3.get_bytes("nope")
    with pytest.raises(StorageKeyError):
        s3.put_bytes("../x", b"x")
    s3.copy("products/p/x.bin", "q/x.bin")
    s3.delete("products/p/x.bin")
    assert s3.list() == ["q/x.bin"]


def test_layout_helpers_and_names() -> None:
    assert upload_prefix("bottle", "u1") == "products/bottle/uploads/u1/"
    assert train_key("bottle", "u1", "001.png") == "products/bottle/uploads/u1/train/good/001.png"
    assert manifest_key("bottle", "u1").endswith("/u1/manifest.json")
    assert validation_key("bottle", "u1").endswith("/u1/validation.json")
    assert quarantine_prefix("bottle", "u1") == "quarantine/bottle/u1/"
    for bad in ("", "../x", "a/b", "-x", ".x", "a b", "x" * 65, "é"):
        with pytest.raises(StorageKeyError):
            upload_prefix(bad, "u1")
        with pytest.raises(StorageKeyError):
            upload_prefix("p", bad)
    with pytest.raises(StorageKeyError):
        train_key("p", "u", "a/b.png")
    assert upload_id_time("20261129T101500Z-ab12cd") == datetime(2026, 11, 29, 10, 15, tzinfo=UTC)
    assert upload_id_time("manual-1") is None


def test_upload_discovery(store: LocalStore) -> None:
    ids = ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc"]
    for uid in ids:
        store.put_bytes(train_key("p", uid, "a.png"), b"x")
    for uid in ids[:2]:
        store.put_bytes(manifest_key("p", uid), b"{}")
    store.put_bytes(train_key("q", ids[0], "a.png"), b"x")
    ups = list_uploads(store, "p")
    assert [u.upload_id for u in ups] == ids
    assert [u.complete for u in ups] == [True, True, False]
    assert ups[0].created == datetime(2026, 1, 1, tzinfo=UTC) and ups[0].n_objects == 2
    assert latest_complete_upload(store, "p").upload_id == ids[1]  # type: ignore[union-attr]
    assert latest_complete_upload(store, "nobody") is None
    assert list_products(store) == ["p", "q"]
    later = datetime.now(UTC) + timedelta(hours=2)
    stale = stale_incomplete_uploads(store, "p", older_than_s=3600, now=later)
    assert [u.upload_id for u in stale] == [ids[2]]
    assert stale_incomplete_uploads(store, "p", older_than_s=3600) == []  # just written: not stale
    assert store.exists(train_key("p", ids[2], "a.png"))  # reported, never deleted

