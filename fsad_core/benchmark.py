"""The benchmark: methods x k x seeds on MVTec-layout categories, one record per run.

Record keys: dataset, category, method, k, seed, image_auroc, pixel_auroc, aupro, f1, fit_seconds,
score_ms_per_image, peak_rss_mb, backbone_ms_per_image; null where a metric is not defined (no
masks). `backbone_ms_per_image` is one plain forward of the backbone, timed in the same process on
the same threads beside each run, so every time of a record also reads as a ratio on any machine.
Beyond them: the intensity mode the fit used, the rates at the model's threshold (and
`best_miss_rate`, the fewest misses any threshold allows at the model's false-alarm target), the image AUROC
of each score component and of each defect type (against all normal test images).
F1 is taken at the model's own calibrated threshold, as a user would run it, not at a threshold
tuned on the test labels.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import psutil
import torch

from .backbone import create_backbone
from .data import Category, Sample, load_category
from .detector import Detector
from .devices import resolve_device
from .imageio import check_set_files
from .methods import method_config
from .metrics import (
    aupro,
    defect_type_aurocs,
    image_auroc,
    miss_rate_at_false_alarm_rate,
    pixel_auroc,
    rates_at_threshold,
    summarize,
)
from .options import SCORE_KINDS
from .progress import Progress, report
from .provenance import cpu_description, library_versions

RECORD_KEYS = ("dataset", "category", "method", "k", "seed", "image_auroc", "pixel_auroc", "aupro", "f1",
               "fit_seconds", "score_ms_per_image", "peak_rss_mb", "backbone_ms_per_image")
BACKBONE_BATCH, BACKBONE_SIDE = 16, 224  # the reference forward of `backbone_ms_per_image`
COMPONENT_METRICS = tuple(f"{name}_auroc" for name in SCORE_KINDS)
# What the model's own calibrated threshold (no test labels) does on the test images.
RATE_METRICS = ("f1", "false_alarm_rate", "miss_rate", "best_miss_rate")


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Samples this process's RSS every 50 ms; yields a one-element list filled with the peak (MB)."""
    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = [0.0]
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out[0] = max(peak[0], proc.memory_info().rss) / 2**20


@torch.inference_mode()
def backbone_ms_per_image(backbone: str, device: str | torch.device = "auto", repeats: int = 3) -> float:
    """Milliseconds an image of one plain forward of the backbone (`BACKBONE_BATCH` views at
    `BACKBONE_SIDE`), the best of a few after a warm-up: the unit a record's times are read in."""
    dev = resolve_device(device)
    net = create_backbone(backbone, pretrained=False).to(dev).eval()
    batch = torch.rand(BACKBONE_BATCH, 3, BACKBONE_SIDE, BACKBONE_SIDE, generator=torch.Generator().manual_seed(0))
    batch = batch.to(dev)
    best = float("inf")
    for attempt in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        net(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if attempt:  # the first forward warms up allocators and kernels
            best = min(best, time.perf_counter() - start)
    return best * 1000 / BACKBONE_BATCH


def stratified_subset(samples: list[Sample], n: int | None, seed: int = 0) -> list[Sample]:
    """At most n test samples, keeping the defect types' proportions (for quick runs only)."""
    if n is None or n >= len(samples):
        return samples
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.defect_type, []).append(s)
    out: list[Sample] = []
    for items in groups.values():
        take = max(1, round(n * len(items) / len(samples)))
        out += [items[i] for i in sorted(rng.choice(len(items), size=min(take, len(items)), replace=False))]
    return out


@dataclass
class CategoryCache:
    """Decoded test images and masks of one category, shared by all its runs."""

    category: Category
    images: list[np.ndarray]
    labels: np.ndarray
    defect_types: list[str]
    masks: list[np.ndarray] | None

    @classmethod
    def load(cls, root: Path, max_test: int | None) -> CategoryCache:
        cat = load_category(root)
        test = stratified_subset(cat.test, max_test)
        images = [s.image() for s in test]
        masks = [s.mask(img.shape[:2]) for s, img in zip(test, images)] if cat.has_masks else None
        return cls(cat, images, np.asarray([s.label for s in test]), [s.defect_type for s in test], masks)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a category, a method, k and a seed."""

    root: str
    dataset: str
    method: str
    k: int
    seed: int

    def label(self) -> str:
        return f"{self.dataset}/{Path(self.root).name} {self.method} k={self.k} seed={self.seed}"


def grid(roots: Iterable[Path], ks: Iterable[int], methods: Iterable[str], seeds: Iterable[int]
         ) -> tuple[list[Cell], list[str]]:
    """The runs of a benchmark in order (a category's runs together), and a note for each k a
    category has too few normal images for."""
    cells: list[Cell] = []
    skipped: list[str] = []
    for root in roots:
        dataset = root.parent.name if root.parent.name != root.name else root.name
        n_train = len(load_category(root).train)
        for k in ks:
            if k > n_train:
                skipped.append(f"skip {root.name} k={k}: only {n_train} training images")
                continue
            cells += [Cell(str(root), dataset, method, k, seed) for method in methods for seed in seeds]
    return cells, skipped


@lru_cache(maxsize=1)
def _cached_category(root: str, max_test: int | None) -> CategoryCache:
    """The category of the runs at hand: a category's consecutive runs, in one process or on one
    Dask worker, decode its test set once."""
    return CategoryCache.load(Path(root), max_test)


def run_cell(cell: Cell, max_test: int | None = None, device: str = "auto",
             progress: Progress | None = None, **overrides: object) -> dict:
    """The record of one run of the grid (see `run_one`)."""
    cache = _cached_category(cell.root, max_test)
    return run_one(cache, cell.dataset, cell.method, cell.k, cell.seed, device, progress, **overrides)


def write_records(path: Path, records: list[dict], env: dict) -> None:
    """The result file of a benchmark, rewritten after each run so that a stopped one keeps its records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"records": records, "environment": env}, indent=1))


def method_label(method: str, **overrides: object) -> str:
    """The method's name in records and tables, with any DetectorConfig override that is set, so
    that runs with and without one never share a row: `default`, `default[patch_size=224]`; a
    mapping of augmentation changes names each field: `default[hflip=False][vflip=False]`."""
    fields = [item for name, value in overrides.items() if value is not None
              for item in (value.items() if isinstance(value, Mapping) else [(name, value)])]
    return method + "".join(f"[{name}={value}]" for name, value in fields)


def run_one(cache: CategoryCache, dataset: str, method: str, k: int, seed: int, device: str = "auto",
            progress: Progress | None = None, **overrides: object) -> dict:
    """One fit and score; `overrides` are DetectorConfig fields (None: the method's own)."""
    config = method_config(method, seed=seed, **overrides)
    samples = cache.category.sample_k_shot(k, seed)
    check_set_files([s.path for s in samples], f"{cache.category.name}'s k = {k} training images")
    train = [s.image() for s in samples]
    with peak_rss() as peak:
        t0 = time.perf_counter()
        detector, _ = Detector.fit(train, config, device=device, progress=progress)
        fit_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = detector.score(cache.images, with_maps=cache.masks is not None, progress=progress)
        score_ms = (time.perf_counter() - t0) * 1000 / len(cache.images)
    rates = rates_at_threshold(cache.labels, result.raw_scores, detector.threshold.value)
    report(progress, "pixel metrics", 0, 2)
    pixel = pixel_auroc(cache.masks, result.maps) if cache.masks is not None else None
    report(progress, "pixel metrics", 1, 2)
    region = aupro(cache.masks, result.maps) if cache.masks is not None else None
    report(progress, "pixel metrics", 2, 2)
    return {
        "dataset": dataset, "category": cache.category.name, "method": method_label(method, **overrides),
        "k": k, "seed": seed, "intensity": detector.config.intensity,
        "image_auroc": image_auroc(cache.labels, result.scores),
        "pixel_auroc": pixel, "aupro": region,
        "f1": rates["f1"],
        "false_alarm_rate": rates["false_alarm_rate"], "miss_rate": rates["miss_rate"],
        "best_miss_rate": miss_rate_at_false_alarm_rate(cache.labels, result.scores,
                                                        detector.config.target_false_alarm_rate),
        "components_auroc": {name: image_auroc(cache.labels, v) for name, v in result.components.items()},
        "defect_type_auroc": defect_type_aurocs(cache.labels, cache.defect_types, result.scores),
        "fit_seconds": round(fit_seconds, 2), "score_ms_per_image": round(score_ms, 2),
        "peak_rss_mb": round(peak[0], 1), "n_test": len(cache.images),
        "backbone_ms_per_image": round(backbone_ms_per_image(detector.config.backbone, detector.device), 2),
    }


def environment() -> dict:
    dev = resolve_device("auto")
    return {
        **library_versions(), "python": platform.python_version(), "machine": platform.machine(),
        "cpu": cpu_description(), "cpu_count": psutil.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(dev) + (f" ({torch.cuda.get_device_name(0)})" if dev.type == "cuda" else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(records: list[dict], metrics: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro", "f1",
                                                           "fit_seconds")) -> list[dict]:
    """Rows of mean and std per (dataset, category, method, k) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["category"], r["method"], r["k"]), []).append(r)
    rows = []
    in_order = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2]))  # k before method
    for (dataset, category, method, k), items in in_order:
        row = {"dataset": dataset, "category": category, "method": method, "k": k, "seeds": len(items)}
        for m in metrics:
            row[m] = summarize([r.get(m) for r in items])
        rows.append(row)
    return rows


def with_component_metrics(record: dict) -> dict:
    """The record with the image AUROC of each score component under its own key (`patch_auroc`, ...):
    which component carries a product is what a per-product `score` choice rests on."""
    components = record.get("components_auroc") or {}
    return {**record, **{metric: components.get(name) for name, metric in zip(SCORE_KINDS, COMPONENT_METRICS)}}


def with_defect_type_metrics(record: dict, defect_types: Iterable[str]) -> dict:
    """The record with the image AUROC of each defect type under its own key (`crack_auroc`, ...);
    None for a type the record's test set lacks."""
    per_type = record.get("defect_type_auroc") or {}
    return {**record, **{f"{name}_auroc": per_type.get(name) for name in defect_types}}


def format_table(rows: list[dict], markdown: bool = False) -> str:
    metrics = [m for m in rows[0] if m not in ("dataset", "category", "method", "k", "seeds")] if rows else []
    head = ["dataset/category", "method", "k", "seeds", *metrics]

    def cell(v: object) -> str:
        if isinstance(v, tuple):
            mean, std = v
            return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"
        return str(v)

    body = [[f"{r['dataset']}/{r['category']}" if r["dataset"] != r["category"] else r["category"], r["method"],
             str(r["k"]), str(r["seeds"]), *[cell(r[m]) for m in metrics]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *body])
