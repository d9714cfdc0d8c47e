"""Shared fixtures of the reliability suite: tiny training settings, one Prefect test API for the
whole session, image factories for bad and unusual files, and an embedded FSAD_HOME per module."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny_training import TINY_TRAINING

CLEARED = ("FSAD_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FSAD_GATE_MIN_AUROC", "FSAD_DEVICE",
           "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID",
           "AWS_SECRET_ACCESS_KEY", "FSAD_MAX_PIXELS")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[None]:
    """A Prefect test API (temporary server + database) for the flow runs of one module; closed
    with the module, so its log and event workers drain while the environment they were started
    in (and their server) still exists."""
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFECT_API_URL", raising=False)
        with prefect_test_harness(server_startup_timeout=180), \
                temporary_settings(updates={"results.local_storage_path": str(results)}):
            yield


def embedded_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    for name in CLEARED:
        mp.delenv(name, raising=False)
    mp.setenv("FSAD_HOME", str(home))
    mp.setenv("FSAD_TRAIN_OVERRIDES", json.dumps(TINY_TRAINING))
    mp.setenv("FSAD_DEVICE", "cpu")


# ---- image factories ------------------------------------------------------------------------

def noise_rgb(seed: int, w: int = 64, h: int = 64) -> np.ndarray:
    """A textured RGB image (passes the blank / saturation checks), unique per seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 210, size=(h, w, 3), dtype=np.uint8)
    return base


def png_bytes(arr_or_img, **save) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny (incomplete) IDAT: a
    reader that decodes before checking the size would allocate ~900 MB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
