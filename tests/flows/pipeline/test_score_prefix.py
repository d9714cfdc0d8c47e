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


def test_the_queues_pictures_are_drawn_once_by_the_model_at_the_page_size(tmp_path: Path) -> None:
    from dataclasses import replace

    from flows.store.queue import OVERLAY, THUMB, QueueItem, media_key
    from fsad_core.detector import Detector
    from fsad_core.methods import method_config
    from tests.tiny_training import TINY_TRAINING

    line, product_store = LocalStore(tmp_path / "line"), LocalStore(tmp_path / "store")
    wide = np.zeros((200, 400, 3), np.uint8)
    wide[50:150, 100:300] = 150
    line.put_bytes("a.png", score_prefix_png(wide))
    line.put_bytes("gone.png", b"not an image")
    config = replace(method_config("fast", seed=0), **{k: v for k, v in TINY_TRAINING.items() if k != "finetune"})
    detector, _ = Detector.fit([wide, wide[:, ::-1].copy()], config, device="cpu")
    sizes = {info.key: info.size for info in line.list_info()}
    items = [(QueueItem(line.uri(key), 1.0, 2.0, False, "3", "audit", 20.0), key, sizes[key])
             for key in ("a.png", "gone.png")]
    score_prefix.draw_pictures(line, product_store, "washer", items, detector)
    thumb = Image.open(io.BytesIO(product_store.get_bytes(media_key("washer", items[0][0], THUMB))))
    picture = Image.open(io.BytesIO(product_store.get_bytes(media_key("washer", items[0][0], OVERLAY))))
    assert thumb.size == (score_prefix.PICTURE_SIDE, score_prefix.PICTURE_SIDE // 2)
    assert picture.size[1] == thumb.size[1] and picture.size[0] > thumb.size[0]  # with the colour bar
    assert not product_store.exists(media_key("washer", items[1][0], THUMB))  # unreadable: no picture
    before = product_store.list()
    score_prefix.draw_pictures(line, product_store, "washer", items[:1], None)  # drawn already: no model needed
    assert product_store.list() == before


def score_prefix_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
