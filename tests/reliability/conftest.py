"""Shared fixtures of the reliability suite: tiny training settings, one Prefect test API for the
whole session, image factories for bad and unusual files, and an embedded FSAD_HOME per module."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny_training import TINY_TRAINING_PROMOTING

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
    mp.setenv("FSAD_TRAIN_OVERRIDES", json.dumps(TINY_TRAINING_PROMOTING))
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


# ---- fsad as a user runs it ------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
FLOW_TIMEOUT_S = 420


class Fsad:
    """An ``fsad`` command in a subprocess of its own session, its output collected by a thread
    (bounded waits only)."""

    def __init__(self, env: dict[str, str | None], *args: str, runs: list[Fsad] | None = None):
        """``env`` over this process's environment; a variable set to None is removed."""
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        full = {name: value for name, value in {**os.environ, **env}.items() if value is not None}
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli.main", *args], cwd=REPO, env=full,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        if runs is not None:
            runs.append(self)

    @classmethod
    def retrain(cls, env: dict[str, str], product: str, upload_id: str, runs: list[Fsad] | None = None) -> Fsad:
        return cls(env, "retrain", "--product", product, "--upload", upload_id, runs=runs)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)

    def wait_for(self, text: str, timeout_s: float = FLOW_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in ln for ln in self.lines):
                return
            if self.proc.poll() is not None and self._q.empty():
                time.sleep(0.5)
                if any(text in ln for ln in self.lines):
                    return
                raise AssertionError(f"exited before {text!r}:\n{self.output[-4000:]}")
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"no {text!r} within {timeout_s} s:\n{self.output[-4000:]}")

    def finish(self, timeout_s: float = FLOW_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"fsad did not finish within {timeout_s} s:\n{self.output[-4000:]}") from None
        finally:
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the flow and its children
            self.proc.wait(timeout=30)

    @property
    def output(self) -> str:
        return "".join(self.lines)
