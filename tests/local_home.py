"""An FSAD_HOME of a test's own: the folder store and the SQLite registry under it, MLflow pointed there."""

from pathlib import Path

import mlflow
import pytest

from flows.settings import Settings, load_settings


def local_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("FSAD_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FSAD_HOME", str(home))
    settings = load_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return settings
