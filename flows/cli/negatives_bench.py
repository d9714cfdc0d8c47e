"""`make bench-negatives`: what confirmed defects add as negatives of the contrastive fine-tuning
(`loop.defect_negatives`), side by side on the same images.

For each set and seed: k normal images (`sample_k_shot`), n defects drawn from the test set (the
confirmed defects a line would have), and the rest of the test set, which scores both fits: one on
the normal images alone, one with the defects among the fine-tuning's negatives. The drawn defects
are never scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fsad_core.benchmark import backbone_ms_per_image, stratified_subset
from fsad_core.data import load_category
from fsad_core.detector import Detector
from fsad_core.methods import method_config
from fsad_core.metrics import image_auroc


def run(data: str, method: str, k: int, seed: int, n_defects: int, n_images: int) -> dict:
    category = load_category(data)
    train = [s.image() for s in category.sample_k_shot(k, seed)]
    defective = [i for i, s in enumerate(category.test) if s.label]
    drawn = set(np.random.default_rng(seed).choice(defective, size=min(n_defects, len(defective)),
                                                    replace=False).tolist())
    rest = stratified_subset([s for i, s in enumerate(category.test) if i not in drawn], n_images, seed)
    images, labels = [s.image() for s in rest], [s.label for s in rest]
    defects = [category.test[i].image() for i in sorted(drawn)]
    record = {"set": category.name, "method": method, "k": k, "seed": seed, "defects": len(defects),
              "images": len(images)}
    for name, negatives in (("without", []), ("with", defects)):
        start = time.perf_counter()
        detector, _ = Detector.fit(train, method_config(method, seed=seed), device="cpu", defects=negatives)
        record[f"{name}_fit_seconds"] = round(time.perf_counter() - start, 1)
        record[f"{name}_auroc"] = image_auroc(labels, detector.score(images).raw_scores)
    record["difference"] = record["with_auroc"] - record["without_auroc"]
    record["backbone_ms_per_image"] = round(backbone_ms_per_image(method_config(method).backbone, "cpu"), 2)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--method", default="default")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--defects", type=int, default=6, help="confirmed defects drawn from the test set")
    parser.add_argument("--images", type=int, default=200, help="test images scored at most (stratified)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    records = json.loads(out.read_text())["records"] if out.exists() else []
    done = {(r["set"], r["seed"]) for r in records}
    for data in args.data:
        name = load_category(data).name
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            records.append(run(data, args.method, args.k, seed, args.defects, args.images))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"records": records}, indent=1))
            r = records[-1]
            print(f"{r['set']} seed {seed}: {r['without_auroc']:.4f} without, {r['with_auroc']:.4f} with "
                  f"{r['defects']} defects ({r['difference']:+.4f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
