"""`fsad score-prefix`'s batch reading, without a stack: what is decoded and what is refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flows.score_prefix as score_prefix
from flows.storage import LocalStore
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
    real_read = score_prefix.read_image

    def counted_read(data: bytes, **kwargs: object) -> np.ndarray:
        decoded.append(kwargs["name"])
        return real_read(data, **kwargs)

    monkeypatch.setattr(score_prefix, "read_image", counted_read)
    objects = [(key, len(blobs[key])) for key in ("a.png", "bad.png", "b.png", "c.png")]
    images, errors = score_prefix._read(store, objects, ImageLimits(max_set_pixels=2 * 40 * 40))
    assert list(images) == ["a.png", "b.png"] and all(i.shape == (40, 40, 3) for i in images.values())
    assert set(errors) == {"bad.png", "c.png"}
    assert "the batch up to c.png: refused" in errors["c.png"]
    assert decoded == ["a.png", "b.png"]  # neither the unreadable nor the refused image was decoded
