"""The served model's memory across concurrent requests: ``mlflow models serve`` of a model logged
as the pipeline logs it, eight requests at once of small files that decode to 8000 x 8000 images
(RGBA without maps, RGB with maps), the server's processes sampled all along. Each request is
answered within a minute, the server stays within its memory budget above its idle size, and a
good request afterwards is answered as before."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import psutil
import pytest
from conftest import noise_rgb, png_bytes
from PIL import Image

from flows.mlops.serve_latency import serve, stop
from flows.pyfunc import DATA_DIRNAME, DEFAULT_SERVE_MEMORY_MB, MAP_SIDE, log_pyfunc_model
from flows.settings import training_config
from fsad_core.detector import Detector
from tests.tiny_training import TINY_TRAINING

SIDE = 8000
CONCURRENT = 8
ANSWER_WITHIN_S = 60


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[int]:
    """The port of a served model: pretrained features at 64 px, k = 2, logged to SQLite in tmp."""
    tmp = tmp_path_factory.mktemp("serve-memory")
    detector, _ = Detector.fit([noise_rgb(1), noise_rgb(2)], training_config("pretrained", 0, TINY_TRAINING),
                               device="cpu")
    tracking = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(tracking)
    with mlflow.start_run():
        info = log_pyfunc_model(detector.save(tmp / DATA_DIRNAME), noise_rgb(1), "fsad-memory")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "OMP_NUM_THREADS": "1"}
    server, port = serve(info.model_uri, tmp / "serve.log", env=env)
    try:
        yield port
    finally:
        stop(server)


def _large_png(mode: str) -> bytes:
    """A SIDE x SIDE image of smooth gradients: a few hundred kilobytes that decode to 64 million pixels."""
    ramp = np.linspace(0, 255, SIDE, dtype=np.float32)
    bands = [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2, np.add.outer(ramp[::-1], ramp) / 2]
    if mode == "RGBA":
        bands.append(np.full((SIDE, SIDE), 200, np.float32))
    image = Image.fromarray(np.stack(bands, axis=2).astype(np.uint8), mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def _post(port: int, data: bytes, maps: bool) -> tuple[dict, float]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(data).decode()]]},
            "params": {"maps": maps}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=2 * ANSWER_WITHIN_S) as answer:
        return json.loads(answer.read())["predictions"][0], time.monotonic() - start


class _Resident:
    """The resident memory of the server's processes together, sampled every 50 ms in a thread."""

    def __init__(self, port: int):
        listener = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                        and c.status == psutil.CONN_LISTEN)
        top = psutil.Process(listener)
        while top.parent() is not None and "mlflow" in " ".join(top.parent().cmdline()):
            top = top.parent()
        self.processes = [top, *top.children(recursive=True)]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        return sum(p.memory_info().rss for p in self.processes if p.is_running())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)

    def __enter__(self) -> _Resident:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode, maps", [("RGBA", False), ("RGB", True)])
def test_concurrent_requests_of_huge_images_stay_within_the_memory_budget(served, mode, maps):
    small = png_bytes(noise_rgb(9))
    before, _ = _post(served, small, maps=False)  # warm: the model's first pass
    huge = _large_png(mode)
    assert len(huge) < 2_000_000  # small requests, as an attacker sends them
    resident = _Resident(served)
    idle = resident.now()
    with resident, ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(lambda _: _post(served, huge, maps), range(CONCURRENT)))
    budget = DEFAULT_SERVE_MEMORY_MB * 2**20
    print(f"{mode} maps={maps}: idle {idle / 2**20:.0f} MB, peak {resident.peak / 2**20:.0f} MB "
          f"(+{(resident.peak - idle) / 2**20:.0f} MB), answers in {max(s for _, s in answers):.1f} s at most")
    for answer, seconds in answers:
        assert seconds < ANSWER_WITHIN_S
        assert answer["error"] or np.isfinite(answer["score"]), answer
    scored = [a for a, _ in answers if not a["error"]]
    assert scored, [a["error"] for a, _ in answers]  # the budget lets them through in turn, not refuses all
    if maps:
        picture = Image.open(io.BytesIO(base64.b64decode(scored[0]["map_png"])))
        assert max(picture.size) <= MAP_SIDE + 100  # the overlay's colour bar beside it
    assert resident.peak - idle <= budget, f"peak {resident.peak - idle} bytes above idle, budget {budget}"
    after, _ = _post(served, small, maps=False)
    assert after["score"] == pytest.approx(before["score"], rel=1e-6) and after["error"] == ""
