"""Pipeline configuration from the environment, with embedded defaults that need no service.

    FSAD_HOME               ~/.fsad: embedded store, MLflow database and artifacts, model cache
    FSAD_STORAGE            $FSAD_HOME/store, or s3://BUCKET (boto3's standard AWS_* settings)
    MLFLOW_TRACKING_URI     sqlite:///$FSAD_HOME/mlflow.db (artifacts in $FSAD_HOME/mlartifacts); a user
                            and password in it are moved to MLFLOW_TRACKING_USERNAME/_PASSWORD
    FSAD_GATE_MIN_AUROC     0.9: minimum benchmark AUROC for a version to become champion
    FSAD_TRAIN_OVERRIDES    JSON of DetectorConfig fields for small or fast runs, e.g.
                            {"size": 96, "pool_views": 16, "finetune": {"steps": 10}};
                            "augment": {"hflip": false} for text-bearing parts
    FSAD_DEVICE             auto | cpu | cuda
    FSAD_IO_RETRY_DELAYS    2,10,30: seconds before each retry of a storage or registry call

Credentials (AWS_*, MLflow tokens) are read by boto3/MLflow from the environment themselves and
are never copied into settings, logs, parameters or tags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from flows.store.storage import ObjectNotFound, Store, default_storage_url, training_key
from infra.config import fsad_home

if TYPE_CHECKING:  # the model's settings import torch: `locations` and the CLI's checks need none of it
    from fsad_core.config import DetectorConfig

DEFAULT_MIN_AUROC = 0.9
LOOP = "loop"  # the key of a product's settings that are not the model's (`LoopSettings`)
DEFAULT_IO_RETRY_DELAYS = (2.0, 10.0, 30.0)  # a restarted service is usually back within them
MAX_IO_RETRIES = 10


class SettingsError(ValueError):
    """An environment setting that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    home: Path
    storage_url: str
    tracking_uri: str
    artifact_root: Path | None  # where embedded MLflow keeps artifacts; None: the server decides
    gate_min_auroc: float = DEFAULT_MIN_AUROC
    train_overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"

    @property
    def embedded_tracking(self) -> bool:
        return self.tracking_uri.startswith("sqlite:")


@dataclass(frozen=True)
class UriCredentials:
    """A URI without the user and password it may carry, and those apart."""

    uri: str
    username: str | None = None
    password: str | None = None


def uri_credentials(uri: str) -> UriCredentials:
    """``http://user:pass@host/...`` as ``http://host/...`` and its (percent-decoded) user and
    password: the pipeline hands credentials to MLflow in its own variables, never in a URI that
    its error messages, the logs and Prefect's records repeat."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return UriCredentials(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return UriCredentials(urlunsplit(parts._replace(netloc=netloc)), unquote(parts.username or ""),
                          None if parts.password is None else unquote(parts.password))


@dataclass(frozen=True)
class Locations:
    """Where the store and the registry are: what a command checks its arguments against before
    it loads the model's code or starts a server."""

    home: Path
    storage_url: str
    tracking_uri: str


def locations(env: Mapping[str, str] | None = None) -> Locations:
    env = os.environ if env is None else env
    home = fsad_home(env=env)
    tracking = uri_credentials(env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}").uri
    return Locations(home, default_storage_url(env), tracking)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings once from ``env`` (default: os.environ); SettingsError on bad values."""
    from fsad_core.devices import configured_device

    env = os.environ if env is None else env
    home, storage, tracking = dataclasses.astuple(locations(env))
    try:
        min_auroc = float(env.get("FSAD_GATE_MIN_AUROC") or DEFAULT_MIN_AUROC)
    except ValueError:
        raise SettingsError(f"FSAD_GATE_MIN_AUROC={env['FSAD_GATE_MIN_AUROC']!r}: not a number") from None
    if not 0.0 <= min_auroc <= 1.0:
        raise SettingsError(f"FSAD_GATE_MIN_AUROC={min_auroc}: must be within [0, 1]")
    try:
        overrides = json.loads(env.get("FSAD_TRAIN_OVERRIDES") or "{}")
    except json.JSONDecodeError as exc:
        raise SettingsError(f"FSAD_TRAIN_OVERRIDES: not valid JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise SettingsError("FSAD_TRAIN_OVERRIDES: must be a JSON object of DetectorConfig fields")
    try:
        device = configured_device(env)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    settings = Settings(home, storage, tracking, home / "mlartifacts" if tracking.startswith("sqlite:") else None,
                        min_auroc, overrides, device)
    training_config("default", 0, settings.train_overrides)  # fail now, not after validation
    loop_settings(settings.train_overrides)
    return settings


def io_retry_delays(env: Mapping[str, str] | None = None) -> list[float]:
    """Seconds before each retry of a storage or registry call (FSAD_IO_RETRY_DELAYS, comma-separated)."""
    env = os.environ if env is None else env
    text = env.get("FSAD_IO_RETRY_DELAYS")
    if not text:
        return list(DEFAULT_IO_RETRY_DELAYS)
    try:
        delays = [float(part) for part in text.split(",")]
    except ValueError:
        delays = []
    if not 1 <= len(delays) <= MAX_IO_RETRIES or not all(0 <= d <= 3600 for d in delays):
        raise SettingsError(f"FSAD_IO_RETRY_DELAYS={text!r}: 1 to {MAX_IO_RETRIES} comma-separated seconds "
                            f"from 0 to 3600, e.g. 2,10,30")
    return delays


_TRAINING_FIELDS = ("benchmark_share", "max_k", "defect_negatives", "miss_rate_target")


@dataclass(frozen=True)
class LoopSettings:
    """A product's settings that are not the model's (``"loop"`` beside the model's fields): how its
    labels are used and what evidence may replace its champion."""

    benchmark_share: float = 0.5  # of the labels (by content hash): they judge, never train
    reviews_per_run: int = 24  # images a score-prefix run draws into the review queue (`flows.store.queue`)
    max_k: int = 32  # normal images trained on at most: the upload's, then confirmed normals
    allow_unproven: bool = False  # a candidate may replace a champion on evidence that cannot compare them
    defect_negatives: bool = False  # training-side confirmed defects join the fine-tuning's negatives (docs/loop.md)
    # Where set, the threshold is lowered until at most this share of the training side's confirmed
    # defects pass (`calibration.lower_to_miss_target`; docs/loop.md).
    miss_rate_target: float | None = None
    candidates: tuple[str, ...] = ("fast", "default")  # methods a retraining fits; the benchmark chooses

    def __post_init__(self) -> None:
        if self.miss_rate_target is not None and self.defect_negatives:
            raise ValueError("loop.miss_rate_target with loop.defect_negatives would set the threshold on defects "
                             "the model was trained on; set one of them")

    def training_changes(self) -> dict[str, Any]:
        """The settings that change what a retraining trains, where they differ from the defaults (a
        version trained under the defaults keeps the identity it had before these settings existed)."""
        default = LoopSettings()
        return {name: getattr(self, name) for name in _TRAINING_FIELDS if getattr(self, name) != getattr(default, name)}

    @property
    def uses_defects(self) -> bool:
        """Whether a retraining loads the training side's confirmed defects."""
        return self.defect_negatives or self.miss_rate_target is not None

    def methods(self, asked: str | None) -> tuple[str, ...]:
        """The methods a retraining fits: the one asked for, else the candidates."""
        return (asked,) if asked else self.candidates


def training_config(method: str, seed: int, overrides: Mapping[str, Any],
                    source: str = "FSAD_TRAIN_OVERRIDES") -> DetectorConfig:
    """The method's DetectorConfig with ``seed`` and the overrides, checked whole
    (`fsad_core.overrides`: nested objects change the method's own field by field); their
    ``"loop"`` object is `loop_settings`'. ``source`` names where they came from in errors."""
    from fsad_core.methods import method_config
    from fsad_core.overrides import OverrideError, apply_overrides

    model = {key: value for key, value in overrides.items() if key != LOOP}
    try:
        return apply_overrides(method_config(method, seed=seed), model, source)
    except OverrideError as exc:
        raise SettingsError(str(exc)) from None


def loop_settings(overrides: Mapping[str, Any], source: str = "FSAD_TRAIN_OVERRIDES") -> LoopSettings:
    """The ``"loop"`` object of the settings, checked as the model's are."""
    from fsad_core.overrides import OverrideError, apply_overrides

    try:
        return apply_overrides(LoopSettings(), overrides.get(LOOP) or {}, source, path=f"{LOOP}.")
    except OverrideError as exc:
        raise SettingsError(str(exc)) from None


def merge_overrides(base: Mapping[str, Any], product: Mapping[str, Any]) -> dict[str, Any]:
    """A product's training settings over FSAD_TRAIN_OVERRIDES: its fields win, and objects
    (``finetune``, ``finetune.loss``, ``augment``) merge field by field (a product that sets only
    ``{"augment": {"hflip": false}}`` keeps the rotation set for every product)."""
    merged = dict(base)
    for key, value in product.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_product_training(store: Store, product: str) -> dict[str, Any]:
    """The product's training settings (``products/P/training.json``); {} when it has none."""
    key = training_key(product)
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return {}
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError(f"{store.uri(key)}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{store.uri(key)}: must be a JSON object of DetectorConfig fields")
    return value


def product_overrides(settings: Settings, store: Store, product: str) -> tuple[dict[str, Any], str]:
    """FSAD_TRAIN_OVERRIDES with the product's own settings merged over them, and where they came
    from (for error messages)."""
    own = read_product_training(store, product)
    source = f"FSAD_TRAIN_OVERRIDES with {store.uri(training_key(product))}" if own else "FSAD_TRAIN_OVERRIDES"
    return merge_overrides(settings.train_overrides, own), source


def config_sha256(config: DetectorConfig, loop: LoopSettings | None = None) -> str:
    """Identity of a training: the configuration (with the method's seed) and the label settings
    that change what is trained (`LoopSettings.training_changes`): same hash, same training."""
    changes = loop.training_changes() if loop is not None else {}
    identity = {**config.to_dict(), LOOP: changes} if changes else config.to_dict()
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


__all__ = ["LOOP", "LoopSettings", "Settings", "SettingsError", "config_sha256", "io_retry_delays", "load_settings",
           "loop_settings", "merge_overrides",
           "product_overrides", "read_product_training", "training_config"]
