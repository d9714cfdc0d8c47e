"""`make bench-export`: torch against onnxruntime on the same fitted models, one thread each.

For each set and method: fit on k normal images, export through `fsad export`'s library call (its
own check included), then score the set's test images with both runtimes in one process, one after
the other, from decoded images to decisions. The record gives images a second of each and their
ratio beside `backbone_ms_per_image`, and how far the two agree on the test images (largest
difference in the score unit, identical decisions).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fsad_core.benchmark import backbone_ms_per_image, stratified_subset
from fsad_core.data import load_category
from fsad_core.detector import Detector
from fsad_core.export import compare, export_onnx
from fsad_core.methods import method_config
from fsad_core.onnx_runtime import ExportedModel


def _images_per_second(score: Callable[[list[np.ndarray]], object], images: list[np.ndarray]) -> float:
    score(images[:2])  # warm-up: allocators, kernels, the session's first run
    start = time.perf_counter()
    score(images)
    return len(images) / (time.perf_counter() - start)


def run(data: str, method: str, k: int, seed: int, n_images: int) -> dict:
    category = load_category(data)
    train = [s.image() for s in category.sample_k_shot(k, seed)]
    test = [s.image() for s in stratified_subset(category.test, n_images, seed)]
    detector, _ = Detector.fit(train, method_config(method, seed=seed), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        own_check = export_onnx(detector, Path(tmp) / "export", train, {"folder": data, "method": method})
        export_seconds = time.perf_counter() - start
        exported = ExportedModel(Path(tmp) / "export", threads=1)
        graph_mb = (Path(tmp) / "export" / "model.onnx").stat().st_size / 2**20
        on_test = compare(detector, exported, test)
        torch_rate = _images_per_second(lambda images: detector.score(images), test)
        onnx_rate = _images_per_second(lambda images: [exported.score(image) for image in images], test)
    return {"set": category.name, "method": method, "k": k, "seed": seed, "images": len(test),
            "backbone_ms_per_image": round(backbone_ms_per_image(detector.config.backbone, "cpu"), 2),
            "torch_images_per_s": round(torch_rate, 2), "onnx_images_per_s": round(onnx_rate, 2),
            "onnx_over_torch": round(onnx_rate / torch_rate, 3),
            "export_seconds": round(export_seconds, 1), "graph_mb": round(graph_mb, 1),
            "own_images_max_unit_difference": own_check.max_unit_difference,
            "test_max_unit_difference": on_test.max_unit_difference,
            "test_decisions_identical": on_test.decisions_identical, "test_flagged": on_test.flagged_by_torch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True, help="category folders (MVTec layout)")
    parser.add_argument("--methods", nargs="+", default=["fast", "default"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=60, help="test images scored by each runtime")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = []
    for data in args.data:
        for method in args.methods:
            records.append(run(data, method, args.k, args.seed, args.images))
            print(json.dumps(records[-1]), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"records": records}, indent=1))


if __name__ == "__main__":
    main()
