"""`make gpu-check`: fit and score MVTec-layout categories on a CUDA device, beside the CPU records.

For each set: fit seconds, milliseconds an image at batch 1 and images a second at batch 64 (maps
included), and the image AUROC beside the CPU record of the same method, k and seed (`fsad bench`'s
JSON, e.g. from `make bench-peer`); exits 1 when the two differ by more than `TOLERANCE`, since the
device must change the speed, not the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fsad_core.benchmark import CategoryCache
from fsad_core.detector import Detector
from fsad_core.devices import resolve_device
from fsad_core.methods import method_config
from fsad_core.metrics import image_auroc

TOLERANCE = 0.005  # image AUROC, device against CPU
SINGLE_IMAGES = 32  # images timed one at a time


def cpu_aurocs(path: Path, method: str, k: int, seed: int) -> dict[str, float]:
    """Image AUROC per category of the CPU records of `method` at k and seed."""
    records = json.loads(path.read_text())["records"]
    return {r["category"]: r["image_auroc"] for r in records
            if r["method"] == method and r["k"] == k and r["seed"] == seed}


def check_set(root: Path, method: str, k: int, seed: int, device: str) -> dict[str, float]:
    """Fit and score one set on `device`; the times and the image AUROC."""
    cache = CategoryCache.load(root, None)
    train = [s.image() for s in cache.category.sample_k_shot(k, seed)]
    start = time.perf_counter()
    detector, _ = Detector.fit(train, method_config(method, seed=seed), device=device)
    fit_seconds = time.perf_counter() - start
    singles = cache.images[:SINGLE_IMAGES]
    detector.score(singles[:2], with_maps=True, batch=1)  # warm-up
    start = time.perf_counter()
    for image in singles:
        detector.score([image], with_maps=True, batch=1)
    ms_batch1 = (time.perf_counter() - start) * 1000 / len(singles)
    start = time.perf_counter()
    result = detector.score(cache.images, with_maps=True, batch=64)
    images_per_second = len(cache.images) / (time.perf_counter() - start)
    return {"fit_seconds": fit_seconds, "ms_per_image_batch1": ms_batch1,
            "images_per_second_batch64": images_per_second, "image_auroc": image_auroc(cache.labels, result.scores)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("categories", nargs="+", help="MVTec-layout category folders (the Makefile: bottle, Magnetic Tile)")
    p.add_argument("--cpu-record", required=True, help="fsad bench JSON with the CPU records to compare with")
    p.add_argument("--method", default="default")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the same code (for the tests)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        reference = cpu_aurocs(Path(args.cpu_record), args.method, args.k, args.seed)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    failed = False
    for category in args.categories:
        root = Path(category)
        row = check_set(root, args.method, args.k, args.seed, str(device))
        cpu = reference.get(root.name)
        same = cpu is not None and abs(row["image_auroc"] - cpu) <= TOLERANCE
        failed |= not same
        print(f"{root.name} {args.method} k={args.k} seed={args.seed} on {device}: fit {row['fit_seconds']:.1f} s, "
              f"{row['ms_per_image_batch1']:.1f} ms an image at batch 1, "
              f"{row['images_per_second_batch64']:.0f} images a second at batch 64, image AUROC "
              f"{row['image_auroc']:.4f} (CPU record {'none' if cpu is None else f'{cpu:.4f}'})"
              f"{'' if same else ' DIFFERS'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
