"""`make bench-replay`: how far the labelled benchmark the gate sees is from the truth, when nothing
but the draws changes.

For each set: the simulation's split (`fsad_core.line`), one model fitted on the upload, its scores
of the stream and of the held-out truth computed once. Then the line's days are replayed many
times, each time a new order of the stream (parts at the defect share): each day's decisions go
through the review queue's draw (`queue.pick`), the drawn images are labelled from the truth, a
share of them judges (as the content hash would choose), and on each day whose judging labels hold
5 defects and 5 normals the weighted benchmark (`evidence.judge`) is set against the held-out AUROC
of the same model. The model never changes, so what is measured is the benchmark alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flows.store.queue import Decided, pick
from fsad_core.data import load_category
from fsad_core.detector import Detector
from fsad_core.evidence import MIN_PER_CLASS, judge
from fsad_core.line import split_line
from fsad_core.methods import method_config
from fsad_core.metrics import image_auroc


def day_parts(labels: np.ndarray, days: int, per_day: int, share: float, rng: np.random.Generator
              ) -> list[np.ndarray]:
    """A new order of the stream: each day ``per_day`` parts, a ``share`` of them defective while both kinds last."""
    good, defect = rng.permutation(np.flatnonzero(labels == 0)), rng.permutation(np.flatnonzero(labels == 1))
    n_defect = round(per_day * share)
    return [np.r_[good[d * (per_day - n_defect):(d + 1) * (per_day - n_defect)],
                  defect[d * n_defect:(d + 1) * n_defect]] for d in range(days)]


def replay(scores: np.ndarray, labels: np.ndarray, threshold: float, truth: float, args: argparse.Namespace,
           rng: np.random.Generator) -> list[tuple[float, bool, float]]:
    """(benchmark AUROC - truth, whether its interval covers the truth, the interval's width) of each
    labelled day of one replay."""
    judging: list[tuple[int, float, float]] = []  # label, score, weight
    found = []
    for day, parts in enumerate(day_parts(labels, args.days, args.per_day, args.defect_share, rng)):
        decided = [Decided(f"{day}/{i}", float(scores[i]), threshold, bool(scores[i] > threshold), "1")
                   for i in parts]
        for item in pick(decided, args.reviews):
            if rng.random() < args.benchmark_share:
                i = int(item.image.split("/")[1])
                judging.append((int(labels[i]), float(scores[i]), item.weight))
        y = [j[0] for j in judging]
        if min(sum(y), len(y) - sum(y)) >= MIN_PER_CLASS:
            evidence = judge(y, [j[1] for j in judging], [j[2] for j in judging])
            found.append((evidence.auroc - truth, evidence.low <= truth <= evidence.high, evidence.high - evidence.low))
    return found


def run(data: str, args: argparse.Namespace) -> dict:
    category = load_category(data)
    split = split_line(category, args.k, args.seed, args.defect_share)
    detector, _ = Detector.fit([s.image() for s in split.upload], method_config(args.method, seed=args.seed),
                               device="cpu")
    scores = detector.score([s.image() for s in split.stream]).raw_scores
    held = detector.score([s.image() for s in split.held_out]).raw_scores
    truth = image_auroc([s.label for s in split.held_out], held)
    rng = np.random.default_rng(args.seed)
    labels = np.asarray([s.label for s in split.stream])
    days = [d for _ in range(args.replays)
            for d in replay(scores, labels, detector.threshold.value, truth, args, rng)]
    gaps = np.asarray([gap for gap, _, _ in days])
    return {"set": category.name, "method": args.method, "k": args.k, "seed": args.seed, "truth": truth,
            "replays": args.replays, "labelled_days": len(days),
            "mean_gap": float(gaps.mean()) if days else None,
            "mean_absolute_gap": float(np.abs(gaps).mean()) if days else None,
            "median_gap": float(np.median(gaps)) if days else None,
            "coverage": float(np.mean([covered for _, covered, _ in days])) if days else None,
            "mean_interval_width": float(np.mean([width for _, _, width in days])) if days else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--method", default="fast")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--per-day", type=int, default=60)
    parser.add_argument("--reviews", type=int, default=12)
    parser.add_argument("--defect-share", type=float, default=0.1)
    parser.add_argument("--benchmark-share", type=float, default=0.5, help="of the labels, the share that judges")
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    records = [run(data, args) for data in args.data]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"records": records, "setup": vars(args)}, indent=1))
    for r in records:
        print(f"{r['set']}: truth {r['truth']:.4f}, {r['labelled_days']} labelled days, mean gap {r['mean_gap']}, "
              f"mean absolute gap {r['mean_absolute_gap']}, coverage {r['coverage']}, "
              f"mean interval width {r['mean_interval_width']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
