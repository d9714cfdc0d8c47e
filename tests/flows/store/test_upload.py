"""upload_folder: layouts, refusal of bad sets, manifest last, manifest content and identity."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.store.storage import LocalStore, StorageError, StorageKeyError, list_uploads, manifest_key, upload_prefix
from flows.store.upload import (
    ManifestError,
    UploadError,
    cli_upload,
    content_sha256,
    new_upload_id,
    read_manifest,
    upload_folder,
)


def png(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def category(tmp_path: Path) -> Path:
    d = tmp_path / "cat"
    write(d / "train/good/001.png", png(1))
    write(d / "train/good/002.png", png(2, mode="L"))
    write(d / "train/good/notes.txt", b"hello")
    write(d / "eval/good/e1.png", png(3))
    write(d / "eval/defect/d1.png", png(4, mode="RGBA"))
    write(d / "ground_truth/d1_mask.png", png(5))
    return d


class RecordingStore(LocalStore):
    def __init__(self, root: Path):
        super().__init__(root)
        self.puts: list[str] = []

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self.puts.append(key)
        super().put_bytes(key, data, content_type)


def test_structured_upload_manifest_last_and_content(tmp_path: Path, category: Path) -> None:
    store = RecordingStore(tmp_path / "store")
    res = upload_folder(store, "bottle", category, upload_id="20260101T000000Z-abcdef")
    prefix = upload_prefix("bottle", res.upload_id)
    assert store.puts[-1] == manifest_key("bottle", res.upload_id)
    assert len(store.puts) == 5
    assert res.counts == {"eval/defect": 1, "eval/good": 1, "train/good": 2}
    assert any("notes.txt" in s for s in res.skipped) and any("ground_truth" in s for s in res.skipped)
    assert store.list(prefix) == [prefix + k for k in
                                  ["eval/defect/d1.png", "eval/good/e1.png", "manifest.json",
                                   "train/good/001.png", "train/good/002.png"]]

    m = read_manifest(store, "bottle", res.upload_id)
    assert m["format"] == 1 and m["product"] == "bottle" and m["upload_id"] == res.upload_id
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["created"])
    files = {f["key"]: f for f in m["files"]}
    assert set(files) == {"train/good/001.png", "train/good/002.png", "eval/good/e1.png", "eval/defect/d1.png"}
    raw = (category / "train/good/002.png").read_bytes()
    assert files["train/good/002.png"] == {"key": "train/good/002.png", "sha256": hashlib.sha256(raw).hexdigest(),
                                           "size": len(raw), "width": 48, "height": 40, "channels": 1, "mode": "L"}
    assert (files["train/good/001.png"]["channels"], files["train/good/001.png"]["mode"]) == (3, "RGB")
    assert (files["eval/defect/d1.png"]["channels"], files["eval/defect/d1.png"]["mode"]) == (4, "RGBA")
    expected = hashlib.sha256("".join(f"{k}\t{files[k]['sha256']}\n" for k in sorted(files)).encode()).hexdigest()
    assert m["content_sha256"] == expected == res.content_sha256
    assert store.get_bytes(prefix + "train/good/002.png") == raw


def test_content_sha256_is_independent_of_upload_id_and_order(store: LocalStore, category: Path) -> None:
    a = upload_folder(store, "bottle", category)
    b = upload_folder(store, "bottle", category)
    assert a.upload_id != b.upload_id and a.content_sha256 == b.content_sha256
    assert content_sha256(list(reversed(a.manifest["files"]))) == a.content_sha256
    write(category / "train/good/003.png", png(9))
    assert upload_folder(store, "bottle", category).content_sha256 != a.content_sha256
    assert [u.complete for u in list_uploads(store, "bottle")] == [True, True, True]


def test_flat_folder_is_train_good(store: LocalStore, tmp_path: Path) -> None:
    d = tmp_path / "flat"
    write(d / "a.PNG", png(1))
    write(d / "b.jpg", b"")  # replaced below with a real JPEG
    Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(d / "b.jpg")
    write(d / ".DS_Store", b"junk")
    write(d / "sub/c.png", png(2))
    res = upload_folder(store, "p", d)
    assert res.counts == {"train/good": 2}
    assert sorted(f["key"] for f in res.manifest["files"]) == ["train/good/a.PNG", "train/good/b.jpg"]
    assert any(".DS_Store" in s for s in res.skipped) and any(s.startswith("sub/") for s in res.skipped)


def test_bad_files_refuse_whole_upload_and_list_all(store: LocalStore, tmp_path: Path) -> None:
    d = tmp_path / "bad"
    write(d / "ok.png", png(1))
    write(d / "empty.png", b"")
    write(d / "trunc.png", png(2)[:60])
    write(d / "text.png", b"not an image at all")
    with pytest.raises(UploadError) as info:
        upload_folder(store, "p", d)
    msg = str(info.value)
    assert "nothing uploaded" in msg and "\n" not in msg
    for name in ("empty.png", "trunc.png", "text.png"):
        assert name in msg
    assert "ok.png" not in msg
    assert store.list() == []


def test_undecodable_file_name_refused(store: LocalStore, tmp_path: Path) -> None:
    d = tmp_path / "names"
    write(d / "ok.png", png(1))
    try:
        write(Path(os.fsdecode(os.fsencode(d) + b"/bad\xff.png")), png(2))
    except (OSError, UnicodeError):
        pytest.skip("file system refuses non-UTF-8 names")
    with pytest.raises(UploadError, match="unusable file name"):
        upload_folder(store, "p", d)
    assert store.list() == []


def test_refusals(store: LocalStore, tmp_path: Path, category: Path) -> None:
    with pytest.raises(UploadError, match="not a folder"):
        upload_folder(store, "p", tmp_path / "missing")
    empty = tmp_path / "empty"
    write(empty / "readme.md", b"x")
    with pytest.raises(UploadError, match="no training images"):
        upload_folder(store, "p", empty)
    with pytest.raises(StorageKeyError):
        upload_folder(store, "../p", category)
    with pytest.raises(StorageKeyError):
        upload_folder(store, "p", category, upload_id="a/b")
    upload_folder(store, "p", category, upload_id="fixed")
    with pytest.raises(UploadError, match="already exists"):
        upload_folder(store, "p", category, upload_id="fixed")


class FailingStore(RecordingStore):
    """A store whose writes start failing after ``ok`` of them, as when the server goes away."""

    def __init__(self, root: Path, ok: int):
        super().__init__(root)
        self.ok = ok

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        if len(self.puts) >= self.ok:
            raise StorageError(f"put {key}: could not connect to the endpoint")
        super().put_bytes(key, data, content_type)


def test_interrupted_upload_is_resumed_writing_each_object_once(tmp_path: Path, category: Path) -> None:
    failing = FailingStore(tmp_path / "store", ok=2)
    with pytest.raises(StorageError, match="left incomplete .*--resume 20260101T000000Z-resume"):
        upload_folder(failing, "bottle", category, upload_id="20260101T000000Z-resume")
    prefix = upload_prefix("bottle", "20260101T000000Z-resume")
    assert len(failing.list(prefix)) == 2 and not failing.exists(manifest_key("bottle", "20260101T000000Z-resume"))

    store = RecordingStore(tmp_path / "store")
    res = upload_folder(store, "bottle", category, resume="20260101T000000Z-resume")
    assert res.upload_id == "20260101T000000Z-resume"
    # eval/ sorts first: its two files were stored before the failure and are not written again
    assert store.puts == [prefix + "train/good/001.png", prefix + "train/good/002.png",
                          manifest_key("bottle", res.upload_id)]
    assert len(store.list(prefix)) == 5
    for f in read_manifest(store, "bottle", res.upload_id)["files"]:
        assert hashlib.sha256(store.get_bytes(prefix + f["key"])).hexdigest() == f["sha256"]
    assert res.content_sha256 == upload_folder(LocalStore(tmp_path / "other"), "bottle", category).content_sha256


class OperationLog(LocalStore):
    """A store that logs every operation it is asked for (reads, lists and writes) with its key."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.log: list[tuple[str, str]] = []

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self.log.append(("put", key))
        super().put_bytes(key, data, content_type)

    def get_bytes(self, key: str) -> bytes:
        self.log.append(("get", key))
        return super().get_bytes(key)

    def exists(self, key: str) -> bool:
        self.log.append(("exists", key))
        return super().exists(key)

    def list_info(self, prefix: str = "") -> list:
        self.log.append(("list", prefix))
        return super().list_info(prefix)


def test_storage_is_asked_only_after_every_file_is_checked_and_the_manifest_is_written_last(
        tmp_path: Path, category: Path) -> None:
    """A bad set never reaches storage; a new upload lists its prefix once, then writes; a resume lists,
    reads back what it keeps, writes the rest; the manifest comes last either way."""
    uid = "20260101T000000Z-oplog1"
    prefix, manifest = upload_prefix("bottle", uid), manifest_key("bottle", uid)
    images = [f"{prefix}{rel}" for rel in ("eval/defect/d1.png", "eval/good/e1.png", "train/good/001.png",
                                           "train/good/002.png")]
    bad = tmp_path / "bad"
    write(bad / "train/good/text.png", b"not an image")
    store = OperationLog(tmp_path / "store")
    with pytest.raises(UploadError, match="nothing uploaded"):
        upload_folder(store, "bottle", bad, upload_id=uid)
    assert store.log == []

    upload_folder(store, "bottle", category, upload_id=uid)
    assert store.log == [("list", prefix), *(("put", key) for key in images), ("put", manifest)]

    interrupted = LocalStore(tmp_path / "other")  # as an upload cut off after its first two images
    for key, rel in zip(images[:2], ("eval/defect/d1.png", "eval/good/e1.png")):
        interrupted.put_bytes(key, (category / rel).read_bytes())
    resumed = OperationLog(tmp_path / "other")
    upload_folder(resumed, "bottle", category, resume=uid)
    assert resumed.log == [("list", prefix), ("get", images[0]), ("get", images[1]),
                           *(("put", key) for key in images[2:]), ("put", manifest)]


def test_resume_refuses_what_is_not_an_interrupted_upload_of_this_folder(store: LocalStore, tmp_path: Path,
                                                                         category: Path) -> None:
    with pytest.raises(UploadError, match="nothing to resume"):
        upload_folder(store, "bottle", category, resume="20260101T000000Z-absent")
    done = upload_folder(store, "bottle", category)
    with pytest.raises(UploadError, match="is complete"):
        upload_folder(store, "bottle", category, resume=done.upload_id)
    store.put_bytes(upload_prefix("bottle", "20260101T000000Z-other") + "train/good/zzz.png", png(9))
    with pytest.raises(UploadError, match="does not have.*zzz.png"):
        upload_folder(store, "bottle", category, resume="20260101T000000Z-other")
    assert not store.exists(manifest_key("bottle", "20260101T000000Z-other"))


def test_a_long_file_name_uploads_and_resumes_whole(store: LocalStore, tmp_path: Path) -> None:
    """A 255-byte file name (the most a file system allows): every limit is checked before the first
    write, so the upload is written whole, and an interrupted one resumes."""
    long_name = "n" * 251 + ".png"
    folder = tmp_path / "set"
    for name, seed in (("a.png", 1), ("b.png", 2), (long_name, 3), ("z.png", 4)):
        write(folder / name, png(seed))

    class FailsOnce(LocalStore):
        failed = False

        def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
            if key.endswith("z.png") and not self.failed:
                FailsOnce.failed = True
                raise StorageError("connection reset")
            super().put_bytes(key, data, content_type)

    uid = "20260101T000000Z-long01"
    with pytest.raises(StorageError, match=f"finish it with --resume {uid}"):
        upload_folder(FailsOnce(store.root), "widget", folder, upload_id=uid)
    result = upload_folder(store, "widget", folder, resume=uid)
    prefix = upload_prefix("widget", uid)
    assert store.get_bytes(f"{prefix}train/good/{long_name}") == (folder / long_name).read_bytes()
    assert len(result.manifest["files"]) == 4 and store.exists(manifest_key("widget", uid))


def test_upload_id_is_time_sortable() -> None:
    from datetime import datetime
    a = new_upload_id(datetime(2026, 11, 29, 10, 15, tzinfo=UTC))
    assert re.fullmatch(r"20261129T101500Z-[0-9a-f]{6}", a)
    assert new_upload_id(datetime(2026, 11, 29, 10, 16, tzinfo=UTC)) > a


def test_read_manifest_errors(store: LocalStore) -> None:
    with pytest.raises(ManifestError, match="incomplete"):
        read_manifest(store, "p", "u1")
    store.put_bytes(manifest_key("p", "u1"), b"{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(store, "p", "u1")
    store.put_bytes(manifest_key("p", "u1"), json.dumps({"format": 99, "files": []}).encode())
    with pytest.raises(ManifestError, match="format-1"):
        read_manifest(store, "p", "u1")


def test_cli_upload_prints_summary(tmp_path: Path, category: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FSAD_STORAGE", str(tmp_path / "clistore"))
    assert cli_upload("bottle", str(category)) == 0
    out, err = capsys.readouterr()
    assert out.startswith("uploaded bottle ") and "2 train/good" in out and "content_sha256" in out
    assert "skipped 2" in err
    assert len(list_uploads(LocalStore(tmp_path / "clistore"), "bottle")) == 1
