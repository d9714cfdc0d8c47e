"""A product as score-prefix leaves it for the review page (a queue with pictures, on the folder
store) and a real registry of three versions; the page served in process or by uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.mlops import registry
from flows.mlops.registry import CHAMPION
from flows.review.bench import make_queue
from flows.review.screenshots import served as serving
from flows.review.serve import review_app
from flows.store.queue import QueueItem
from flows.store.storage import Store, open_store
from tests.local_home import local_home

PRODUCT = "washer"
TOKEN = "test-token-0123456789abcdef"
HOSTILE = "<img src=x onerror=alert(1)>.png"
NAMES = ["part-001.png", HOSTILE, "part-003.png", "part-004.png", "part-005.png", "part-006.png"]


@dataclass
class Line:
    store: Store
    items: list[QueueItem]
    storage_url: str


def _version_tags(auroc: float, verdict: str, evidence: str) -> dict[str, str]:
    return {"verified": "true", "method": "fast", "gate.verdict": verdict, "gate.candidate_auroc": f"{auroc}",
            "gate.evidence": evidence, "gate.reason": f"{verdict} on {evidence} evidence",
            "gate.candidate_auroc_low": f"{auroc - 0.05}", "gate.candidate_auroc_high": f"{auroc + 0.03}"}


@pytest.fixture
def line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Line:
    settings = local_home(tmp_path / "home", monkeypatch)
    client, name = MlflowClient(), registry.model_name(PRODUCT)
    client.create_registered_model(name)
    model = tmp_path / "model"
    model.mkdir()
    for auroc, verdict, evidence in ((0.97, "passed", "synthetic"), (0.86, "passed", "labelled"),
                                     (0.81, "failed", "labelled")):
        client.create_model_version(name, str(model), tags=_version_tags(auroc, verdict, evidence))
    client.set_registered_model_alias(name, CHAMPION, "2")
    store = open_store(settings.storage_url)
    return Line(store, make_queue(store, tmp_path / "line", PRODUCT, NAMES), settings.storage_url)


@pytest.fixture
def served(line: Line) -> Iterator[str]:
    """The page on a free port of 127.0.0.1, served by uvicorn as `fsad review` serves it."""
    with serving(review_app(TOKEN, line.storage_url, "")) as base:
        yield base
