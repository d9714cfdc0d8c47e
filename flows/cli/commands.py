"""The model commands of the CLI: train, score, bench, report, and a product's training settings.
Each reads files, calls fsad_core, writes files."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from fsad_core.data import find_all_categories, load_category
from fsad_core.decision import Decision, decided, undecided
from fsad_core.detector import Detector
from fsad_core.export import ExportedDetector
from fsad_core.imageio import (
    Header,
    ImageLimits,
    ImageReadError,
    PixelBudget,
    check_set_files,
    image_limits,
    is_image_name,
    read_header,
    read_image,
)
from fsad_core.methods import method_config
from fsad_core.options import FLIPS
from fsad_core.overlay import save_overlay
from fsad_core.preprocess import stretch_warning
from fsad_core.progress import ProgressLine
from fsad_core.units import AT_THRESHOLD, from_unit


def console_progress(label: str, stream: TextIO = sys.stderr) -> ProgressLine:
    """A fit's progress on the console: one updating line on a terminal, a line every few seconds otherwise."""
    tty = stream.isatty()

    def emit(text: str) -> None:
        stream.write(("\r" + text.ljust(78) + ("\n" if " calibrate " in text else "")) if tty else text + "\n")
        stream.flush()

    return ProgressLine(emit, label, every_s=0.2) if tty else ProgressLine(emit, label)


# DetectorConfig fields that `fsad train` and `fsad bench` both take as options (None: the method's own),
# besides --flips and --rotation (AugmentConfig fields).
CONFIG_OPTIONS = ("backbone", "size", "patch_size", "resize", "intensity", "pooling", "coreset_candidates",
                  "map_sigma", "target_false_alarm_rate")


def _config_options(args: argparse.Namespace) -> dict[str, object]:
    """The options as DetectorConfig overrides; --flips and --rotation as changes to the method's augmentations."""
    augment: dict[str, object] = {}
    if args.flips is not None:
        augment["hflip"], augment["vflip"] = FLIPS[args.flips]
    if args.rotation is not None:
        augment["rotation_deg"] = args.rotation
    return {**{name: getattr(args, name) for name in CONFIG_OPTIONS}, "augment": augment or None}


def train(args: argparse.Namespace) -> int:
    category = load_category(args.data)
    samples = category.sample_k_shot(args.k, args.seed)
    check_set_files([s.path for s in samples], f"the {args.k} training images of {args.data}")
    images = [s.image() for s in samples]
    config = method_config(args.method, seed=args.seed, weights=args.weights, source="the command line",
                           score=args.score, **_config_options(args))
    if note := stretch_warning([img.shape for img in images], config.resize):
        print(f"note: {note} (--resize tile)", file=sys.stderr)
    detector, report = Detector.fit(images, config, device=args.device, progress=console_progress(f"train k={args.k}"))
    extra = {"method": args.method, "k": args.k, "seed": args.seed,
             "training_images": [str(s.path) for s in samples], "fit_report": report.to_dict()}
    out = detector.save(args.out, extra_config=extra)
    t = detector.threshold
    far = "unknown" if t.expected_false_alarm_rate is None else f"{t.expected_false_alarm_rate:.3g}"
    print(f"model written to {out} (fit {report.seconds:.1f} s; intensity {detector.config.intensity}; threshold "
          f"{AT_THRESHOLD:g} in the score unit, the model's own score {t.value:.4g}, rule {t.rule}, expected "
          f"false-alarm rate {far})")
    if t.details.get("provisional"):
        print(f"note: the threshold is provisional ({t.details['provisional_reason']})", file=sys.stderr)
    return 0


def collect_images(paths: list[str]) -> list[tuple[Path, Path]]:
    """Each image named, or found under a named folder, with the relative path its map file would
    mirror (within that folder; the name of a file named directly)."""
    found: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += [(f, f.relative_to(p)) for f in sorted(p.rglob("*")) if f.is_file() and is_image_name(f.name)]
        elif p.exists():
            found.append((p, Path(p.name)))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not found:
        raise FileNotFoundError(f"no images found in {' '.join(paths)}")
    return found


def map_files(inputs: list[tuple[Path, Path]]) -> dict[Path, Path]:
    """Each input's map file (relative to --maps); inputs that would share one are refused, so no
    output overwrites another."""
    owner: dict[Path, Path] = {}
    for path, mirror in inputs:
        other = owner.setdefault(map_name(mirror), path)
        if other != path:
            raise ValueError(f"{other} and {path} would share the map file {map_name(mirror)}: score them in "
                             "separate runs, or name the folder that holds both")
    return {path: map_name(mirror) for path, mirror in inputs}


def _map_outputs(args: argparse.Namespace, map_of: dict[Path, Path]) -> list[Path]:
    """Every file --maps (and --raw-maps) would write."""
    if not args.maps:
        return []
    overlays = [Path(args.maps) / rel for rel in map_of.values()]
    return overlays + ([p.with_suffix(".npy") for p in overlays] if args.raw_maps else [])


def check_outputs_spare_inputs(files: list[Path], out: str | None, maps: list[Path]) -> None:
    """ValueError, before anything is written, when an output file is one of the images to score:
    it would be overwritten before it is read (--out) or replace an input (--maps)."""
    inputs = {path.resolve(): path for path in files}
    for option, targets in (("--out", [Path(out)] if out else []), ("--maps", maps)):
        for target in targets:
            if target.resolve() in inputs:
                raise ValueError(f"{option} would write {target}, which is one of the images to score "
                                 f"({inputs[target.resolve()]}); write elsewhere")


def map_name(mirror: Path) -> Path:
    """The overlay's path under --maps for an input's mirrored relative path."""
    return mirror.with_name(f"{mirror.stem}_map.png")


Scorer = Detector | ExportedDetector  # what `fsad score` decides with: the torch runtime's or onnxruntime's


@dataclass(frozen=True)
class ModelSource:
    """Where a scoring model came from: a folder, or a registry version and the alias asked for."""

    folder: Path
    name: str | None = None
    version: str | None = None
    alias: str | None = None

    def label(self) -> str:
        if self.name is None:
            return str(self.folder)
        return f"{self.name} version {self.version}" + (f" (@{self.alias})" if self.alias else "")

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": self.alias, "folder": str(self.folder)}


def load_model(ref: str, device: str, runtime: str = "torch") -> tuple[Scorer, ModelSource]:
    """The model to score with: a folder or registry version for torch; an exported folder for onnx."""
    if runtime == "onnx":
        exported = ExportedDetector(ref)
        return exported, ModelSource(Path(ref), *(exported.source.get(key) for key in ("name", "version", "alias")))
    if ref.startswith("models:/"):
        from flows.mlops.registry import download_model, resolve_model
        name, version = resolve_model(ref)
        source = ModelSource(download_model(f"models:/{name}/{version}"), name, version, ref.partition("@")[2] or None)
    else:
        source = ModelSource(Path(ref))
    return Detector.load(source.folder, device=device), source


CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
SCORE_BATCH = 8  # images scored together; meanwhile a thread decodes the next batch


def _read_batch(paths: list[Path], limits: ImageLimits) -> list[tuple[Path, np.ndarray | ImageReadError]]:
    out: list[tuple[Path, np.ndarray | ImageReadError]] = []
    for path in paths:
        try:
            out.append((path, read_image(path, limits=limits)))
        except ImageReadError as exc:
            out.append((path, exc))
    return out


def _chunks(paths: list[Path], limits: ImageLimits, size: int) -> list[list[Path]]:
    """Batches of at most ``size`` files whose decoded pixels (from the headers) stay within half the
    set budget: two batches are held at once, the one scored and the one being decoded."""
    chunks: list[list[Path]] = [[]]
    budget = PixelBudget(limits, "a batch", share=2)
    for path in paths:
        try:
            header = read_header(path, limits=limits)
        except ImageReadError:  # refused again, with its reason, when its batch is read
            header = Header(path, str(path), 0, 0)
        if chunks[-1] and (len(chunks[-1]) == size or not budget.fits(header)):
            chunks.append([])
            budget = PixelBudget(limits, "a batch", share=2)
        chunks[-1].append(path)
        budget.add(header)  # an image above the share is a batch of its own
    return [chunk for chunk in chunks if chunk]


def decoded_batches(paths: list[Path], limits: ImageLimits, size: int = SCORE_BATCH
                    ) -> Iterator[list[tuple[Path, np.ndarray | ImageReadError]]]:
    """The files in order, in batches of (path, image or the reason it cannot be read); the next
    batch is decoded in a thread while the caller scores this one (decoding releases the GIL)."""
    chunks = _chunks(paths, limits, size)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(_read_batch, chunk, limits) for chunk in chunks[:1]]
        for following in chunks[1:]:
            pending.append(pool.submit(_read_batch, following, limits))
            yield pending.pop(0).result()
        if pending:
            yield pending.pop(0).result()


def score(args: argparse.Namespace) -> int:
    if args.raw_maps and not args.maps:
        raise ValueError("--raw-maps writes beside the overlays: give --maps DIR too")
    inputs = collect_images(args.images)  # a missing input is named before the model loads
    files = [path for path, _ in inputs]
    map_of = map_files(inputs) if args.maps else {}
    check_outputs_spare_inputs(files, args.out, _map_outputs(args, map_of))
    if args.maps and args.runtime == "onnx":
        raise ValueError("--maps draws with the torch runtime; the exported model gives decisions")
    limits = image_limits()
    detector, source = load_model(args.model, args.device, args.runtime)
    print(f"fsad score: model {source.label()}", file=sys.stderr)
    cut = _decision_cut(detector, args.threshold)
    maps = MapWriter(Path(args.maps), map_of, detector.map_anchor(from_unit(cut, detector.threshold.value)),
                     args.raw_maps) if args.maps else None
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    write = JsonLines(out, source) if args.json else CsvRows(out, source)
    try:
        failed = _score_files(detector, files, limits, cut, write, maps)
    finally:
        if args.out:
            out.close()
    print(f"fsad score: {len(files) - failed} scored, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _decision_cut(detector: Scorer, asked: float | None) -> float:
    """The threshold asked for in the score unit, else the model's own, 0.5 (with a note when that
    one is provisional)."""
    if asked is not None:
        return asked
    if detector.threshold.details.get("provisional"):
        print(f"note: the threshold is provisional ({detector.threshold.details['provisional_reason']})",
              file=sys.stderr)
    return AT_THRESHOLD


Writer = Callable[[Decision], None]


@dataclass(frozen=True)
class MapWriter:
    """`fsad score --maps`: each image's overlay at its own path under the folder, and with --raw-maps
    the map itself as .npy beside it."""

    folder: Path
    files: dict[Path, Path]  # input image -> its overlay's path under the folder (`map_files`)
    anchor: float  # the map level of the threshold: one colour scale for every overlay (`Detector.map_anchor`)
    raw: bool

    def write(self, path: Path, image: np.ndarray, amap: np.ndarray) -> None:
        target = self.folder / self.files[path]
        target.parent.mkdir(parents=True, exist_ok=True)
        save_overlay(image, amap, target, self.anchor)
        if self.raw:
            np.save(target.with_suffix(".npy"), amap.astype(np.float32))


def _score_files(detector: Scorer, files: list[Path], limits: ImageLimits, cut: float, write: Writer,
                 maps: MapWriter | None) -> int:
    """Score the files batch by batch, a row for each in their order (an unreadable one with its
    error, flagged: `fsad_core.decision.undecided`) and maps; returns how many could not be read."""
    failed = 0
    for batch in decoded_batches(files, limits):
        good = [(path, image) for path, image in batch if not isinstance(image, ImageReadError)]
        by_path: dict[Path, Decision] = {}
        if good:
            result = detector.score([image for _, image in good], with_maps=maps is not None)
            by_path = dict(zip([path for path, _ in good],
                               decided([str(path) for path, _ in good], result.raw_scores, detector.threshold, cut)))
            if maps is not None:
                for (path, image), amap in zip(good, result.maps):
                    maps.write(path, image, amap)
        for path, problem in batch:
            if isinstance(problem, ImageReadError):
                print(f"fsad score: not judged: {problem}", file=sys.stderr)
                failed += 1
            write(by_path.get(path) or undecided(str(path), str(problem), cut))
    return failed


class CsvRows:
    """`fsad score`'s default output: a header, then a CSV row an image."""

    def __init__(self, out: TextIO, source: ModelSource):
        self.writer = csv.writer(out)
        self.writer.writerow(["image", "score", "is_anomaly", "threshold", "model", "error"])
        self.model = source.label()

    def __call__(self, decision: Decision) -> None:
        score = "" if decision.score is None else f"{decision.score:.6g}"
        self.writer.writerow([csv_text(decision.image), score, int(decision.is_anomaly), f"{decision.threshold:.6g}",
                              csv_text(self.model), csv_text(decision.error)])


def csv_text(text: str) -> str:
    """A text cell a spreadsheet shows as text: one that begins like a formula (``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return) gets a leading apostrophe, as OWASP advises for CSV exports."""
    return f"'{text}" if text[:1] in CSV_FORMULA_STARTS else text


class JsonLines:
    """`fsad score --json`: a JSON object a line, with the model it resolved to."""

    def __init__(self, out: TextIO, source: ModelSource):
        self.out = out
        self.model = source.to_dict()

    def __call__(self, decision: Decision) -> None:
        self.out.write(json.dumps({"image": decision.image, "score": decision.score,
                                   "is_anomaly": decision.is_anomaly, "threshold": decision.threshold,
                                   "model": self.model, "error": decision.error}, allow_nan=False) + "\n")


def export(args: argparse.Namespace) -> int:
    from fsad_core.export import check_out, export_onnx
    check_out(args.out)
    detector, source = load_model(args.model, "cpu")
    given = [path for path, _ in collect_images(args.images)] if args.images else []
    images = [read_image(path) for path in given] or own_images(source.folder)
    check = export_onnx(detector, args.out, images, source.to_dict())
    print(f"exported {source.label()} to {args.out} (onnx): checked on {check.images} images, {len(images)} of the "
          f"model's and a defect made on each ({check.flagged_by_torch} flagged by torch): largest difference "
          f"{check.max_unit_difference:.2g} in the score unit, the same decisions")
    return 0


def own_images(folder: Path) -> list[np.ndarray]:
    """A model's training images: the files `fsad train` recorded, or its upload's from the store."""
    config = json.loads((folder / "config.json").read_text())
    if files := config.get("training_images"):
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: a training image of the model is gone; give --images")
        return [read_image(f) for f in files]
    if config.get("product") and config.get("upload_id"):
        from flows.settings import load_settings
        from flows.store.storage import open_store
        from flows.store.upload import training_files
        store = open_store(load_settings().storage_url)
        return [read_image(blob, key) for key, blob in training_files(store, config["product"], config["upload_id"])]
    raise ValueError("the model records no training images of its own: give --images")


def bench(args: argparse.Namespace) -> int:
    from fsad_core.benchmark import environment, format_table, grid, run_cell, table, write_records
    if args.dask:
        from flows.pipeline.bench_flow import benchmark_flow
        from flows.pipeline.runners import prefect_api
        with prefect_api():
            records = benchmark_flow(data=args.data, k=args.k, seeds=args.seeds, methods=args.methods, out=args.out,
                                     max_test=args.max_test, device=args.device, overrides=_config_options(args),
                                     dask=args.dask)["records"]
    else:
        cells, skipped = grid(find_all_categories(args.data), args.k, args.methods, args.seeds)
        for note in skipped:
            print(note, file=sys.stderr)
        records, env, overrides = [], environment(), _config_options(args)
        for i, cell in enumerate(cells, 1):
            label = f"[{i}/{len(cells)}] {cell.label()}"
            records.append(run_cell(cell, args.max_test, args.device, console_progress(label), **overrides))
            print(f"{label}: image AUROC {records[-1]['image_auroc']:.3f} (fit {records[-1]['fit_seconds']:.0f} s)",
                  file=sys.stderr)
            write_records(Path(args.out), records, env)
    rows = table(records)
    print(format_table(rows))
    if args.report:
        Path(args.report).write_text(format_table(rows, markdown=True) + "\n")
    return 0


def report(args: argparse.Namespace) -> int:
    """Merge result files of several ``fsad bench`` runs into one table (later files win for the
    same dataset, category, method, k and seed)."""
    from fsad_core.benchmark import (
        COMPONENT_METRICS,
        RATE_METRICS,
        format_table,
        table,
        with_component_metrics,
        with_defect_type_metrics,
    )
    merged: dict[tuple, dict] = {}
    for name in args.results:
        try:
            records = json.loads(Path(name).read_text())["records"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{name}: not a result file of fsad bench ({exc})") from None
        for r in records:
            merged[(r["dataset"], r["category"], r["method"], r["k"], r["seed"])] = r
    if not merged:
        raise ValueError("no records in " + " ".join(args.results))
    if args.components:
        rows = table([with_component_metrics(r) for r in merged.values()], COMPONENT_METRICS)
    elif args.rates:
        rows = table(list(merged.values()), RATE_METRICS)
    elif args.defect_types:
        types = sorted({t for r in merged.values() for t in r.get("defect_type_auroc") or {}})
        if not types:
            raise ValueError("no per-defect-type AUROC in these records (an older fsad bench did not write it)")
        rows = table([with_defect_type_metrics(r, types) for r in merged.values()],
                     tuple(f"{t}_auroc" for t in types))
    else:
        rows = table(list(merged.values()))
    print(format_table(rows, markdown=args.markdown))
    return 0


def product_settings(args: argparse.Namespace) -> int:
    """Show, set (from a JSON file, checked before it is stored) or clear a product's own training
    settings: ``products/P/training.json``, merged over FSAD_TRAIN_OVERRIDES by the retraining flows."""
    from flows.settings import (
        SettingsError,
        load_settings,
        loop_settings,
        merge_overrides,
        read_product_training,
        training_config,
    )
    from flows.store.storage import open_store, training_key

    settings = load_settings()
    store = open_store(settings.storage_url)
    key = training_key(args.product)
    if args.set is not None:
        try:
            own = json.loads(Path(args.set).read_text())
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{args.set}: not valid JSON ({exc})") from None
        if not isinstance(own, dict):
            raise SettingsError(f"{args.set}: must be a JSON object of DetectorConfig fields")
        merged, source = merge_overrides(settings.train_overrides, own), f"FSAD_TRAIN_OVERRIDES with {args.set}"
        training_config("default", 0, merged, source)
        loop_settings(merged, source)
        store.put_json(key, own)
    elif args.clear:
        store.delete(key)
    own = read_product_training(store, args.product)
    shown = json.dumps(own, indent=1) if own else "none: FSAD_TRAIN_OVERRIDES and the method defaults apply"
    print(f"{store.uri(key)}: {shown}")
    return 0
