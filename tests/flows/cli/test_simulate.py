"""A tiny simulated line (generated product, two days) through the real flows: day-0 upload, each
day scoring, the queue, labels from the truth and the nightly retraining; the held-out truth is
never labelled, and the records and the plot are written."""

import hashlib
import json

import pytest

from flows.cli.main import main as cli_main
from flows.store.labels import current_labels
from flows.store.storage import LocalStore
from fsad_core.data import load_category
from fsad_core.line import split_line
from fsad_core.synthetic import make_category
from tests.tiny_training import TINY_TRAINING


@pytest.fixture
def quiet_env(monkeypatch, tmp_path):
    for name in ("FSAD_STORAGE", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "FSAD_GATE_MIN_AUROC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FSAD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FSAD_TRAIN_OVERRIDES", json.dumps(TINY_TRAINING))
    monkeypatch.setenv("FSAD_GATE_MIN_AUROC", "0")
    monkeypatch.setenv("FSAD_DEVICE", "cpu")


def test_a_two_day_line_runs_through_the_real_flows_and_never_labels_the_held_out_truth(quiet_env, tmp_path):
    data = make_category(tmp_path / "washer", kind="object", n_train=8, n_test_good=10, n_test_defect=10, size=96,
                         seed=2)
    out, picture, work = tmp_path / "line.json", tmp_path / "line.png", tmp_path / "work"
    assert cli_main(["simulate", "--data", str(data), "--k", "2", "--days", "2", "--per-day", "8", "--reviews", "4",
                     "--defect-share", "0.3", "--seed", "1", "--out", str(out), "--plot", str(picture),
                     "--workdir", str(work)]) == 0
    result = json.loads(out.read_text())
    records = result["records"]
    assert [r["day"] for r in records] == [0, 1, 2] and set(result["baselines"]) == {"fast", "default"}
    assert records[0]["champion_version"] == "1" and all(r["heldout_auroc"] is not None for r in records)
    assert records[-1]["labels_good"] + records[-1]["labels_defect"] == 8  # four a day
    assert all(r["seconds"] > 0 for r in records) and picture.stat().st_size > 0
    split = split_line(load_category(data), 2, 1, 0.3)
    product = next(p.name for p in (work / "store" / "products").iterdir())
    labels = current_labels(LocalStore(work / "store"), product)
    assert all(e.weight >= 1.0 for e in labels.values())  # each with its chance of a review, so it may judge
    labelled = set(labels)
    held_out = {hashlib.sha256(s.path.read_bytes()).hexdigest() for s in split.held_out}
    assert labelled and not labelled & held_out
