"""The upload sensor's bookkeeping on a local store: what is announced, once, and what never is."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.pipeline.sensor import EVENT, announced_key, mark_announced, unannounced_uploads, upload_event
from flows.store.storage import LocalStore, manifest_key, train_key
from flows.store.upload import upload_folder
from flows.store.validation import validate_upload


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def upload(store: LocalStore, tmp_path: Path, product: str, upload_id: str, seed: int) -> str:
    folder = tmp_path / f"{product}-{upload_id}"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(png(seed + i))
    return upload_folder(store, product, folder, upload_id).content_sha256


def announce_all(store: LocalStore) -> list[str]:
    """What one sensor run does, minus sending: build each event and write its marker."""
    announced = []
    for u in unannounced_uploads(store):
        event = upload_event(store, u)
        mark_announced(store, u, event)
        announced.append(event.resource.id)
    return announced


def test_complete_uploads_are_announced_once_and_new_ones_later(store: LocalStore, tmp_path: Path) -> None:
    upload(store, tmp_path, "bottle", "20260101T000000Z-aaaaaa", 1)
    upload(store, tmp_path, "tile", "20260102T000000Z-bbbbbb", 3)
    store.put_bytes(train_key("bottle", "20260103T000000Z-cccccc", "0.png"), png(5))  # no manifest

    assert announce_all(store) == ["fsad.upload.bottle.20260101T000000Z-aaaaaa",
                                   "fsad.upload.tile.20260102T000000Z-bbbbbb"]
    assert announce_all(store) == []

    upload(store, tmp_path, "bottle", "20260104T000000Z-dddddd", 7)
    assert announce_all(store) == ["fsad.upload.bottle.20260104T000000Z-dddddd"]
    assert announce_all(store) == []
    assert not store.exists(announced_key("bottle", "20260103T000000Z-cccccc"))


def test_incomplete_upload_is_announced_once_its_manifest_arrives(store: LocalStore, tmp_path: Path) -> None:
    upload(store, tmp_path, "bottle", "20260101T000000Z-aaaaaa", 1)
    manifest = store.get_bytes(manifest_key("bottle", "20260101T000000Z-aaaaaa"))
    store.delete(manifest_key("bottle", "20260101T000000Z-aaaaaa"))
    assert unannounced_uploads(store) == []

    store.put_bytes(manifest_key("bottle", "20260101T000000Z-aaaaaa"), manifest)
    assert [u.upload_id for u in unannounced_uploads(store)] == ["20260101T000000Z-aaaaaa"]


def test_event_names_the_upload_and_its_content(store: LocalStore, tmp_path: Path) -> None:
    content = upload(store, tmp_path, "bottle", "20260101T000000Z-aaaaaa", 1)
    [info] = unannounced_uploads(store)
    event = upload_event(store, info)

    assert event.event == EVENT
    assert event.resource.id == "fsad.upload.bottle.20260101T000000Z-aaaaaa"
    assert event.resource["fsad.product"] == "bottle"
    assert event.resource["fsad.upload_id"] == "20260101T000000Z-aaaaaa"
    assert event.payload["content_sha256"] == content and event.payload["manifest_valid"] is True
    assert event.related[0].role == "product"
    assert upload_event(store, info).id == event.id  # a re-send carries the same id: the server drops it


def test_malformed_manifest_is_still_announced_for_validation_to_reject(store: LocalStore, tmp_path: Path) -> None:
    upload(store, tmp_path, "bottle", "20260101T000000Z-aaaaaa", 1)
    store.put_bytes(manifest_key("bottle", "20260101T000000Z-aaaaaa"), b"{not json")
    [info] = unannounced_uploads(store)
    event = upload_event(store, info)
    assert event.payload["content_sha256"] is None and event.payload["manifest_valid"] is False


def test_marker_does_not_make_the_upload_fail_validation(store: LocalStore, tmp_path: Path) -> None:
    upload(store, tmp_path, "bottle", "20260101T000000Z-aaaaaa", 1)
    assert announce_all(store)
    report = validate_upload(store, "bottle", "20260101T000000Z-aaaaaa")
    assert report.success, report.failed
