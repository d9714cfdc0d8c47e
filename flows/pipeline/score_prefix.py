"""Batch scoring (deployment ``score-prefix``, ``fsad score-prefix``): every image under a storage
prefix scored by a product's champion, the decisions written back beside them as JSON Lines.

The champion's alias is read once: the whole run scores with the version it stood for then. A
product without a champion (its first model missed the gate) is decided by its candidate in
shadow: the decisions say so (alias ``candidate``) and serve the review queue, whose labels may
make a champion of a later version. Each
batch of images is a task (on Dask when given one, see `flows.pipeline.runners`) that writes its decisions
as one part file under ``PREFIX/fsad-decisions/MODEL/vVERSION/`` once the batch is scored. A run
that stops keeps its finished parts; the next run of the same version scores only the images no
part holds yet (new images included). An image that cannot be read gets a line with its reason.
The product's review queue draws from the run's new decisions at the end (`flows.store.queue`), their
pictures drawn with the champion, and the run recorded in the product's line log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task

from flows.mlops import registry
from flows.pipeline.retries import IO_RETRIES
from flows.pipeline.runners import task_runner
from flows.settings import load_settings, loop_settings, product_overrides
from flows.store.line_log import record_line_run
from flows.store.queue import OVERLAY, THUMB, Decided, QueueItem, media_key, pick, read_queue, write_queue
from flows.store.storage import ObjectNotFound, StorageKeyError, Store, open_store
from fsad_core.decision import Decision, decided, undecided
from fsad_core.detector import Detector
from fsad_core.devices import configured_device
from fsad_core.imageio import ImageLimits, ImageReadError, PixelBudget, image_limits, is_image_name, read_header
from fsad_core.overlay import overlay, png_bytes, thumbnail

DECISIONS_DIR = "fsad-decisions"
BATCH = 16  # images a task: enough to batch the backbone, few enough that a stop loses little
PART_NAME = re.compile(r"part-[0-9a-f]{16}\.jsonl")
PICTURE_SIDE = 320  # pixels of a queued image's longer side on the review page
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Summary:
    model: str
    images: int       # images under the prefix
    already: int      # decided by an earlier run of the same version
    scored: int       # decided now
    anomalies: int    # of those, flagged
    unreadable: int   # of those, not judged (their lines say why)
    decisions: str    # where the part files are
    queued: int       # images in the product's review queue now


def decisions_prefix(name: str, version: str) -> str:
    return f"{DECISIONS_DIR}/{name}/v{version}/"


def part_key(prefix: str, keys: list[str]) -> str:
    """A batch's part file, named by its images: a batch run again replaces its own part."""
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    return f"{prefix}part-{digest}.jsonl"  # as PART_NAME reads it


def decision_lines(store: Any, prefix: str) -> list[dict[str, Any]]:
    """The decisions the part files under ``prefix`` hold. Other objects there are not ours and
    are passed over; a part file that cannot be read is named in a warning and its images are
    decided again (its batch writes it anew)."""
    lines: list[dict[str, Any]] = []
    for key in store.list(prefix):
        if not PART_NAME.fullmatch(key[len(prefix):]):
            continue
        try:
            part = [json.loads(line) for line in store.get_bytes(key).decode().splitlines() if line]
            lines += [line for line in part if isinstance(line["image"], str)]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: not a part file of decisions (%s: %s); its images are decided again",
                        store.uri(key), type(exc).__name__, exc)
    return lines


def already_decided(store: Any, prefix: str) -> set[str]:
    """The images the part files under ``prefix`` already hold a decision for."""
    return {line["image"] for line in decision_lines(store, prefix)}


@task(**IO_RETRIES)
def refresh_queue(url: str, product: str, prefix: str, version: str, ref: str, new: dict[str, int]) -> int:
    """The product's review queue with this run's draw from its ``new`` decisions (key under
    ``url`` -> size) added, and their pictures drawn; how many images it holds. The version's earlier draws
    stay on record (the escape estimate counts every labelled one since the version came)."""
    store, settings = open_store(url), load_settings()
    product_store = open_store(settings.storage_url)
    scored = [line for line in decision_lines(store, prefix) if line["image"] in new and line.get("score") is not None]
    keys = {store.uri(line["image"]): line["image"] for line in scored}
    decided = [Decided(store.uri(line["image"]), float(line["score"]), float(line["threshold"]),
                       bool(line["is_anomaly"]), version) for line in scored]
    items = pick(decided, loop_settings(*product_overrides(settings, product_store, product)).reviews_per_run)
    drawn = {item.image for item in items}
    kept = [item for item in read_queue(product_store, product) if item.version == version and item.image not in drawn]
    draw_pictures(store, product_store, product, [(item, keys[item.image], new[keys[item.image]]) for item in items],
                  _champion(ref))
    write_queue(product_store, product, kept + items)
    return len(items) + len(kept)


def draw_pictures(store: Store, product_store: Store, product: str, items: list[tuple[QueueItem, str, int]],
                  detector: Detector) -> None:
    """The thumbnail and the overlay (the model's shared colour scale) of each (queued image, its
    key in ``store``, its size) that has none yet; an image that cannot be read any more gets none."""
    todo = [(item, key, size) for item, key, size in items
            if not product_store.exists(media_key(product, item, OVERLAY))]
    images, _ = _read(store, [(key, size) for _, key, size in todo], image_limits())
    todo = [(item, key) for item, key, _ in todo if key in images]
    if not todo:
        return
    maps = detector.score([images[key] for _, key in todo], with_maps=True).maps or []
    anchor = detector.map_anchor()
    for (item, key), amap in zip(todo, maps):
        small = thumbnail(images[key], PICTURE_SIDE)
        product_store.put_bytes(media_key(product, item, THUMB), png_bytes(small), "image/png")
        picture = overlay(small, thumbnail(amap, PICTURE_SIDE), anchor)
        product_store.put_bytes(media_key(product, item, OVERLAY), png_bytes(picture), "image/png")


@lru_cache(maxsize=2)
def _champion(ref: str) -> Detector:
    """One load a process: a Dask worker's batches share it."""
    return Detector.load(registry.download_model(ref), device=configured_device())


@task(**IO_RETRIES)
def score_batch(url: str, objects: list[tuple[str, int]], ref: str, model: dict[str, str], part: str
                ) -> dict[str, int]:
    """Score the (key, size) ``objects`` and write their decisions to ``part``; counts of what was decided."""
    store, detector = open_store(url), _champion(ref)
    images, errors = _read(store, objects, image_limits())
    scores = detector.score(list(images.values())).raw_scores if images else []
    by_key = {d.image: d for d in decided(list(images), scores, detector.threshold)}
    decisions = [by_key.get(key) or undecided(key, errors[key]) for key, _ in objects]
    store.put_bytes(part, "".join(_line(d, model) for d in decisions).encode(), "application/x-ndjson")
    return {"scored": len(decisions), "anomalies": sum(d.is_anomaly for d in decisions), "unreadable": len(errors)}


def _line(decision: Decision, model: dict[str, str]) -> str:
    """A decision as a line of a part file."""
    return json.dumps({"image": decision.image, "score": decision.score, "is_anomaly": decision.is_anomaly,
                       "threshold": decision.threshold, "model": model, "error": decision.error}) + "\n"


def _read(store: Any, objects: list[tuple[str, int]], limits: ImageLimits
          ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """key -> image for what can be judged, key -> reason for the rest: sizes checked before a
    read, the batch's decoded pixels kept within the set budget from each header before decoding."""
    images: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    budget = PixelBudget(limits, "the batch up to {label}")
    for key, size in objects:
        try:
            limits.check_bytes(size, key)
            images[key] = budget.admit(read_header(store.get_bytes(key), key, limits)).decode(limits)
        except (ImageReadError, ObjectNotFound, StorageKeyError) as exc:  # storage down: the task fails, is retried
            errors[key] = str(exc)
    return images, errors


@flow(name="score-prefix-batches")
def batches_flow(url: str, batches: list[list[tuple[str, int]]], ref: str, model: dict[str, str], prefix: str
                 ) -> list[dict]:
    futures = [score_batch.submit(url, objects, ref, model, part_key(prefix, [key for key, _ in objects]))
               for objects in batches]
    return [future.result() for future in futures]


@flow(name="score-prefix")
def score_prefix_flow(product: str, url: str, batch: int | None = None, dask: str | None = None) -> dict[str, Any]:
    """Decide every image under ``url`` (``s3://BUCKET/PREFIX`` or a folder) with ``product``'s
    champion (its candidate in shadow before there is one), ``batch`` images a task (default `BATCH`);
    returns the run's `Summary`."""
    batch = BATCH if batch is None else batch
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    alias = registry.deciding_alias(product)
    if alias is None:
        raise registry.RegistryError(f"product {product} has no registered model yet; `fsad retrain --product "
                                     f"{product}` registers one")
    name, version = registry.resolve_model(f"models:/{registry.model_name(product)}@{alias}")
    ref = f"models:/{name}/{version}"
    registry.download_model(ref)  # once here: the tasks of this machine then find it
    store, prefix = open_store(url), decisions_prefix(name, version)
    images = sorted((i.key, i.size) for i in store.list_info()
                    if is_image_name(i.key) and not i.key.startswith(f"{DECISIONS_DIR}/"))
    done = already_decided(store, prefix)
    todo = [(key, size) for key, size in images if key not in done]
    batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    model = {"name": name, "version": version, "alias": alias}
    run_batches = batches_flow.with_options(task_runner=task_runner(dask))
    counts = run_batches(url, batches, ref, model, prefix) if batches else []
    scored, flagged, unreadable = (sum(c[field] for c in counts) for field in ("scored", "anomalies", "unreadable"))
    queued = refresh_queue(url, product, prefix, version, ref, dict(todo))
    record_line_run(open_store(load_settings().storage_url), product, version, scored, flagged, unreadable, queued)
    shadow = "" if alias == registry.CHAMPION else ": no champion yet, its decisions fill the review queue only"
    summary = Summary(f"{name} version {version} (@{alias}{shadow})", len(images), len(images) - len(todo),
                      scored, flagged, unreadable, store.uri(prefix), queued)
    get_run_logger().info("%s", summary)
    return asdict(summary)
