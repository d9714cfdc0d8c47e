"""MLflow tracking of the pipeline: one run per training (or rejected upload) in ``fsad/PRODUCT``.

A training run holds everything needed to judge it later without the training machine: parameters
(method, k, seed, backbone, input size, loss weights, data identity; never credentials), metrics,
the loss curve as step metrics, the validation report, the threshold, a ROC plot, a few anomaly-map
overlays, the model itself as a no-pickle pyfunc model (see flows.pyfunc) and, once the gate has
judged it, an HTML report (flows.mlops.run_report).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flows.mlops.names import MODEL_PREFIX, model_name
from flows.mlops.run_report import GalleryItem, ReportContent, build_report
from flows.pyfunc import DATA_DIRNAME, log_pyfunc_model, model_file_digests
from flows.settings import Settings, uri_credentials
from fsad_core.calibration import Threshold
from fsad_core.config import DetectorConfig
from fsad_core.detector import Detector
from fsad_core.finetune import TrainingHistory
from fsad_core.overlay import overlay
from fsad_core.units import to_unit

EXPERIMENT_PREFIX = "fsad/"
_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_OVERLAY_NAME_BYTES = 100  # of an overlay's file name, before "overlay_" and ".png"


@dataclass(frozen=True)
class LoggedRun:
    run_id: str
    experiment_id: str
    model_uri: str  # models:/m-... of the logged pyfunc model, what the registry version points at
    model_files: dict[str, str]  # name -> sha256 of the model folder's files as logged (what verification expects)


@dataclass(frozen=True)
class TrainingRecord:
    """What one training run logs; built by the retrain flow from its task results."""

    product: str
    upload_id: str
    content_sha256: str
    method: str
    config: DetectorConfig  # the fitted model's: intensity as `auto` resolved it
    config_sha256: str      # identity of the configuration asked for (settings.config_sha256)
    k: int
    eval_set: str  # "labelled" or "loo+synthetic"
    metrics: dict[str, float]
    history: TrainingHistory | None
    threshold: Threshold
    validation_json: str
    fit_report: dict[str, Any]
    roc_labels: Sequence[int]
    roc_scores: Sequence[float]
    overlays: list[GalleryItem]
    example_image: np.ndarray

    @property
    def has_roc(self) -> bool:
        """Whether both classes were scored: a ROC curve needs them."""
        return len(set(self.roc_labels)) == 2


def configure(settings: Settings) -> None:
    """Point MLflow's tracking and registry at the configured backend (idempotent)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one-line logs, no bars
    _credentials_apart()
    if settings.embedded_tracking:
        settings.home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)


def _credentials_apart() -> None:
    """A user and password in MLFLOW_TRACKING_URI moved to MLflow's own variables (unless those are
    set), so that this process and those it starts reach the server by a URI without them."""
    found = uri_credentials(os.environ.get("MLFLOW_TRACKING_URI", ""))
    if found.username is None:
        return
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", found.username)
    if found.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", found.password)
    os.environ["MLFLOW_TRACKING_URI"] = found.uri


def experiment_name(product: str) -> str:
    return EXPERIMENT_PREFIX + product


def ensure_experiment(product: str, settings: Settings) -> str:
    """Id of ``fsad/PRODUCT``, created when missing (embedded: artifacts under FSAD_HOME/mlartifacts)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client, name = MlflowClient(), experiment_name(product)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (settings.artifact_root / product).as_uri() if settings.artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={"fsad.product": product})
    except MlflowException:  # created meanwhile by a concurrent run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def training_params(record: TrainingRecord) -> dict[str, Any]:
    """Flat, human-readable parameters of a training run."""
    c = record.config
    params: dict[str, Any] = {
        "method": record.method, "k": record.k, "seed": c.seed, "backbone": c.backbone, "size": c.size,
        "patch_size": c.patch_side, "resize": c.resize, "intensity": c.intensity, "pooling": c.pooling,
        "score": c.score, "pool_views": c.pool_views, "negatives": c.negatives,
        "calibration_negatives": c.calibration_negatives, "memory_views": c.memory_views,
        "coreset_candidates": c.coreset_candidates or "all", "map_sigma": c.map_sigma,
        "target_false_alarm_rate": c.target_false_alarm_rate, "finetune": c.finetune is not None,
        "augment_flips": c.augment.flips, "augment_rotation_deg": c.augment.rotation_deg,
        "augment_crop_scale": "-".join(map(str, c.augment.crop_scale)),
        "augment_brightness": c.augment.brightness, "augment_contrast": c.augment.contrast,
        "upload_id": record.upload_id, "content_sha256": record.content_sha256,
        "config_sha256": record.config_sha256, "eval_set": record.eval_set,
        "threshold_rule": record.threshold.rule,
    }
    if c.finetune is not None:
        ft = c.finetune
        params.update({"finetune_steps": ft.steps, "lr_backbone": ft.lr_backbone, "lr_head": ft.lr_head,
                       "loss_instance": ft.loss.instance, "loss_cross": ft.loss.cross,
                       "loss_negative": ft.loss.negative})
    return params


def _loss_metrics(history: TrainingHistory | None) -> list[Any]:
    from mlflow.entities import Metric

    if history is None:
        return []
    now = int(time.time() * 1000)
    out = [Metric("train_loss", float(v), now, step) for step, v in enumerate(history.loss)]
    for step, terms in enumerate(history.terms):
        out += [Metric(f"train_loss_{name}", float(v), now, step) for name, v in terms.items()]
    return out


def roc_png(labels: Sequence[int], scores: Sequence[float], title: str) -> bytes:
    """The ROC curve as PNG (matplotlib's Agg canvas through Figure: no pyplot, no global backend)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {roc_auc_score(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false-alarm rate", ylabel="detection rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _run_tags(record: TrainingRecord) -> dict[str, str]:
    """The tags a training run is found again by (product, upload, what it was trained on and how)."""
    return {"fsad.product": record.product, "fsad.upload_id": record.upload_id, "fsad.status": "trained",
            "content_sha256": record.content_sha256, "config_sha256": record.config_sha256,
            "eval_set": record.eval_set}


def _log_loss_curve(run_id: str, history: TrainingHistory | None) -> None:
    """The loss and its terms as step metrics, in batches MLflow accepts."""
    from mlflow import MlflowClient

    loss = _loss_metrics(history)
    client = MlflowClient()
    for i in range(0, len(loss), _BATCH):
        client.log_batch(run_id, metrics=loss[i:i + _BATCH])


def _log_documents(record: TrainingRecord) -> None:
    """The validation report, the threshold and the fit report, each as its own JSON file of the run."""
    import mlflow

    mlflow.log_text(record.validation_json, "validation.json")
    mlflow.log_dict(record.threshold.to_dict(), "threshold.json")
    mlflow.log_dict(record.fit_report, "fit_report.json")


def overlay_filename(item: GalleryItem) -> str:
    """A flat PNG name from the item's role and image name (no spaces, no folders, no extension of
    its own); a long one is cut and told apart by a digest of the whole, so that any name a store
    accepts (255 bytes) gives a file name every file system and artifact store does."""
    name = f"{item.role}_{item.name}".replace(" ", "_").replace("/", "_").rsplit(".", 1)[0]
    if len(name.encode()) > _OVERLAY_NAME_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name.encode()[:_OVERLAY_NAME_BYTES - 13].decode(errors='ignore')}-{digest}"
    return f"overlay_{name}.png"


def _write_plots(plots: Path, record: TrainingRecord, detector: Detector) -> Path:
    """The folder ``plots``, made, with the ROC curve (when both classes were scored) and the anomaly-map
    overlays as PNGs."""
    plots.mkdir()
    if record.has_roc:
        (plots / "roc.png").write_bytes(roc_png(record.roc_labels, record.roc_scores,
                                                f"{record.product}: {record.eval_set} benchmark"))
    for item in record.overlays:
        picture = overlay(item.image, item.amap, detector.map_anchor())
        Image.fromarray(picture).save(plots / overlay_filename(item))
    return plots


def _save_model(folder: Path, record: TrainingRecord, detector: Detector) -> Path:
    """The detector's model folder, its configuration extended with where and how it was trained."""
    return detector.save(folder, extra_config={
        "product": record.product, "upload_id": record.upload_id, "method": record.method,
        "k": record.k, "seed": record.config.seed, "content_sha256": record.content_sha256,
        "config_sha256": record.config_sha256, "eval_set": record.eval_set,
        "fit_report": record.fit_report})


def log_training_run(record: TrainingRecord, detector: Detector, settings: Settings) -> LoggedRun:
    """Log one training run and its pyfunc model; the model folder is written from ``detector``."""
    import mlflow

    experiment_id = ensure_experiment(record.product, settings)
    run_name = f"{record.upload_id}-{record.method}-s{record.config.seed}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=_run_tags(record)) as run:
        run_id = run.info.run_id
        mlflow.log_params(training_params(record))
        mlflow.log_metrics(record.metrics)
        _log_loss_curve(run_id, record.history)
        _log_documents(record)
        with tempfile.TemporaryDirectory(prefix="fsad-run-") as tmp:
            plots = _write_plots(Path(tmp) / "plots", record, detector)
            mlflow.log_artifacts(str(plots), "plots")
            model_dir = _save_model(Path(tmp) / DATA_DIRNAME, record, detector)
            info = log_pyfunc_model(model_dir, record.example_image, model_name(record.product))
            files = model_file_digests(model_dir)
    return LoggedRun(run_id, experiment_id, info.model_uri, files)


def log_rejected_upload(product: str, upload_id: str, validation_json: str, failed: list[str],
                        quarantine_uri: str, settings: Settings) -> str:
    """A run marked FAILED that holds the validation report of a rejected upload; returns its id."""
    import mlflow

    experiment_id = ensure_experiment(product, settings)
    tags = {"fsad.product": product, "fsad.upload_id": upload_id, "fsad.status": "failed",
            "fsad.failure": "validation", "fsad.quarantine": quarantine_uri}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{upload_id}-validation-failed", tags=tags)
    try:
        mlflow.log_param("upload_id", upload_id)
        mlflow.log_metric("failed_expectations", len(failed))
        mlflow.log_text(validation_json, "validation.json")
        mlflow.log_text("\n".join(failed) + "\n", "failed_expectations.txt")
    finally:
        mlflow.end_run(status="FAILED")
    return run.info.run_id


__all__ = ["EXPERIMENT_PREFIX", "MODEL_PREFIX", "LoggedRun", "TrainingRecord", "configure", "ensure_experiment",
           "experiment_name", "log_rejected_upload", "log_training_run", "model_name", "roc_png", "training_params"]


REPORT_NAME = "report.html"


def log_report(run_id: str, record: TrainingRecord, detector: Detector, verdict: Verdict) -> None:
    """The run's HTML report as `REPORT_NAME` of the run."""
    from mlflow import MlflowClient

    roc = roc_png(record.roc_labels, record.roc_scores, record.eval_set) if record.has_roc else None
    rates = {name: record.metrics[name] for name in ("benchmark_auroc", "false_alarm_rate", "miss_rate", "f1")
             if name in record.metrics}
    threshold = record.threshold
    page = build_report(ReportContent(
        f"{record.product}: upload {record.upload_id}", verdict.verdict, verdict.outcome, verdict.gate_reason,
        verdict.candidates, rates, record.eval_set, record.roc_labels,
        list(to_unit(record.roc_scores, threshold.value)), threshold.value, threshold.rule,
        threshold.expected_false_alarm_rate, roc,
        record.history.loss if record.history else [], record.config.to_dict(), record.validation_json,
        record.overlays, detector.map_anchor()))
    MlflowClient().log_text(run_id, page, REPORT_NAME)


@dataclass(frozen=True)
class Verdict:
    """What the gate and the candidates' comparison said of a run, for its report."""

    verdict: str  # "passed the gate" or "failed the gate"
    outcome: str
    gate_reason: str
    candidates: str


def read_report(run_id: str) -> str:
    """The run's HTML report, as `log_report` wrote it."""
    from mlflow.artifacts import load_text

    return load_text(f"runs:/{run_id}/{REPORT_NAME}")
