"""The retraining story against real services from ``infra.stack.up()``: OpenStack Swift as S3,
an MLflow server (SQLite backend, artifacts proxied into the bucket) and a Prefect server.

Uploads go to the bucket through S3Store, the flow runs here against the Prefect server, models and
artifacts end up in the bucket through MLflow. Assertions are on the registry (aliases, tags), on
the bucket listing and on the flow runs the Prefect server recorded. (Starting the flow from an
upload event is the deployment's test.)
"""

from __future__ import annotations

import base64
import io
import json
import os
import site
import statistics
import subprocess
import time
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from tests.tiny_training import TINY_TRAINING

pytestmark = pytest.mark.integration

P = "bolt"
U_GOOD, U_SAME, U_WORSE, U_CORRUPT = (f"20260201T00000{i}Z-def00{i}" for i in range(1, 5))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[object]:
    """A private stack on free ports; the process environment and Prefect's settings point at it."""
    from prefect.settings import temporary_settings

    from infra.config import TELEMETRY_OFF, free_port_env
    from infra.stack import running

    home = tmp_path_factory.mktemp("fsad-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**free_port_env(), **TELEMETRY_OFF}.items():
            mp.setenv(key, value)
        with running(home) as info:
            for key, value in {**info.env(), "FSAD_HOME": str(home), "FSAD_TRAIN_OVERRIDES": json.dumps(TINY_TRAINING),
                               "FSAD_DEVICE": "cpu"}.items():
                mp.setenv(key, value)
            mp.delenv("FSAD_GATE_MIN_AUROC", raising=False)
            with temporary_settings(updates={"api.url": info.prefect_api_url,
                                             "results.local_storage_path": str(home / "prefect-results")}):
                yield info


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    from flows.store.upload import write_upload_folder
    from fsad_core.data import load_category
    from fsad_core.synthetic import make_category

    root = tmp_path_factory.mktemp("sets")
    bolt = make_category(root / "gen-bolt", kind="object", n_train=2, n_test_good=5, n_test_defect=5, size=96, seed=3)
    other = make_category(root / "gen-other", kind="texture", n_train=2, n_test_good=0, n_test_defect=0, size=96,
                          seed=4)

    test = load_category(bolt).test
    good, defect = [s.path for s in test if s.label == 0], [s.path for s in test if s.label == 1]
    return {name: write_upload_folder(root / name, [s.path for s in load_category(src).train], good, defect)
            for name, src in (("good", bolt), ("worse", other))}


def bucket_keys(info, prefix: str = "") -> list[str]:
    """The bucket's listing straight from S3 (not through the code under test)."""
    from infra.s3client import make_s3_client

    client = make_s3_client(info.s3_endpoint, info.access_key, info.secret_key, info.region)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=info.bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def versions() -> list[str]:
    from flows.mlops.registry import model_name

    return sorted(str(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name = '{model_name(P)}'"))


def test_good_upload_to_s3_is_validated_trained_and_promoted(stack, sets):
    from flows.mlops.registry import CANDIDATE, CHAMPION, aliases, model_name, version_tags
    from flows.pipeline.retrain import retrain_flow
    from flows.store.storage import S3Store, open_store
    from flows.store.upload import upload_folder

    store = open_store()
    assert isinstance(store, S3Store)
    upload_folder(store, P, sets["good"], upload_id=U_GOOD)
    prefix = f"products/{P}/uploads/{U_GOOD}/"
    assert f"{prefix}manifest.json" in bucket_keys(stack, prefix)

    summary = retrain_flow(P, upload_id=U_GOOD)
    assert summary["status"] == "promoted", summary["message"]
    assert aliases(P) == {CANDIDATE: "1", CHAMPION: "1"}
    tags = version_tags(P, "1")
    assert tags["verified"] == "true" and tags["gate.verdict"] == "passed" and tags["upload_id"] == U_GOOD
    assert json.loads(store.get_bytes(f"{prefix}validation.json"))["success"] is True

    artifacts = bucket_keys(stack, "mlflow-artifacts/")
    assert any(k.endswith("/data/detector/network.safetensors") for k in artifacts)
    assert any(k.endswith("/validation.json") for k in artifacts)
    assert any(k.endswith("/plots/roc.png") for k in artifacts)
    assert not [k for k in artifacts if k.endswith((".pkl", ".pickle"))]
    assert mlflow.get_tracking_uri().startswith("http://127.0.0.1")
    assert mlflow.MlflowClient().get_model_version(model_name(P), "1").run_id == summary["run_id"]
    # The registered model decides at the threshold the run reports; the upload's eval set only
    # judges (no labels to calibrate on), so that threshold is the fit's own.
    from flows.mlops.registry import download_model
    saved = json.loads((download_model(f"models:/{model_name(P)}/1") / "config.json").read_text())["threshold"]
    assert summary["threshold"]["rule"] == saved["rule"]
    assert saved["value"] == summary["threshold"]["value"]


def test_champion_scores_from_the_registry_through_the_cli(stack, sets, capsys):
    from flows.cli.main import main
    from flows.mlops.registry import model_name

    defect = sorted((sets["good"] / "eval" / "defect").iterdir())[0]
    good = sorted((sets["good"] / "eval" / "good").iterdir())[0]
    assert main(["score", "--model", f"models:/{model_name(P)}@champion", str(good), str(defect)]) == 0
    printed = capsys.readouterr()
    rows = [line.split(",") for line in printed.out.strip().splitlines()[1:]]
    assert float(rows[1][1]) > float(rows[0][1])
    # the version the alias resolved to is printed and written beside every decision
    assert f"model {model_name(P)} version 1 (@champion)" in printed.err
    assert {row[4] for row in rows} == {f"{model_name(P)} version 1 (@champion)"}


def third_party_env(tmp: Path) -> Path:
    """A virtual environment that sees this one's third-party packages but not fsad (the editable
    install's import hook lives in a .pth file that only this environment runs), as a serving
    machine with just the model's requirements installed would."""
    env = tmp / "serve-env"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    purelib = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      text=True).strip()
    (Path(purelib) / "third_party.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    uvicorn = env / "bin" / "uvicorn"  # the console script pip would have written there
    uvicorn.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return env


def invoke(port: int, images: list[Path], maps: bool = False) -> list[dict]:
    rows = [[base64.b64encode(p.read_bytes()).decode()] for p in images]
    body = {"dataframe_split": {"columns": ["image"], "data": rows}, "params": {"maps": maps}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())["predictions"]


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory) -> Iterator[int]:
    """``mlflow models serve -m models:/fsad-bolt@champion`` in the third-party environment; its port."""
    from flows.mlops.registry import model_name
    from flows.mlops.serve_latency import serve, stop

    tmp = tmp_path_factory.mktemp("serving")
    env_dir = third_party_env(tmp)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([env_dir / "bin" / "python", "-c", "import fsad_core"], cwd=tmp, env=env,
                          capture_output=True).returncode != 0, "fsad must not be importable where the model is served"
    server, port = serve(f"models:/{model_name(P)}@champion", tmp / "serve.log", env_dir / "bin" / "python", env, tmp)
    try:
        yield port
    finally:
        stop(server)


def test_the_champion_serves_where_fsad_is_not_installed_and_answers_as_fsad_score(served, sets, capsys):
    from flows.cli.main import main
    from flows.mlops.registry import model_name

    evaluation = sets["good"] / "eval"
    files = sorted((evaluation / "good").iterdir())[:2] + sorted((evaluation / "defect").iterdir())[:2]
    assert main(["score", "--json", "--model", f"models:/{model_name(P)}@champion", *map(str, files)]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    answers = invoke(served, files)
    assert [a["score"] for a in answers] == pytest.approx([e["score"] for e in expected], rel=1e-5, abs=1e-5)
    assert [a["is_anomaly"] for a in answers] == [e["is_anomaly"] for e in expected]
    assert {(a["threshold"], a["model_name"], a["model_version"], a["error"], a["map_png"]) for a in answers} == {
        (expected[0]["threshold"], model_name(P), "1", "", "")}

    mapped = invoke(served, files[-1:], maps=True)[0]
    picture = Image.open(io.BytesIO(base64.b64decode(mapped["map_png"])))
    assert picture.format == "PNG" and picture.size[1] == Image.open(files[-1]).size[1]

    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        invoke(served, files[:1])
        seconds.append(time.perf_counter() - start)
    print(f"served latency, one image a request: median {1000 * statistics.median(seconds):.0f} ms")


def test_a_prefix_is_decided_on_dask_written_back_and_resumed(stack, sets, capsys):
    """Every image under a prefix of the bucket decided by the champion (on a local Dask cluster),
    as fsad score decides it; a second run scores only what no part file holds."""
    from flows.cli.main import main
    from flows.mlops.registry import model_name
    from flows.pipeline.runners import prefect_api
    from flows.pipeline.score_prefix import score_prefix_flow
    from flows.store.storage import open_store

    line = open_store(f"s3://{stack.bucket}/lines/day-1")
    files = sorted((sets["good"] / "eval").rglob("*.png"))
    for f in files[:-1]:
        line.put_bytes(f"{f.parent.name}/{f.name}", f.read_bytes())
    line.put_bytes("defect/broken.png", b"not a png")
    with prefect_api():
        first = score_prefix_flow(P, f"s3://{stack.bucket}/lines/day-1", batch=2, dask="local")
    assert (first["images"], first["already"], first["scored"], first["unreadable"]) == (len(files), 0, len(files), 1)
    parts = [k for k in bucket_keys(stack, "lines/day-1/fsad-decisions/") if k.endswith(".jsonl")]
    assert len(parts) == (len(files) + 1) // 2 and all(f"/{model_name(P)}/v1/part-" in k for k in parts)
    lines = [text for k in parts for text in line.get_bytes(k.removeprefix("lines/day-1/")).decode().splitlines()]
    decisions = {d["image"]: d for d in map(json.loads, lines)}
    assert decisions["defect/broken.png"]["error"].startswith("defect/broken.png: ")
    assert decisions["defect/broken.png"]["is_anomaly"] is True and decisions["defect/broken.png"]["score"] is None

    assert main(["score", "--json", "--model", f"models:/{model_name(P)}@champion", *map(str, files[:-1])]) == 0
    expected = {f"{Path(d['image']).parent.name}/{Path(d['image']).name}": d
                for d in map(json.loads, capsys.readouterr().out.splitlines())}
    for key, want in expected.items():
        assert decisions[key]["score"] == pytest.approx(want["score"], rel=1e-5, abs=1e-5)
        assert decisions[key]["is_anomaly"] == want["is_anomaly"]
        assert decisions[key]["model"] == {"name": model_name(P), "version": "1", "alias": "champion"}

    line.put_bytes(f"{files[-1].parent.name}/{files[-1].name}", files[-1].read_bytes())  # arrived since
    second = score_prefix_flow(P, f"s3://{stack.bucket}/lines/day-1", batch=2)
    assert (second["images"], second["already"], second["scored"]) == (len(files) + 1, len(files), 1)

    # The decisions fed the product's review queue; an image labelled from it leaves it.
    capsys.readouterr()
    assert second["queued"] > 0 and main(["review-queue", "--product", P, "--json"]) == 0
    queued = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(queued) == second["queued"] and all(q["image"].startswith(f"s3://{stack.bucket}/lines/day-1/")
                                                   for q in queued)
    assert "broken.png" not in " ".join(q["image"] for q in queued)  # not judged: nothing to review by score
    assert main(["label", "--product", P, "--defect", "--by", "ann", "--reason", queued[0]["reason"],
                 queued[0]["image"]]) == 0
    capsys.readouterr()
    assert main(["review-queue", "--product", P, "--json"]) == 0
    assert queued[0]["image"] not in capsys.readouterr().out
    # Withdrawn, the product's labels are as before (none): the tests after this one find it as it was.
    assert main(["label", "--product", P, "--retract", queued[0]["image"]]) == 0


def test_same_content_is_not_trained_again(stack, sets):
    from flows.pipeline.retrain import retrain_flow
    from flows.store.storage import open_store
    from flows.store.upload import upload_folder

    upload_folder(open_store(), P, sets["good"], upload_id=U_SAME)
    summary = retrain_flow(P)
    assert summary["upload_id"] == U_SAME and summary["status"] == "already_trained"
    assert versions() == ["1"]


def test_worse_upload_fails_the_gate_and_aliases_stay(stack, sets, monkeypatch):
    from flows.mlops.registry import CANDIDATE, CHAMPION, aliases, version_tags
    from flows.pipeline.retrain import retrain_flow
    from flows.store.storage import open_store
    from flows.store.upload import upload_folder

    monkeypatch.setenv("FSAD_GATE_MIN_AUROC", "0")  # the comparison with the champion decides
    upload_folder(open_store(), P, sets["worse"], upload_id=U_WORSE)
    summary = retrain_flow(P, upload_id=U_WORSE)
    assert summary["status"] == "gate_failed" and "not credibly better than champion v1" in summary["gate"]["reason"]
    assert aliases(P) == {CANDIDATE: "2", CHAMPION: "1"}
    assert version_tags(P, "2")["gate.verdict"] == "failed"


def test_corrupt_upload_is_quarantined_in_s3_with_its_report(stack, sets):
    from flows.pipeline.retrain import UploadRejected, retrain_flow
    from flows.store.storage import open_store
    from flows.store.upload import content_sha256, describe_image, sha256_hex

    store = open_store()
    prefix = f"products/{P}/uploads/{U_CORRUPT}/"
    data = (sets["good"] / "train" / "good" / "000.png").read_bytes()
    files = {"train/good/000.png": data, "train/good/001.png": data[: len(data) // 2]}
    entries = []
    for rel, blob in files.items():
        store.put_bytes(prefix + rel, blob)
        try:
            entries.append({"key": rel, **describe_image(blob, rel)[0].__dict__})
        except ValueError:
            entries.append({"key": rel, "sha256": sha256_hex(blob), "size": len(blob)})
    store.put_json(prefix + "manifest.json", {"format": 1, "product": P, "upload_id": U_CORRUPT, "created": "x",
                                              "files": entries, "content_sha256": content_sha256(entries)})

    with pytest.raises(UploadRejected, match="every file decodes as an image"):
        retrain_flow(P, upload_id=U_CORRUPT)
    quarantine = set(bucket_keys(stack, f"quarantine/{P}/{U_CORRUPT}/"))
    assert {f"quarantine/{P}/{U_CORRUPT}/{n}" for n in
            ("train/good/000.png", "train/good/001.png", "manifest.json", "validation.json")} <= quarantine
    assert f"{prefix}validation.json" in bucket_keys(stack, prefix)
    report = json.loads(store.get_bytes(f"quarantine/{P}/{U_CORRUPT}/validation.json"))
    assert report["success"] is False
    assert versions() == ["1", "2"]


def test_the_prefect_server_recorded_every_flow_run(stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])))
    states = sorted(r.state.type.value for r in runs if r.parameters.get("product") == P)
    assert states == ["COMPLETED"] * 3 + ["FAILED"]
