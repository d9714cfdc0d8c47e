"""The retraining flow: one upload of one product, from storage to a promoted model.

    load manifest -> validate (GX; a failed upload is quarantined, logged and the flow fails)
    -> already trained? (same content_sha256 + configuration: stop) -> load images -> fine-tune
    -> benchmark scores -> evaluate -> log to MLflow -> register (alias candidate)
    -> gate -> verify + promote (aliases champion / previous)

From the idempotency check to the alias moves, one run per product holds its product's lock (a
Prefect server's leased concurrency slot ``fsad-retrain-PRODUCT``, or a file lock where flows
report to a temporary server of the process), so two runs of the same upload train once.
Storage reads and MLflow calls are tasks with retries; a permanent error (bad input, missing
object) is not retried. Light, JSON-able task results are persisted so a retried flow run does not
repeat them; images, models and scores stay in memory. Fine-tuning on CUDA is tagged ``gpu`` and
holds a slot of the global concurrency limit ``gpu`` when one exists (no limit: no waiting).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
from filelock import FileLock
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from flows.mlops import control, registry, tracking
from flows.mlops.registry import RegistryError
from flows.mlops.run_report import PER_ROLE, GalleryItem, gallery_picks
from flows.pipeline.retries import IO_RETRIES, PermanentError
from flows.pipeline.runners import api_is_temporary
from flows.pipeline.summary import (
    ALREADY_TRAINED,
    GATE_FAILED,
    PINNED,
    PROMOTED,
    GateSummary,
    RetrainSummary,
    ThresholdSummary,
    TrainedSummary,
    TrainingSummary,
)
from flows.settings import (
    LoopSettings,
    Settings,
    config_sha256,
    load_settings,
    loop_settings,
    product_overrides,
    training_config,
)
from flows.store.labels import DEFECT, LabelEntry, LabelSnapshot, current_labels
from flows.store.storage import (
    latest_complete_upload,
    manifest_key,
    open_store,
)
from flows.store.upload import ManifestError, content_sha256, read_checked, read_manifest
from flows.store.validation import ValidationReport, quarantine_upload, validate_upload, write_report
from fsad_core.calibration import Threshold, lower_to_miss_target
from fsad_core.config import DetectorConfig
from fsad_core.detector import Detector
from fsad_core.devices import resolve_device
from fsad_core.evidence import MIN_PER_CLASS, SYNTHETIC, Evidence, best_candidate, judge
from fsad_core.fitting import FitReport
from fsad_core.imageio import PixelBudget, image_limits, read_header
from fsad_core.metrics import image_auroc, rates_at_threshold
from fsad_core.preprocess import stretch_warning
from fsad_core.progress import ProgressLine

GPU_LIMIT = "gpu"
PRODUCT_LOCK_PREFIX = "fsad-retrain-"
PRODUCT_LOCK_LEASE_S = 60  # a killed run frees its product within this; renewed while the run lives
LABELLED, LOO_SYNTHETIC = "labelled", "loo+synthetic"
DAY0_METHOD = "default"  # without labelled evidence: the best worst case over the shared sets (docs/loop.md)


class UploadRejected(RuntimeError):
    """The upload failed validation; it was quarantined and its report logged."""


class NoUpload(PermanentError):
    """No (complete) upload to train on."""


@dataclass
class UploadData:
    """Decoded images of a retraining: the normal training images (the upload's, then confirmed
    normals), the labelled benchmark (the upload's eval set and the labels that judge) and, where
    the product's settings use them, the training side's confirmed defects."""

    train: list[np.ndarray]
    eval_images: list[np.ndarray]
    eval_labels: list[int]
    eval_keys: list[str]
    eval_weights: list[float]  # what each benchmark image counts for: 1 for the upload's, a label's `judging_weight`
    # fine-tuning negatives (`loop.defect_negatives`) or what the threshold must catch (`loop.miss_rate_target`)
    defects: list[np.ndarray] = field(default_factory=list)

    @property
    def has_labelled_benchmark(self) -> bool:
        """Both kinds among the benchmark's images: an AUROC to be had."""
        return len(set(self.eval_labels)) == 2


@dataclass
class Benchmark:
    """The set the model is judged on: the labelled images, or leave-one-out normals + synthetic
    anomalies; with its evidence (interval, counts, kind)."""

    kind: str
    labels: list[int]
    scores: np.ndarray
    components: dict[str, np.ndarray]
    evidence: Evidence


# ---- storage and validation -----------------------------------------------------------------

@task(**IO_RETRIES)
def resolve_upload(settings: Settings, product: str, upload_id: str | None) -> str:
    if upload_id is not None:
        return upload_id
    latest = latest_complete_upload(open_store(settings.storage_url), product)
    if latest is None:
        raise NoUpload(f"no complete upload of product {product} in {settings.storage_url}")
    return latest.upload_id


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def training_overrides(settings: Settings, product: str) -> tuple[dict[str, Any], str]:
    """FSAD_TRAIN_OVERRIDES with the product's own settings (``products/P/training.json``) over them."""
    return product_overrides(settings, open_store(settings.storage_url), product)


@task(**IO_RETRIES)
def load_manifest(settings: Settings, product: str, upload_id: str) -> dict[str, Any] | None:
    """The manifest; None when it exists but is malformed (validation then rejects the upload).
    No manifest at all means the upload is incomplete (maybe still being written): not ours to judge."""
    store = open_store(settings.storage_url)
    if not store.exists(manifest_key(product, upload_id)):
        raise ManifestError(f"upload {upload_id} of {product} has no manifest.json: incomplete, not training on it")
    try:
        return read_manifest(store, product, upload_id)
    except ManifestError:
        return None


@task(**IO_RETRIES)
def validate(settings: Settings, product: str, upload_id: str) -> dict[str, Any]:
    """Run the GX suite and write validation.json beside the upload."""
    store = open_store(settings.storage_url)
    report = validate_upload(store, product, upload_id)
    key = write_report(store, product, upload_id, report)
    get_run_logger().info("validation of %s: %s (%s)", upload_id, "passed" if report.success else "FAILED",
                          store.uri(key))
    return {"success": report.success, "failed": report.failed, "report_json": report.to_json(),
            "uri": store.uri(key)}


@task(**IO_RETRIES)
def quarantine(settings: Settings, product: str, upload_id: str, validation: dict[str, Any]) -> str:
    """Copy the upload and its report to quarantine/ (the original stays where it is)."""
    store = open_store(settings.storage_url)
    report = ValidationReport(**json.loads(validation["report_json"]))
    where = store.uri(quarantine_upload(store, product, upload_id, report))
    get_run_logger().warning("upload %s quarantined at %s", upload_id, where)
    return where


@task(**IO_RETRIES)
def log_rejection(settings: Settings, product: str, upload_id: str, validation: dict[str, Any],
                  quarantine_uri: str) -> str:
    tracking.configure(settings)
    return tracking.log_rejected_upload(product, upload_id, validation["report_json"], validation["failed"],
                                        quarantine_uri, settings)


@task(**IO_RETRIES, cache_policy=NO_CACHE)  # asked again later in the same run: must read the registry anew
def find_existing(settings: Settings, product: str, content_sha256: str, config_hash: str, labels_sha256: str
                  ) -> dict[str, Any] | None:
    tracking.configure(settings)
    mv = registry.find_trained_version(product, content_sha256, config_hash, labels_sha256)
    if mv is None:
        return None
    return {"version": str(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags)}


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def read_labels(settings: Settings, product: str) -> LabelSnapshot:
    return LabelSnapshot.of(current_labels(open_store(settings.storage_url), product))


@task(**IO_RETRIES, persist_result=False)
def load_images(settings: Settings, job: RetrainJob, manifest: dict[str, Any]) -> UploadData:
    """Decode the manifest's images, each checked against its manifest sha256 once more (what is
    trained on is exactly the content that was validated and that content_sha256 names), then the
    labelled images: those that judge join the benchmark, confirmed normals the training images
    (up to ``loop.max_k`` in all), and confirmed defects where the product's settings use them
    (`LoopSettings.uses_defects`)."""
    store = open_store(settings.storage_url)
    limits = image_limits()
    budget = PixelBudget(limits, f"upload {job.upload_id} of {job.product} with its labels")
    data = UploadData([], [], [], [], [])
    for entry in sorted(manifest["files"], key=lambda f: f["key"]):
        key, blob = entry["key"], read_checked(store, job.product, job.upload_id, entry)
        image = budget.admit(read_header(blob, key, limits)).decode(limits)
        if key.startswith("train/good/"):
            data.train.append(image)
        elif key.startswith(("eval/good/", "eval/defect/")):
            data.eval_images.append(image)
            data.eval_labels.append(0 if key.startswith("eval/good/") else 1)
            data.eval_keys.append(key)
            data.eval_weights.append(1.0)
    def labelled(entry: LabelEntry) -> np.ndarray:
        return budget.admit(read_header(store.get_bytes(entry.image_key), entry.image_key, limits)).decode(limits)

    judging, training = job.labels.split(job.loop.benchmark_share)
    for entry in judging:
        data.eval_images.append(labelled(entry))
        data.eval_labels.append(int(entry.label == DEFECT))
        data.eval_keys.append(f"labels/{entry.image_sha256}")
        data.eval_weights.append(entry.judging_weight)
    for entry in training:
        if entry.label == DEFECT:
            if job.loop.uses_defects:
                data.defects.append(labelled(entry))
        elif len(data.train) < job.loop.max_k:
            data.train.append(labelled(entry))
    get_run_logger().info("loaded %d training images, %d benchmark images (%d defect) and %d training-side "
                          "confirmed defects", len(data.train), len(data.eval_images), sum(data.eval_labels),
                          len(data.defects))
    return data


# ---- training and evaluation ----------------------------------------------------------------

@contextlib.contextmanager
def training_slot(device_type: str) -> Iterator[None]:
    """Hold a slot of the global concurrency limit ``gpu`` while training on CUDA; a missing limit
    is skipped by Prefect (strict=False), and CPU training takes no slot at all."""
    if device_type != "cuda":
        yield
        return
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        yield


@contextlib.contextmanager
def product_lock(settings: Settings, product: str) -> Iterator[None]:
    """One retraining per product at a time: the idempotency check, training, registration and the
    alias moves are one critical section. Where flows report to a Prefect server, the lock is its
    leased concurrency slot; where they report to a temporary server of this process, which other
    processes cannot see and whose leases die with it, it is a file lock under FSAD_HOME, which the
    kernel releases when the process dies."""
    with (_file_lock(settings, product) if api_is_temporary() else _server_lock(product)):
        yield


@contextlib.contextmanager
def _file_lock(settings: Settings, product: str) -> Iterator[None]:
    path = settings.home / "locks" / f"{PRODUCT_LOCK_PREFIX}{product}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


@contextlib.contextmanager
def _server_lock(product: str) -> Iterator[None]:
    """A Prefect global concurrency limit of 1 named ``fsad-retrain-PRODUCT`` (created on first
    use); its slot is a lease that the server renews while the run lives, so a killed run blocks
    the next one for at most the lease."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = PRODUCT_LOCK_PREFIX + product
    with get_client(sync_client=True) as client:
        # Look before creating: a refused create makes the server log a database traceback, which
        # users of a persistent Prefect home would see on every retraining after the first.
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it just now
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, strict=True, lease_duration=PRODUCT_LOCK_LEASE_S):
        yield


@task(persist_result=False)
def fit(images: list[np.ndarray], config: DetectorConfig, device: str, defects: list[np.ndarray]
        ) -> tuple[Detector, FitReport]:
    """Fine-tune (confirmed ``defects`` among the negatives) and fit the scoring, with the threshold
    at the false-alarm target from the held-out normal scores (`Detector.fit`)."""
    logger = get_run_logger()
    dev = resolve_device(device)
    steps = config.finetune.steps if config.finetune else 0
    logger.info("fine-tuning on %d images with %d confirmed defects: %s at %d px, %d steps, %d pooled views, "
                "device %s", len(images), len(defects) if steps else 0, config.backbone, config.size, steps,
                config.pool_views, dev)
    if note := stretch_warning([img.shape for img in images], config.resize):
        logger.warning("%s (\"resize\": \"tile\" in FSAD_TRAIN_OVERRIDES)", note)
    with training_slot(dev.type):
        detector, report = Detector.fit(images, config, device=dev, progress=ProgressLine(logger.info),
                                        defects=defects)
    logger.info("fit done in %.1f s; threshold %.4g (%s)", report.seconds, detector.threshold.value,
                detector.threshold.rule)
    if detector.threshold.details.get("provisional"):
        logger.warning("the threshold is provisional: %s", detector.threshold.details["provisional_reason"])
    return detector, report


@task(persist_result=False)
def to_miss_target(detector: Detector, defects: list[np.ndarray], target: float) -> Detector:
    """The detector with its threshold lowered until at most ``target`` of the training side's
    confirmed defects pass (`calibration.lower_to_miss_target`); with fewer than `MIN_PER_CLASS`
    of them the false-alarm target's threshold stands, as a share of so few says little."""
    logger = get_run_logger()
    if len(defects) < MIN_PER_CLASS:
        logger.warning("miss-rate target %.3g not applied: %d training-side confirmed defects, %d needed; the "
                       "false-alarm target's threshold stands", target, len(defects), MIN_PER_CLASS)
        return detector
    threshold = lower_to_miss_target(detector.threshold, detector.score(defects).raw_scores, target)
    logger.info("miss-rate target %.3g on %d confirmed defects: threshold %.4g (%s), %.0f %% of them pass", target,
                len(defects), threshold.value, threshold.rule, 100 * threshold.expected_miss_rate)
    return detector.with_threshold(threshold)


@task(persist_result=False)
def score_benchmark(detector: Detector, report: FitReport, data: UploadData) -> Benchmark:
    """Labelled eval set when the upload has one, else the fit's leave-one-out normal scores and
    synthetic-anomaly scores (each from a model that never saw that image)."""
    if data.has_labelled_benchmark:
        result = detector.score(data.eval_images)
        return Benchmark(LABELLED, list(data.eval_labels), result.raw_scores, result.components,
                         judge(data.eval_labels, result.raw_scores, data.eval_weights, flagged=result.is_anomaly))
    kinds = report.normal_scores.keys()
    components = {k: np.asarray(report.normal_scores[k] + report.synthetic_scores[k]) for k in kinds}
    labels = [0] * len(report.normal_scores[detector.config.score]) + \
        [1] * len(report.synthetic_scores[detector.config.score])
    scores = components[detector.config.score]
    return Benchmark(LOO_SYNTHETIC, labels, scores, components, judge(labels, scores, kind=SYNTHETIC))


@task(persist_result=False)
def evaluate(bench: Benchmark, threshold: Threshold, report: FitReport) -> dict[str, float]:
    """Benchmark metrics, with the AUROC's interval; F1 and rates are at the model's threshold,
    which was never chosen on the benchmark."""
    rates = rates_at_threshold(bench.labels, bench.scores, threshold.value)
    metrics: dict[str, float | None] = {
        "benchmark_auroc": bench.evidence.auroc, "benchmark_auroc_low": bench.evidence.low,
        "benchmark_auroc_high": bench.evidence.high,
        "f1": rates["f1"], "false_alarm_rate": rates["false_alarm_rate"], "miss_rate": rates["miss_rate"],
        "precision": rates["precision"], "recall": rates["recall"], "threshold": threshold.value,
        "n_benchmark_normal": rates["n_normal"], "n_benchmark_defect": rates["n_defect"],
        "fit_seconds": report.seconds,
    }
    for kind, scores in bench.components.items():
        metrics[f"auroc_{kind}"] = image_auroc(bench.labels, scores)
    if report.history and report.history.loss:
        metrics["final_train_loss"] = report.history.loss[-1]
    get_run_logger().info("benchmark (%s): AUROC %s, F1 %s", bench.kind, _fmt(metrics["benchmark_auroc"]),
                          _fmt(metrics["f1"]))
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@task(persist_result=False)
def gallery(detector: Detector, data: UploadData, bench: Benchmark) -> list[GalleryItem]:
    """The images a report shows with their anomaly maps: with a labelled set the normals scored
    highest and the defects scored highest and lowest; without one, the first training images."""
    if bench.kind == LABELLED:
        picks = gallery_picks(bench.labels, bench.scores)
        chosen = [(role, data.eval_keys[i], data.eval_images[i]) for role, i in picks]
    else:
        chosen = [("training image", f"train/good/{i}", img) for i, img in enumerate(data.train[:PER_ROLE])]
    result = detector.score([img for _, _, img in chosen], with_maps=True)
    return [GalleryItem(role, name, float(score), img, amap)
            for (role, name, img), score, amap in zip(chosen, result.scores, result.maps or [])]


# ---- MLflow -----------------------------------------------------------------------------------

@task(**IO_RETRIES, persist_result=False)
def log_report(settings: Settings, run_id: str, record: tracking.TrainingRecord, detector: Detector,
               verdict: tracking.Verdict) -> None:
    """The run's HTML report, written once the gate has spoken (its verdict is the report's first line)."""
    tracking.configure(settings)
    tracking.log_report(run_id, record, detector, verdict)


@task(**IO_RETRIES, persist_result=False)
def log_run(settings: Settings, record: tracking.TrainingRecord, detector: Detector) -> tracking.LoggedRun:
    tracking.configure(settings)
    logged = tracking.log_training_run(record, detector, settings)
    get_run_logger().info("logged run %s in experiment %s", logged.run_id, tracking.experiment_name(record.product))
    return logged


@task(**IO_RETRIES)
def register(settings: Settings, product: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    tracking.configure(settings)
    version = str(registry.register(product, model_uri, run_id, tags).version)
    get_run_logger().info("registered %s version %s (alias %s)", registry.model_name(product), version,
                          registry.CANDIDATE)
    return version


@task(**IO_RETRIES, persist_result=False, cache_policy=NO_CACHE)
def judge_champion(settings: Settings, product: str, data: UploadData, device: str) -> registry.ChampionView:
    """The champion, scored on the run's labelled benchmark (the candidates' own) where there is one."""
    tracking.configure(settings)
    labelled = data.has_labelled_benchmark
    return registry.champion_view(product, data.eval_images if labelled else None,
                                  data.eval_labels if labelled else None, data.eval_weights, device, settings)


@task(**IO_RETRIES, persist_result=False)
def gate(settings: Settings, product: str, version: str, bench: Benchmark, champion: registry.ChampionView,
         loop: LoopSettings, retrained: bool) -> registry.GateDecision:
    """Decide on the candidate against the champion on the same labelled benchmark and record the
    verdict as version tags; ``retrained``: the candidate is the champion trained again."""
    tracking.configure(settings)
    decision = registry.gate_decision(bench.evidence, settings.gate_min_auroc, bench.kind, champion.version,
                                      champion.evidence, loop.allow_unproven, retrained)
    registry.record_gate(product, version, decision)
    get_run_logger().info("gate %s: %s", "passed" if decision.passed else "FAILED", decision.reason)
    return decision


@task(**IO_RETRIES, persist_result=False)
def verify_and_promote(settings: Settings, product: str, version: str, detector: Detector,
                       smoke_image: np.ndarray, model_files: dict[str, str], promote_it: bool = True
                       ) -> dict[str, str]:
    """Only a version whose downloaded artifact is the one written (its files, and its score and
    decision on the smoke image) becomes champion; ``promote_it`` false verifies it only."""
    tracking.configure(settings)
    check = registry.verify(product, version, registry.WrittenModel.of(detector, smoke_image, model_files))
    if not check.ok:
        raise RegistryError(f"{registry.model_name(product)} v{version} failed verification: {check.reason}")
    if not promote_it:
        return registry.aliases(product)
    aliases = registry.promote(product, version)
    get_run_logger().info("promoted %s v%s to %s; aliases %s", registry.model_name(product), version,
                          registry.CHAMPION, aliases)
    return aliases


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def pinned(settings: Settings, product: str) -> bool:
    """Whether a person has turned automatic promotion off for the product (`fsad pin`)."""
    tracking.configure(settings)
    return control.is_pinned(product)


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def current_aliases(settings: Settings, product: str) -> dict[str, str]:
    tracking.configure(settings)
    return registry.aliases(product)


# ---- the flow ---------------------------------------------------------------------------------

@flow(name="retrain", flow_run_name="retrain-{product}", persist_result=True, result_serializer="json")
def retrain_flow(product: str, upload_id: str | None = None, method: str | None = None, seed: int = 0
                 ) -> dict[str, Any]:
    """Train, gate and (if it passes) promote a model from one upload (default: the latest complete)
    and the product's labels: ``method``, or each of the product's candidate methods
    (``loop.candidates``), the one chosen on the benchmark registered (`evidence.best_candidate`).

    Returns the `RetrainSummary` as JSON-able fields (``RetrainSummary.from_dict`` reads them back):
    ``status`` (promoted | gate_failed | already_trained), ``message``, ``version``, ``gate``...
    A rejected upload raises UploadRejected (the flow run ends Failed) after quarantining it.
    """
    settings = load_settings()
    tracking.configure(settings)
    overrides, source = training_overrides(settings, product)
    loop = loop_settings(overrides, source)
    # A bad method or setting fails before any work.
    configs = {name: training_config(name, seed, overrides, source) for name in loop.methods(method)}
    if source != "FSAD_TRAIN_OVERRIDES":
        get_run_logger().info("training settings: %s", source)

    upload_id = resolve_upload(settings, product, upload_id)
    manifest = load_manifest(settings, product, upload_id)
    validation = validate(settings, product, upload_id)
    if not validation["success"] or manifest is None:
        _reject(settings, product, upload_id, validation)
    get_run_logger().info("waiting for the retraining slot of %s (one retraining per product at a time)", product)
    with product_lock(settings, product):
        return _train_and_promote(settings, product, upload_id, manifest, validation, configs, seed,
                                  loop).to_dict()


def _reject(settings: Settings, product: str, upload_id: str, validation: dict[str, Any]) -> NoReturn:
    """Quarantine the upload and log the rejection, so that a failed upload leaves a trace, then fail."""
    where = quarantine(settings, product, upload_id, validation)
    log_rejection(settings, product, upload_id, validation, where)
    raise UploadRejected(f"upload {upload_id} of {product} failed validation: "
                         f"{'; '.join(validation['failed']) or 'malformed manifest'} (quarantined at {where})")


@dataclass(frozen=True)
class RetrainJob:
    """What one retraining is about: the upload, the configuration asked for, and where it trains.
    Its content and configuration hashes are the key under which a trained version is found again."""

    product: str
    upload_id: str
    content_sha256: str
    method: str
    seed: int
    config: DetectorConfig
    config_sha256: str
    device: str
    validation_uri: str
    validation_json: str
    labels: LabelSnapshot  # the labels at the start: with the upload, what trained and judged the version
    loop: LoopSettings

    @property
    def labels_sha256(self) -> str:
        return self.labels.digest or registry.NO_LABELS

    def identity(self) -> dict[str, Any]:
        """The summary's first fields, the same whatever the outcome."""
        return {"product": self.product, "upload_id": self.upload_id, "content_sha256": self.content_sha256,
                "method": self.method, "seed": self.seed, "config_sha256": self.config_sha256,
                "validation": self.validation_uri}


@dataclass(frozen=True)
class Trained:
    """A trained and evaluated model: what the run logs, the model itself, and the images the gate scores."""

    record: tracking.TrainingRecord
    detector: Detector
    data: UploadData
    bench: Benchmark


@dataclass(frozen=True)
class Published:
    """What became of a logged and registered version once the gate has spoken."""

    run_id: str
    version: str
    decision: registry.GateDecision
    aliases: dict[str, str]
    message: str
    held: bool = False  # passed the gate, not promoted: the product is pinned

    @property
    def status(self) -> str:
        if not self.decision.passed:
            return GATE_FAILED
        return PINNED if self.held else PROMOTED


def _train_and_promote(settings: Settings, product: str, upload_id: str, manifest: dict[str, Any],
                       validation: dict[str, Any], configs: dict[str, DetectorConfig], seed: int,
                       loop: LoopSettings) -> RetrainSummary:
    """The flow's critical section (under the product lock): already trained? else train each
    candidate, choose one, log, register, gate, verify and promote."""
    # The identity of the files this run reads (validation found the declared hash equal to it; a
    # manifest replaced since cannot name other images as trained ones), and of its labels.
    labels, content = read_labels(settings, product), content_sha256(manifest["files"])
    jobs = [RetrainJob(product, upload_id, content, name, seed, config, config_sha256(config, loop),
                       resolve_device(settings.device).type, validation["uri"], validation["report_json"], labels,
                       loop) for name, config in configs.items()]
    if (found := _already_trained(settings, jobs)) is not None:
        return _stop_already_trained(settings, *found)
    data = load_images(settings, jobs[0], manifest)
    trained = {job.method: _train_and_evaluate(job, data) for job in jobs}
    champion = judge_champion(settings, product, data, jobs[0].device)
    retraining = champion.retraining(upload_id)
    chosen, why = best_candidate({name: t.bench.evidence for name, t in trained.items()},
                                 {name: t.record.metrics.get("fit_seconds", 0.0) for name, t in trained.items()},
                                 DAY0_METHOD, retraining, champion.evidence)
    get_run_logger().info("candidate chosen: %s", why)
    job = next(j for j in jobs if j.method == chosen)
    # Checked again before anything is logged: should the product lock ever lapse during a long
    # fine-tuning (its lease expired on a starved machine), a run that finished first wins.
    if (found := _already_trained(settings, jobs)) is not None:
        return _stop_already_trained(settings, *found)
    published = _publish(settings, job, trained[chosen], why, champion, retrained=chosen == retraining)
    return trained_summary(job, trained[chosen].record, published)


def _already_trained(settings: Settings, jobs: list[RetrainJob]) -> tuple[RetrainJob, dict[str, Any]] | None:
    """A version trained on the same upload and labels under any of the candidates' configurations."""
    for job in jobs:
        existing = find_existing(settings, job.product, job.content_sha256, job.config_sha256, job.labels_sha256)
        if existing is not None:
            return job, existing
    return None


def _stop_already_trained(settings: Settings, job: RetrainJob, existing: dict[str, Any]) -> RetrainSummary:
    """The summary of a run that finds its upload and configuration already trained, with today's aliases."""
    summary = already_trained_summary(job, existing, current_aliases(settings, job.product))
    get_run_logger().info(summary.message)
    return summary


def _train_and_evaluate(job: RetrainJob, data: UploadData) -> Trained:
    """Fine-tune, judge the model on its benchmark and gather what the run logs."""
    fit_task = fit.with_options(tags={GPU_LIMIT}) if job.device == "cuda" else fit
    detector, report = fit_task(data.train, job.config, job.device, data.defects if job.loop.defect_negatives else [])
    if job.loop.miss_rate_target is not None:
        detector = to_miss_target(detector, data.defects, job.loop.miss_rate_target)
    bench = score_benchmark(detector, report, data)
    threshold = detector.threshold  # the fit's, or lowered on training-side defects: never from the benchmark
    metrics = evaluate(bench, threshold, report)
    shown = gallery(detector, data, bench)
    record = tracking.TrainingRecord(
        product=job.product, upload_id=job.upload_id, content_sha256=job.content_sha256, method=job.method,
        config=detector.config, config_sha256=job.config_sha256, k=len(data.train), eval_set=bench.kind,
        metrics=metrics, history=report.history, threshold=threshold, validation_json=job.validation_json,
        fit_report=report.to_dict(), roc_labels=bench.labels, roc_scores=bench.scores.tolist(), overlays=shown,
        example_image=(data.eval_images or data.train)[0])
    return Trained(record, detector, data, bench)


def _publish(settings: Settings, job: RetrainJob, trained: Trained, choice: str, champion: registry.ChampionView,
             retrained: bool) -> Published:
    """Log and register the run, let the gate decide, promote a passing version, then log the report
    (written last because its first line is the verdict). ``choice`` says why this candidate;
    ``retrained``: it is the champion's method and upload trained with newer labels."""
    record, detector = trained.record, trained.detector
    logged = log_run(settings, record, detector)
    version = register(settings, job.product, logged.model_uri, logged.run_id,
                       {**version_tags(job, record), "candidate_choice": choice[:5000]})
    decision = gate(settings, job.product, version, trained.bench, champion, job.loop, retrained)
    hold = decision.passed and pinned(settings, job.product)
    if decision.passed:
        aliases = verify_and_promote(settings, job.product, version, detector, record.example_image,
                                     logged.model_files, promote_it=not hold)
        message = (f"version {version} passed the gate and is verified; not promoted, as {job.product} is pinned "
                   f"(fsad pin --off ends it; fsad promote makes it champion)" if hold else
                   f"version {version} passed the gate and is now {registry.CHAMPION}")
    else:
        aliases = current_aliases(settings, job.product)
        message = gate_failed_message(version, decision, aliases)
    get_run_logger().info(message)
    log_report(settings, logged.run_id, record, detector, tracking.Verdict(
        "passed the gate" if decision.passed else "failed the gate", message,
        f"{decision.reason} (evidence: {decision.evidence})", choice))
    return Published(logged.run_id, version, decision, aliases, message, hold)


def version_tags(job: RetrainJob, record: tracking.TrainingRecord) -> dict[str, str]:
    """The registered version's tags; its content and configuration hashes are what `find_existing` looks up."""
    return {"content_sha256": job.content_sha256, "config_sha256": job.config_sha256, "method": job.method,
            "seed": str(job.seed), "upload_id": job.upload_id, "eval_set": record.eval_set, "k": str(record.k),
            "labels_sha256": job.labels_sha256, **{f"labels_{k}": str(n) for k, n in job.labels.counts().items()},
            "benchmark_auroc": f"{record.metrics.get('benchmark_auroc', float('nan')):.6f}"}


def gate_failed_message(version: str, decision: registry.GateDecision, aliases: dict[str, str]) -> str:
    champion = f"v{aliases[registry.CHAMPION]}" if registry.CHAMPION in aliases else "unset"
    return f"version {version} failed the gate ({decision.reason}); {registry.CHAMPION} stays {champion}"


def _model_ref(product: str, version: str) -> str:
    return f"models:/{registry.model_name(product)}/{version}"


def already_trained_summary(job: RetrainJob, existing: dict[str, Any], aliases: dict[str, str]) -> RetrainSummary:
    """The summary of a run that stops early: the gate verdict is the one recorded on the existing version."""
    version, tags = existing["version"], existing["tags"]
    gate_ = GateSummary(tags.get("gate.verdict") == "passed", tags.get("gate.reason", "no gate verdict recorded"),
                        evidence=tags.get("gate.evidence", ""))
    message = f"already trained as version {version} (same content_sha256 and configuration); not training again"
    return RetrainSummary(**job.identity(), status=ALREADY_TRAINED, message=message, version=version,
                          run_id=existing["run_id"], model=_model_ref(job.product, version), gate=gate_,
                          aliases=aliases)


def trained_summary(job: RetrainJob, record: tracking.TrainingRecord, published: Published) -> RetrainSummary:
    """The summary of a run that trained: what it measured, what the gate decided and where the aliases stand."""
    decision, threshold, config = published.decision, record.threshold, job.config
    trained = TrainedSummary(
        record.eval_set, record.k, record.metrics,
        ThresholdSummary(threshold.value, threshold.rule, threshold.expected_false_alarm_rate),
        TrainingSummary(config.size, config.finetune.steps if config.finetune else 0, config.pool_views,
                        config.backbone, job.device))
    gate_ = GateSummary(decision.passed, decision.reason, decision.min_auroc, decision.candidate_auroc,
                        decision.champion_version, decision.champion_auroc, decision.evidence,
                        decision.champion_below_minimum)
    return RetrainSummary(**job.identity(), status=published.status, message=published.message,
                          version=published.version, run_id=published.run_id,
                          model=_model_ref(job.product, published.version), gate=gate_, aliases=published.aliases,
                          trained=trained)


__all__ = ["GPU_LIMIT", "NoUpload", "PRODUCT_LOCK_PREFIX", "UploadRejected", "product_lock",
           "retrain_flow", "training_slot"]
