"""`fsad score-prefix`'s batch reading, without a stack: what is decoded and what is refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flows.pipeline.score_prefix as score_prefix
from flows.store.storage import LocalStore
from fsad_core import imageio
from fsad_core.imageio import ImageLimits


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_batch_is_kept_within_the_pixel_budget_from_the_headers_before_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    blobs = {"a.png": png(40), "b.png": png(40), "c.png": png(40), "bad.png": b"not an image"}
    for key, blob in blobs.items():
        store.put_bytes(key, blob)
    decoded = []
    real_read = imageio.read_image

    def counted_read(data: bytes, name: str, limits: ImageLimits | None = None) -> np.ndarray:
        decoded.append(name)
        return real_read(data, name, limits)

    monkeypatch.setattr(imageio, "read_image", counted_read)
    objects = [(key, len(blobs[key])) for key in ("a.png", "bad.png", "b.png", "c.png")]
    images, errors = score_prefix._read(store, objects, ImageLimits(max_set_pixels=2 * 40 * 40))
    assert list(images) == ["a.png", "b.png"] and all(i.shape == (40, 40, 3) for i in images.values())
    assert set(errors) == {"bad.png", "c.png"}
    assert "the batch up to c.png: refused" in errors["c.png"]
    assert decoded == ["a.png", "b.png"]  # neither the unreadable nor the refused image was decoded


def test_keys_storage_refuses_and_links_leaving_the_prefix_get_their_reason_and_the_rest_is_read(
        tmp_path: Path) -> None:
    root, outside = tmp_path / "prefix", tmp_path / "outside.png"
    root.mkdir()
    outside.write_bytes(png(40))
    (root / "escape.png").symlink_to(outside)
    (root / "a\\b.png").write_bytes(png(40))  # legal in S3, refused as a key here
    (root / "good.png").write_bytes(png(40))
    store = LocalStore(root)
    objects = sorted((info.key, info.size) for info in store.list_info())
    assert [key for key, _ in objects] == ["a\\b.png", "escape.png", "good.png"]
    images, errors = score_prefix._read(store, objects, ImageLimits())
    assert list(images) == ["good.png"]
    assert "backslash" in errors["a\\b.png"] and "outside the store root" in errors["escape.png"]


def test_objects_under_the_decisions_that_are_not_part_files_are_passed_over(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, prefix = LocalStore(tmp_path), score_prefix.decisions_prefix("fsad-washer", "1")
    store.put_bytes(score_prefix.part_key(prefix, ["a.png"]), b'{"image": "a.png", "score": 0.1}\n')
    store.put_bytes(prefix + "README.txt", b"notes of an operator")
    broken = score_prefix.part_key(prefix, ["b.png"])
    store.put_bytes(broken, b"{not json")
    assert score_prefix.already_decided(store, prefix) == {"a.png"}
    [warning] = caplog.records  # the broken part, named; README.txt is not ours and says nothing
    assert warning.getMessage().startswith(f"{store.uri(broken)}: not a part file of decisions")
