"""Security properties of the embedded pipeline: model artifacts never unpickle or import anything
(directly, through ``fsad score`` or through MLflow's pyfunc loader; a version holding a pickle, a
loader of its own or bundled code is never verified nor promoted) and the served model never opens
a path its caller names. Credentials are checked on the real stack, where they are in use
(``test_stack_faults.py``)."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import embedded_env, noise_rgb, png_bytes
from mlflow.pyfunc.scoring_server import predictions_to_json
from safetensors import SafetensorError

from flows.cli.main import main as cli_main
from flows.mlops import registry
from flows.pipeline.retrain import retrain_flow
from flows.pyfunc import DATA_DIRNAME, encode_png, log_pyfunc_model, model_folder
from flows.store.storage import open_store
from flows.store.upload import upload_folder
from fsad_core.budget import MemoryBudget
from fsad_core.detector import Detector
from fsad_core.evidence import LABELLED, Evidence

P = "gasket"


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
    """The embedded flow run once: a good upload (trained, promoted) and a corrupt one (rejected)."""
    home = tmp_path_factory.mktemp("fsad-home")
    sets = tmp_path_factory.mktemp("sets")
    with pytest.MonkeyPatch.context() as mp:
        embedded_env(mp, home)
        mp.setenv("FSAD_GATE_MIN_AUROC", "0")
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
    with pytest.raises(SafetensorError, match="deserializing header"):
        Detector.load(detector_dir, device="cpu")
    (tmp_path / "img.png").write_bytes(png_bytes(noise_rgb(78)))
    assert cli_main(["score", "--model", str(detector_dir), "--device", "cpu", str(tmp_path / "img.png")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not marker.exists()


def _register(folder: Path, **log_options) -> str:
    """A version of the product's model logged from ``folder`` by hand, with a passed gate."""
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(f"fsad/{P}").experiment_id):
        if log_options:
            info = mlflow.pyfunc.log_model(name="model", data_path=str(folder), **log_options)
        else:
            info = log_pyfunc_model(folder, noise_rgb(1))
    version = str(mlflow.register_model(info.model_uri, registry.model_name(P)).version)
    passed = Evidence(LABELLED, 1.0, 1.0, 1.0, 5, 5)
    registry.record_gate(P, version, registry.gate_decision(passed, 0.0, "labelled"))  # even a passed gate
    return version


def _assert_refused(version: str, reason: str, marker: Path, scored: bool = False) -> None:
    """Never verified nor promoted; never loaded to score either, unless ``scored``: bundled code
    under the pipeline's own file names is never imported, so such a model may score."""
    champion = registry.alias_version(P, registry.CHAMPION)
    check = registry.verify(P, version, registry.WrittenModel({}, noise_rgb(1), 0.0, False, 0.0))
    assert not check.ok and reason in check.reason, check.reason
    tags = registry.version_tags(P, version)
    assert tags["verified"] == "false" and reason in tags["verified.reason"]
    with pytest.raises(registry.RegistryError, match="not verified"):
        registry.promote(P, version)
    assert registry.alias_version(P, registry.CHAMPION) == champion
    if scored:
        Detector.load(registry.download_model(f"models:/{registry.model_name(P)}/{version}"), device="cpu")
    else:
        with pytest.raises(registry.RegistryError, match=re.escape(reason)):
            registry.download_model(f"models:/{registry.model_name(P)}/{version}")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["extra.pkl", "weights.bin", "notes"])
def test_a_version_holding_a_pickle_is_never_verified_or_promoted(trained, tmp_path, where):
    """A registered version whose artifact holds a pickle, under any name: verification refuses it
    without loading it (it holds a file the pipeline never writes), promotion refuses, the champion stays."""
    marker = tmp_path / "UNPICKLED"
    tainted = tmp_path / "tainted" / DATA_DIRNAME
    shutil.copytree(model_folder(_downloaded(tmp_path)), tainted)
    plant(tainted, marker, names=(where,))
    _assert_refused(_register(tainted), f"artifact holds files the pipeline never writes: data/detector/{where}",
                    marker)


LOADER = """from pathlib import Path
Path({marker!r}).write_text("imported")


def _load_pyfunc(path):
    Path({marker!r}).write_text("loaded")
"""


@pytest.mark.parametrize("loader, code_file, reason, scored", [
    ("evil_loader", "evil_loader.py", "MLmodel names another loader ('evil_loader'", False),
    ("flows.pyfunc", "flows/pyfunc.py", "bundled code is not this fsad's own", True),  # the pipeline's own name
    ("flows.pyfunc", "flows/evil.py", "artifact holds files the pipeline never writes: code/flows/evil.py", False),
])
def test_a_version_with_a_loader_or_code_of_its_own_is_never_run_verified_or_promoted(trained, tmp_path, loader,
                                                                                    code_file, reason, scored):
    """No pickle anywhere, but the artifact names its own loader module (or bundles code under the
    pipeline's module name): verification refuses it before importing anything."""
    marker = tmp_path / "LOADER_RAN"
    folder = tmp_path / "planted" / DATA_DIRNAME
    shutil.copytree(model_folder(_downloaded(tmp_path)), folder)
    code = tmp_path / "code" / code_file
    code.parent.mkdir(parents=True)
    code.write_text(LOADER.format(marker=str(marker)))
    root = tmp_path / "code" / code_file.split("/")[0]
    _assert_refused(_register(folder, loader_module=loader, code_paths=[str(root)]), reason, marker, scored)


def test_the_served_model_never_opens_a_path_its_caller_names(trained, tmp_path):
    """Served input is image bytes: a path, existing or not, gets the same answer and is never read;
    the other rows are still scored."""
    existing = tmp_path / "secret.png"
    existing.write_bytes(png_bytes(noise_rgb(5)))
    model = mlflow.pyfunc.load_model(str(_downloaded(tmp_path)))
    cells = [str(existing), str(tmp_path / "missing.png"), "/etc/passwd", encode_png(noise_rgb(6))]
    out = model.predict(pd.DataFrame({"image": cells}))
    assert out["error"].tolist()[:3] == [f"row {i}: not base64 image bytes" for i in range(3)]
    assert out["score"].iloc[:3].isna().all() and out["is_anomaly"].iloc[:3].all()
    assert out["error"].iloc[3] == "" and np.isfinite(out["score"].iloc[3])
    answer = io.StringIO()  # as the scoring server writes it: strict JSON, no score where none was made
    predictions_to_json(out, answer)
    rows = json.loads(answer.getvalue(), parse_constant=lambda word: pytest.fail(f"{word} is not JSON"))["predictions"]
    assert [row["score"] for row in rows][:3] == [None, None, None] and isinstance(rows[3]["score"], float)


def test_a_request_over_the_pixel_budget_is_refused_row_by_row_before_decoding(trained, tmp_path, monkeypatch):
    model = mlflow.pyfunc.load_model(str(_downloaded(tmp_path)))
    monkeypatch.setenv("FSAD_MAX_SET_PIXELS", str(64 * 64 * 2))
    out = model.predict(pd.DataFrame({"image": [encode_png(noise_rgb(i)) for i in range(3)]}))
    assert out["error"].tolist()[:2] == ["", ""] and np.isfinite(out["score"].iloc[:2].astype(float)).all()
    assert out["error"].iloc[2] == ("the request up to row 2: refused, its 3 images hold 12288 decoded pixels, above "
                                    "the budget of 8192 (FSAD_MAX_SET_PIXELS); send fewer at once")


def test_rows_beyond_the_memory_budget_are_refused_and_a_request_that_waits_too_long_is_refused(trained, tmp_path,
                                                                                                 monkeypatch):
    """The rows' memory is reckoned from their headers: those that would take the request past the
    process's budget are refused, the others scored; a request whose share stays taken by others
    past the wait is refused whole, with a reason to try again."""
    import flows.pyfunc

    model = mlflow.pyfunc.load_model(str(_downloaded(tmp_path)))
    budget = MemoryBudget(330_000)  # two 64 x 64 rows: decoded, scored and kept (flows.pyfunc's reckoning)
    monkeypatch.setattr(flows.pyfunc, "serving_budget", lambda: budget)
    monkeypatch.setattr(flows.pyfunc, "MEMORY_WAIT_S", 0.2)
    cells = [encode_png(noise_rgb(i)) for i in range(3)]
    out = model.predict(pd.DataFrame({"image": cells}))
    assert out["error"].tolist()[:2] == ["", ""] and np.isfinite(out["score"].iloc[:2].astype(float)).all()
    assert out["error"].iloc[2] == ("row 2: refused, the request's images need more memory than the server's budget "
                                    "(FSAD_SERVE_MEMORY_MB); send fewer at once")
    with budget.share(300_000, wait_s=0):  # another request's
        busy = model.predict(pd.DataFrame({"image": cells[:1]}))
    assert busy["error"].iloc[0] == ("row 0: refused, the server's memory budget stayed taken by other requests for "
                                     "0.2 s; try again") and bool(busy["is_anomaly"].iloc[0])
    assert budget.held == 0 and model.predict(pd.DataFrame({"image": cells[:1]}))["error"].iloc[0] == ""


def test_the_served_model_refuses_a_thin_image_and_scores_the_rest(trained, tmp_path):
    model = mlflow.pyfunc.load_model(str(_downloaded(tmp_path)))
    thin = np.full((1, 20000, 3), 128, np.uint8)
    out = model.predict(pd.DataFrame({"image": [encode_png(thin), encode_png(noise_rgb(7))]}))
    assert out["error"].iloc[0] == "row 0: refused, 20000x1: the shorter side is below the minimum of 32 px"
    assert out["error"].iloc[1] == "" and np.isfinite(out["score"].iloc[1])
