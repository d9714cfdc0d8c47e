"""Security properties of the embedded pipeline: model artifacts never unpickle anything (directly,
through ``fsad score`` or through MLflow's pyfunc loader; a version holding a pickle is never
verified nor promoted) and credentials never reach logs, MLflow or reports."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import embedded_env, noise_rgb, png_bytes
from flows import registry
from flows.cli import main as cli_main
from flows.pyfunc import DATA_DIRNAME, encode_png, log_pyfunc_model, model_folder
from flows.retrain import retrain_flow
from flows.storage import open_store
from flows.upload import upload_folder
from fsad_core.detector import Detector

P = "gasket"
SECRET = "fsadCanarySecret-7Qx2vLp9Zr4Kw8Nm"
KEY_ID = "FSADCANARYKEYID7Q2V"
TOKEN = "fsadCanaryToken-3hT8sQ"


class _Planted:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(folder: Path, marker: Path, names=("python_model.pkl", "model.pkl", "evil.pickle", "weights.joblib")) -> None:
    payload = pickle.dumps(_Planted(marker))
    for name in names:
        (folder / name).write_bytes(payload)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_api):
    """The embedded flow run once with distinctive fake credentials in the environment: a good
    upload (trained, promoted) and a corrupt one (rejected: error paths log too)."""
    home = tmp_path_factory.mktemp("fsad-home")
    sets = tmp_path_factory.mktemp("sets")
    with pytest.MonkeyPatch.context() as mp:
        embedded_env(mp, home)
        mp.setenv("FSAD_GATE_MIN_AUROC", "0")
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        mp.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
        good = sets / "good"
        good.mkdir()
        for i in range(2):
            (good / f"{i}.png").write_bytes(png_bytes(noise_rgb(i)))
        store = open_store()
        upload_folder(store, P, good, upload_id="20260101T000001Z-good01")
        summary = retrain_flow(P, upload_id="20260101T000001Z-good01")
        upload_folder(store, P, good, upload_id="20260101T000002Z-bad001")
        store.put_bytes("products/gasket/uploads/20260101T000002Z-bad001/train/good/1.png", b"<html>")
        state = retrain_flow(P, upload_id="20260101T000002Z-bad001", return_state=True)
        yield {"home": home, "summary": summary, "rejected": state, "mp": mp}


def test_flow_trained_and_rejected(trained):
    assert trained["summary"]["status"] == "promoted"
    assert trained["rejected"].is_failed()


def _downloaded(tmp_path: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(f"models:/{registry.model_name(P)}@champion",
                                                    dst_path=str(tmp_path / "dl")))


def test_planted_pickles_are_never_unpickled(trained, tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    pyfunc_dir = _downloaded(tmp_path)
    detector_dir = model_folder(pyfunc_dir)
    plant(pyfunc_dir, marker)
    plant(detector_dir, marker)
    image = noise_rgb(77)

    direct = Detector.load(detector_dir, device="cpu").score([image]).scores[0]
    served = mlflow.pyfunc.load_model(str(pyfunc_dir)).predict(pd.DataFrame({"image": [encode_png(image)]}))
    assert float(served["score"].iloc[0]) == pytest.approx(float(direct), rel=1e-5, abs=1e-5)
    (tmp_path / "img.png").write_bytes(png_bytes(image))
    assert cli_main(["score", "--model", str(detector_dir), "--device", "cpu", str(tmp_path / "img.png")]) == 0
    assert not marker.exists()


def test_a_pickle_in_place_of_the_tensors_is_refused_not_executed(trained, tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    detector_dir = model_folder(_downloaded(tmp_path))
    for name in ("network.safetensors", "scoring.safetensors"):
        (detector_dir / name).write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(Exception):
        Detector.load(detector_dir, device="cpu")
    (tmp_path / "img.png").write_bytes(png_bytes(noise_rgb(78)))
    assert cli_main(["score", "--model", str(detector_dir), "--device", "cpu", str(tmp_path / "img.png")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_version_holding_a_pickle_is_never_verified_or_promoted(trained, tmp_path):
    """A registered version whose artifact holds a pickle: verification refuses it without loading
    it, promotion refuses it, and the champion stays."""
    marker = tmp_path / "UNPICKLED"
    src = model_folder(_downloaded(tmp_path))
    tainted = tmp_path / "tainted" / DATA_DIRNAME
    shutil.copytree(src, tainted)
    plant(tainted, marker, names=("extra.pkl",))
    champion = registry.alias_version(P, registry.CHAMPION)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(f"fsad/{P}").experiment_id):
        info = log_pyfunc_model(tainted, noise_rgb(1))
    mv = mlflow.register_model(info.model_uri, registry.model_name(P))
    registry.record_gate(P, str(mv.version), registry.decide(1.0, 0.0, "labelled"))  # even a passed gate
    check = registry.verify(P, str(mv.version), noise_rgb(1), 0.0)
    assert not check.ok and "pickle" in check.reason and "extra.pkl" in check.reason
    assert registry.version_tags(P, str(mv.version))["verified"] == "false"
    with pytest.raises(registry.RegistryError, match="not verified"):
        registry.promote(P, str(mv.version))
    assert registry.alias_version(P, registry.CHAMPION) == champion
    assert not marker.exists()


def test_credentials_never_reach_logs_mlflow_or_reports(trained, tmp_path, capfd):
    from prefect.client.orchestration import get_client

    secrets = (SECRET, KEY_ID, TOKEN)
    # every file the pipeline wrote: store, validation reports, quarantine, MLflow DB and artifacts,
    # downloaded models, persisted Prefect results
    files = [p for p in trained["home"].rglob("*") if p.is_file()]
    results = Path(__import__("prefect").settings.get_current_settings().results.local_storage_path)
    files += [p for p in results.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"{s} found in {path}"
    # MLflow params, tags and metrics names of every run
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=[f"fsad/{P}"], output_format="list")
    assert len(runs) >= 2
    for run in runs:
        blob = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        assert not any(s in blob for s in secrets), run.info.run_id
    for mv in client.search_model_versions(f"name = '{registry.model_name(P)}'"):
        assert not any(s in json.dumps(mv.tags) for s in secrets)
    # the flow runs' logs as stored by Prefect, and whatever reached the console
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs()
    assert logs, "no flow-run logs to check"
    assert not any(s in log.message for log in logs for s in secrets)
    out, err = capfd.readouterr()
    assert not any(s in out + err for s in secrets)
