"""``make bench-review``: how fast the review page answers with a long queue on the folder store.

A product with N queued images (generated parts, their thumbnails and overlays as score-prefix
draws them), of which some are labelled already (each label an entry the page reads), is served
by uvicorn on 127.0.0.1; the one-card view and a 24-card grid are each requested 20 times after
warming up, and the medians printed with the request count.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from flows.store.labels import AUDIT, GOOD, HIGHEST_SCORE, NEAR_THRESHOLD, add_labels, read_sources
from flows.store.queue import OVERLAY, THUMB, QueueItem, media_key, write_queue
from flows.store.storage import LocalStore, Store
from fsad_core.overlay import overlay, png_bytes, thumbnail

REASONS = (NEAR_THRESHOLD, HIGHEST_SCORE, AUDIT)


def make_queue(store: Store, line: Path, product: str, names: list[str], seed: int = 0) -> list[QueueItem]:
    """A queue of generated parts named ``names`` in the folder ``line``, with their pictures: what
    score-prefix leaves for the page, without a model (the maps are noise on the model's scale)."""
    rng = np.random.default_rng(seed)
    line.mkdir(parents=True, exist_ok=True)
    items = []
    for i, name in enumerate(names):
        image = np.full((96, 128, 3), 90 + 10 * (i % 5), np.uint8)
        image[30:60, 40:80] = 170
        (line / name).write_bytes(png_bytes(image))
        score = float(rng.normal(0.4, 0.15))  # in the score unit: the threshold is 0.5
        item = QueueItem(str(line / name), score, 0.5, score > 0.5, "1", REASONS[i % 3], 20.0 if i % 3 == 2 else 0.0)
        store.put_bytes(media_key(product, item, THUMB), png_bytes(thumbnail(image, 320)), "image/png")
        amap = rng.random((96, 128)).astype(np.float32) * 8
        store.put_bytes(media_key(product, item, OVERLAY), png_bytes(overlay(image, amap, 6.0)), "image/png")
        items.append(item)
    write_queue(store, product, items)
    return items


def _median_ms(client: object, path: str, warm: int = 3, runs: int = 20) -> float:
    for _ in range(warm):
        client.get(path).raise_for_status()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        client.get(path).raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    import httpx
    import uvicorn

    from flows.review.serve import review_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--labelled", type=int, default=200, help="of the queued images, labelled already")
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = LocalStore(root / "store")
        items = make_queue(store, root / "line", "bench-part", [f"part-{i:05d}.png" for i in range(args.queued)])
        add_labels(store, "bench-part", read_sources(store, [i.image for i in items[:args.labelled]]), GOOD, "bench",
                   "audit")
        token = "bench-token-0123456789"
        app = review_app(token, str(root / "store"), f"sqlite:///{root / 'mlflow.db'}")
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{args.port}"
        with httpx.Client(base_url=base, follow_redirects=True) as client:
            csrf = re.search(r'<form class="signin".*?name="csrf" value="([0-9a-f]+)"', client.get("/signin").text,
                             re.S).group(1)
            client.post("/signin", data={"name": "bench", "token": token, "next": "/", "csrf": csrf}).raise_for_status()
            result = {"queued": args.queued, "labelled": args.labelled, "requests": 20,
                      "card_ms_median": _median_ms(client, "/p/bench-part/queue?view=card&at=500"),
                      "grid_ms_median": _median_ms(client, "/p/bench-part/queue?view=grid&at=480")}
        server.should_exit = True
    print(json.dumps(result))


if __name__ == "__main__":
    main()
