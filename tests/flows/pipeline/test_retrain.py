"""The retraining flow end to end on embedded services: a local folder store, SQLite MLflow in tmp
and Prefect's test harness (a temporary API server and database).

The story: a good upload becomes champion; the same content again is not trained twice; an upload
whose training images come from another product scores worse on the same evaluation set and fails
the gate (champion and previous unchanged); a corrupt upload is quarantined with its report and
creates no model version; an incomplete upload is refused without quarantine. Retrainings of one
product are serialised by a Prefect concurrency slot; training on CUDA takes the ``gpu`` slot.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from flows.mlops import control, registry, tracking
from flows.mlops.registry import CANDIDATE, CHAMPION, NO_LABELS, PREVIOUS
from flows.pipeline.retrain import (
    GPU_LIMIT,
    Published,
    RetrainJob,
    UploadRejected,
    already_trained_summary,
    gate_failed_message,
    load_images,
    product_lock,
    retrain_flow,
    trained_summary,
    training_slot,
    version_tags,
)
from flows.pipeline.summary import PINNED, GateSummary, RetrainSummary
from flows.pyfunc import encode_png
from flows.settings import LoopSettings, SettingsError, load_settings, training_config
from flows.store.labels import DEFECT, GOOD, LabelSnapshot, add_labels, current_labels
from flows.store.storage import open_store, quarantine_prefix, training_key, upload_prefix, validation_key
from flows.store.upload import (
    ManifestError,
    content_sha256,
    describe_image,
    sha256_hex,
    upload_folder,
    write_upload_folder,
)
from fsad_core.calibration import (
    RULE_MISS_TARGET,
    RULE_PREDICTION_BOUND,
    RULE_SINGLE_IMAGE,
    RULE_SYNTHETIC_GAP,
    Threshold,
)
from fsad_core.config import DetectorConfig
from fsad_core.data import load_category
from fsad_core.detector import Detector
from fsad_core.evidence import weighted_auroc
from fsad_core.imageio import ImageReadError, read_image
from fsad_core.synthetic import make_category
from tests.html_pictures import pictures_of
from tests.tiny_training import TINY_TRAINING

UNSUPERVISED_RULES = (RULE_PREDICTION_BOUND, RULE_SYNTHETIC_GAP, RULE_SINGLE_IMAGE)

P = "washer"
U_GOOD, U_SAME, U_WORSE, U_CORRUPT, U_PARTIAL = (f"20260101T00000{i}Z-abc00{i}" for i in range(1, 6))
CLEARED = ("FSAD_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FSAD_GATE_MIN_AUROC", "FSAD_DEVICE",
           "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "PREFECT_API_URL")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Embedded settings in tmp and a Prefect test API; results persisted under tmp as well."""
    from prefect.settings import temporary_settings

    home = tmp_path_factory.mktemp("fsad-home")
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("FSAD_HOME", str(home))
        mp.setenv("FSAD_TRAIN_OVERRIDES", json.dumps(TINY_TRAINING))
        mp.setenv("FSAD_DEVICE", "cpu")
        with prefect_test_harness(server_startup_timeout=180), \
                temporary_settings(updates={"results.local_storage_path": str(home / "prefect-results")}):
            yield mp


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """Upload folders: the product, and the same eval set with another product's training images."""
    root = tmp_path_factory.mktemp("sets")
    washer = make_category(root / "gen-washer", kind="object", n_train=2, n_test_good=5, n_test_defect=5,
                           size=96, seed=1)
    gravel = make_category(root / "gen-gravel", kind="texture", n_train=2, n_test_good=0, n_test_defect=0,
                           size=96, seed=2)

    test = load_category(washer).test
    good, defect = [s.path for s in test if s.label == 0], [s.path for s in test if s.label == 1]
    return {name: write_upload_folder(root / name, [s.path for s in load_category(src).train], good, defect)
            for name, src in (("good", washer), ("worse", gravel))}


def versions() -> list[str]:
    found = mlflow.MlflowClient().search_model_versions(f"name = '{registry.model_name(P)}'")
    return sorted(str(v.version) for v in found)


def test_good_upload_becomes_a_verified_champion(env, sets, tmp_path):
    store = open_store()
    upload_folder(store, P, sets["good"], upload_id=U_GOOD)
    summary = retrain_flow(P, upload_id=U_GOOD, method="default")  # the method asked for, not the candidates

    assert summary["status"] == "promoted", summary["message"]
    assert summary["method"] == "default" and registry.version_tags(P, "1")["candidate_choice"] == "the only candidate"
    assert summary["version"] == "1" and summary["eval_set"] == "labelled"
    assert summary["aliases"] == {CANDIDATE: "1", CHAMPION: "1"}
    assert summary["metrics"]["benchmark_auroc"] >= 0.9 and summary["gate"]["passed"]
    assert summary["threshold"]["rule"] in UNSUPERVISED_RULES  # the fit's, never chosen on the benchmark
    json.dumps(summary)  # JSON-able: it is the flow's persisted result
    tags = registry.version_tags(P, "1")
    assert tags["verified"] == "true" and tags["gate.verdict"] == "passed"
    assert tags["content_sha256"] == summary["content_sha256"] and tags["upload_id"] == U_GOOD
    assert json.loads(store.get_bytes(validation_key(P, U_GOOD)))["success"] is True

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.model_name(P)}@{CHAMPION}",
                                                     dst_path=str(tmp_path)))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name(P)}@{CHAMPION}")
    defect = read_image(sorted((sets["good"] / "eval" / "defect").iterdir())[0])
    good = read_image(sorted((sets["good"] / "eval" / "good").iterdir())[0])
    out = model.predict(pd.DataFrame({"image": [encode_png(good), encode_png(defect)]}))
    assert out["score"].iloc[1] > out["score"].iloc[0]

    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.data.params["upload_id"] == U_GOOD and run.data.params["content_sha256"] == summary["content_sha256"]
    assert run.data.params["intensity"] == "raw"  # the mode `auto` took for a colour product, not "auto"
    assert run.data.params["pooling"] == "mean+std+max" and run.data.params["coreset_candidates"] == "40000"
    assert run.data.params["map_sigma"] == "4.0"
    assert (run.data.params["augment_flips"], run.data.params["augment_rotation_deg"]) == ("horizontal", "10.0")
    # the run's HTML report: the verdict first, every picture inside the one file
    page = mlflow.artifacts.load_text(f"runs:/{summary['run_id']}/report.html")
    assert "Verdict: passed the gate" in page and summary["message"] in page
    pictures = pictures_of(page)
    assert len(pictures) >= 4  # ROC, histograms and overlays of the eval set's worst normal and best defect
    assert "benchmark_auroc" in run.data.metrics and run.data.tags["fsad.status"] == "trained"
    losses = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) == TINY_TRAINING["finetune"]["steps"]


def test_same_content_is_not_trained_twice(env, sets):
    result = upload_folder(open_store(), P, sets["good"], upload_id=U_SAME)
    summary = retrain_flow(P)  # default: the latest complete upload, i.e. U_SAME
    assert summary["upload_id"] == U_SAME and result.content_sha256 == summary["content_sha256"]
    assert summary["status"] == "already_trained" and summary["version"] == "1"
    assert "already trained as version 1" in summary["message"]
    assert retrain_flow(P, upload_id=U_GOOD)["status"] == "already_trained"
    assert versions() == ["1"]


def test_already_trained_is_read_anew_each_time_a_run_asks(env):
    """The flow asks again right before logging (a run whose lock lapsed must see the version another
    run registered meanwhile), so that task's answer must never come from Prefect's result cache."""
    from prefect import flow

    from flows.pipeline.retrain import find_existing

    settings = load_settings()
    source = mlflow.MlflowClient().get_model_version(registry.model_name(P), versions()[0]).source
    tags = {"content_sha256": "e" * 64, "config_sha256": "f" * 64}

    @flow
    def ask_register_ask() -> tuple:
        before = find_existing(settings, "probe", tags["content_sha256"], tags["config_sha256"], NO_LABELS)
        mlflow.register_model(source, registry.model_name("probe"), tags=tags)
        return before, find_existing(settings, "probe", tags["content_sha256"], tags["config_sha256"], NO_LABELS)

    before, after = ask_register_ask()
    assert before is None and after is not None and after["version"] == "1"


def test_worse_upload_fails_the_gate_and_the_champion_stays(env, sets):
    env.setenv("FSAD_GATE_MIN_AUROC", "0")  # so that the comparison with the champion decides
    upload_folder(open_store(), P, sets["worse"], upload_id=U_WORSE)
    try:
        summary = retrain_flow(P, upload_id=U_WORSE)
    finally:
        env.delenv("FSAD_GATE_MIN_AUROC")
    assert summary["status"] == "gate_failed" and summary["version"] == "2"
    gate = summary["gate"]
    assert not gate["passed"] and gate["champion_version"] == "1"
    assert gate["candidate_auroc"] < gate["champion_auroc"]
    assert "not credibly better than champion v1" in gate["reason"]
    assert registry.aliases(P) == {CANDIDATE: "2", CHAMPION: "1"}
    assert PREVIOUS not in registry.aliases(P)  # nothing was promoted, so previous was not moved
    tags = registry.version_tags(P, "2")
    assert tags["gate.verdict"] == "failed" and tags["gate.champion_auroc"] == f"{gate['champion_auroc']:.6f}"
    assert "verified" not in tags
    page = mlflow.artifacts.load_text(f"runs:/{summary['run_id']}/report.html")
    assert "Verdict: failed the gate" in page and "not credibly better than champion v1" in page and pictures_of(page)


def test_upload_without_eval_set_is_judged_on_leave_one_out_and_synthetic_anomalies(env, sets):
    env.setenv("FSAD_GATE_MIN_AUROC", "0")  # a 64 px toy model: the point is the path, not the score
    try:
        upload_folder(open_store(), "noeval", sets["good"] / "train" / "good", upload_id=U_GOOD)
        summary = retrain_flow("noeval")
    finally:
        env.delenv("FSAD_GATE_MIN_AUROC")
    assert summary["status"] == "promoted" and summary["eval_set"] == "loo+synthetic"
    assert summary["threshold"]["rule"] in UNSUPERVISED_RULES  # the fit's unsupervised threshold stays
    assert summary["metrics"]["n_benchmark_normal"] == 2 and summary["metrics"]["n_benchmark_defect"] > 0
    assert registry.version_tags("noeval", "1")["gate.eval_set"] == "loo+synthetic"


def test_a_products_own_settings_are_checked_used_and_retrain_it_once(env):
    """products/P/training.json over FSAD_TRAIN_OVERRIDES: a bad one fails the run before any work; a
    good one changes the configuration, so the nightly sweep plans one retraining on the same upload."""
    from flows.pipeline.scheduled import plan_product

    store, settings = open_store(), load_settings()
    store.put_json(training_key("noeval"), ["not", "an", "object"])
    with pytest.raises(SettingsError, match="products/noeval/training.json: must be a JSON object"):
        retrain_flow("noeval")
    started = time.monotonic()
    with pytest.raises(SettingsError, match="products/noeval/training.json"):
        plan_product(settings, "noeval", "default", 0)  # the task with its retry policy, as the sweep runs it
    assert time.monotonic() - started < 10  # not retried: a retry would wait 2 s, then 10 s more
    assert registry.aliases("noeval")[CHAMPION] == "1"
    assert len(mlflow.MlflowClient().search_model_versions(f"name = '{registry.model_name('noeval')}'")) == 1
    store.put_json(training_key("noeval"), {"augment": {"hflip": False}})
    plan = plan_product.fn(settings, "noeval", "default", 0)
    assert plan.upload_id == U_GOOD and "configuration changed since champion v1" in plan.reason
    env.setenv("FSAD_GATE_MIN_AUROC", "0")
    try:
        summary = retrain_flow("noeval")
    finally:
        env.delenv("FSAD_GATE_MIN_AUROC")
    assert summary["version"] == "2" and summary["upload_id"] == U_GOOD
    params = mlflow.MlflowClient().get_run(summary["run_id"]).data.params
    assert params["augment_flips"] == "none" and params["size"] == str(TINY_TRAINING["size"])  # merged
    assert "already trained as version 2" in plan_product.fn(settings, "noeval", "default", 0).reason
    store.put_json(training_key("noeval"), {"augment": {"hflip": False}, "loop": {"reviews_per_run": 5}})
    assert "already trained as version 2" in plan_product.fn(settings, "noeval", "default", 0).reason  # not training
    store.put_json(training_key("noeval"), {"augment": {"hflip": False}, "loop": {"miss_rate_target": 0.1}})
    assert "training configuration changed since champion" in plan_product.fn(settings, "noeval", "default", 0).reason


def test_a_pinned_product_is_gated_but_not_promoted(env, sets):
    store = open_store()
    env.setenv("FSAD_GATE_MIN_AUROC", "0.999")  # a first version that misses it: registered, no champion
    try:
        upload_folder(store, "pinned", sets["worse"], upload_id=U_WORSE)
        assert retrain_flow("pinned")["status"] == "gate_failed"
    finally:
        env.delenv("FSAD_GATE_MIN_AUROC")
    control.pin(store, "pinned", True, "ann", "lot 7 under audit")
    upload_folder(store, "pinned", sets["good"], upload_id=U_GOOD)
    summary = RetrainSummary.from_dict(retrain_flow("pinned", upload_id=U_GOOD))
    assert summary.gate.passed and summary.status == PINNED and "pinned" in summary.message
    assert CHAMPION not in registry.aliases("pinned") and summary.version == "2"
    control.promote_by_hand(store, "pinned", "2", "ann", "audit done")
    assert registry.aliases("pinned")[CHAMPION] == "2"


def test_labels_judge_train_and_calibrate_and_new_labels_make_a_new_version(env, sets, tmp_path):
    store = open_store()
    upload_folder(store, "labelled", sets["good"], upload_id=U_GOOD)
    first = RetrainSummary.from_dict(retrain_flow("labelled"))
    assert first.status == "promoted" and first.gate.evidence == "labelled"  # the upload's 5 + 5 eval images
    line = load_category(make_category(tmp_path / "line", kind="object", n_train=1, n_test_good=10,
                                       n_test_defect=10, size=96, seed=1))
    for label in (GOOD, DEFECT):
        images = [(s.path.name, s.path.read_bytes()) for s in line.test if s.label == (label == DEFECT)]
        add_labels(store, "labelled", images, label, "ann", "command line")
    store.put_json(training_key("labelled"), {"loop": {"benchmark_share": 0.5, "defect_negatives": True}})
    snapshot = LabelSnapshot.of(current_labels(store, "labelled"))
    judging, training = snapshot.split(0.5)
    assert judging and training  # the hash puts some on each side

    second = RetrainSummary.from_dict(retrain_flow("labelled"))  # same upload and model: the labels are new
    assert second.version == "2" and second.trained is not None
    metrics, tags = second.trained.metrics, registry.version_tags("labelled", "2")
    trained_normals = [e for e in training if e.label == GOOD]
    assert second.trained.k == 2 + len(trained_normals)
    assert metrics["n_benchmark_normal"] == 5 + sum(e.label == GOOD for e in judging)
    assert metrics["n_benchmark_defect"] == 5 + sum(e.label == DEFECT for e in judging)
    assert metrics["benchmark_auroc_low"] <= metrics["benchmark_auroc"] <= metrics["benchmark_auroc_high"]
    assert second.trained.threshold.rule in UNSUPERVISED_RULES  # the false-alarm target, never the benchmark
    model = Detector.load(registry.download_model(f"models:/{registry.model_name('labelled')}/2"))
    trained_defects = sum(e.label == DEFECT for e in training)
    assert model.meta["defects"] == (trained_defects if model.config.finetune else 0)  # the fine-tuning's negatives
    assert (tags["labels_sha256"], tags["labels_good"], tags["labels_defect"]) == (snapshot.digest, "10", "10")
    assert tags["candidate_choice"].startswith(f"{second.method}: ") and "candidates fast " in tags["candidate_choice"]
    assert second.gate.champion_version == "1" and second.gate.evidence == "labelled"  # compared on one benchmark
    assert retrain_flow("labelled")["status"] == "already_trained"  # the same labels: not trained twice


def test_a_miss_rate_target_catches_the_training_sides_confirmed_defects(env, sets, tmp_path):
    """Defects that look like normal parts (normal images labelled defective) pass the false-alarm
    target's threshold; with ``loop.miss_rate_target`` 0 the version flags every one of them."""
    store = open_store()
    upload_folder(store, "missed", sets["good"], upload_id=U_GOOD)
    assert retrain_flow("missed")["status"] == "promoted"
    line = load_category(make_category(tmp_path / "line", kind="object", n_train=1, n_test_good=16,
                                       n_test_defect=0, size=96, seed=2))
    add_labels(store, "missed", [(s.path.name, s.path.read_bytes()) for s in line.test], DEFECT, "ann", "audit")
    store.put_json(training_key("missed"), {"loop": {"miss_rate_target": 0.0}})
    _, training = LabelSnapshot.of(current_labels(store, "missed")).split(0.5)
    assert len(training) >= 5
    second = RetrainSummary.from_dict(retrain_flow("missed"))
    assert second.version == "2" and second.trained.threshold.rule == RULE_MISS_TARGET
    model = Detector.load(registry.download_model(f"models:/{registry.model_name('missed')}/2"))
    trained_side = [read_image(store.get_bytes(e.image_key)) for e in training]
    assert model.score(trained_side).is_anomaly.all()
    assert model.threshold.details["n_defects"] == len(training)


def test_the_benchmark_counts_each_image_by_its_weight(sets):
    """A judging label stands for as many of the line's images as its weight (one over its chance of
    a review); the benchmark's AUROC is the weighted one, as the champion's is (`registry.champion_view`)."""
    from flows.pipeline.retrain import UploadData, score_benchmark

    folder = sets["good"]
    train = [read_image(p) for p in sorted((folder / "train" / "good").glob("*.png"))]
    evaluated = [(read_image(p), int(kind == "defect")) for kind in ("good", "defect")
                 for p in sorted((folder / "eval" / kind).glob("*.png"))]
    images, labels = [image for image, _ in evaluated], [label for _, label in evaluated]
    labels[0], labels[-1] = 1, 0  # two swapped: a ranking short of perfect, where weights matter
    detector, report = Detector.fit(train, training_config("fast", 0, TINY_TRAINING), device="cpu")
    scores = detector.score(images).raw_scores
    weights = [1.0 + 15.0 * (score < np.median(scores)) for score in scores]  # the low scores: audits
    bench = score_benchmark.fn(detector, report, UploadData(train, images, labels, [""] * len(images), weights))
    assert bench.evidence.auroc == pytest.approx(weighted_auroc(labels, scores, weights))
    assert bench.evidence.auroc != pytest.approx(weighted_auroc(labels, scores))


def test_a_product_whose_first_model_missed_the_gate_is_decided_in_shadow_for_its_review_queue(env, sets, tmp_path):
    from flows.pipeline.score_prefix import score_prefix_flow
    from flows.store.queue import queue_state

    env.setenv("FSAD_GATE_MIN_AUROC", "0.999")
    try:
        upload_folder(open_store(), "shadowed", sets["worse"], upload_id=U_WORSE)
        assert retrain_flow("shadowed")["status"] == "gate_failed"
    finally:
        env.delenv("FSAD_GATE_MIN_AUROC")
    assert registry.aliases("shadowed") == {CANDIDATE: "1"}
    line = tmp_path / "line"
    line.mkdir()
    for path in sorted((sets["good"] / "eval").rglob("*.png")):
        (line / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    summary = score_prefix_flow("shadowed", str(line))
    assert summary["scored"] == 10 and "@candidate: no champion yet" in summary["model"]
    [part] = (line / "fsad-decisions").rglob("*.jsonl")
    assert {json.loads(row)["model"]["alias"] for row in part.read_text().splitlines()} == {CANDIDATE}
    assert summary["queued"] == 10 and len(queue_state(open_store(), "shadowed").items) == 10


def test_corrupt_upload_is_quarantined_and_creates_no_version(env, sets):
    store = open_store()
    prefix = upload_prefix(P, U_CORRUPT)
    good = (sets["good"] / "train" / "good" / "000.png").read_bytes()
    files = {"train/good/000.png": good, "train/good/001.png": good[: len(good) // 2]}  # truncated PNG
    entries = []
    for rel, data in files.items():
        store.put_bytes(prefix + rel, data)
        try:
            facts, _ = describe_image(data, rel)
            entries.append({"key": rel, **facts.__dict__})
        except ValueError:
            entries.append({"key": rel, "sha256": sha256_hex(data), "size": len(data)})
    store.put_json(prefix + "manifest.json", {"format": 1, "product": P, "upload_id": U_CORRUPT, "created": "x",
                                              "files": entries, "content_sha256": content_sha256(entries)})

    state = retrain_flow(P, upload_id=U_CORRUPT, return_state=True)
    assert state.is_failed()
    assert "every file decodes as an image: train/good/001.png" in state.message
    with pytest.raises(UploadRejected, match="quarantined at"):
        state.result()

    report = json.loads(store.get_bytes(validation_key(P, U_CORRUPT)))
    assert report["success"] is False and any("decodes" in f for f in report["failed"])
    quarantined = set(store.list(quarantine_prefix(P, U_CORRUPT)))
    assert {quarantine_prefix(P, U_CORRUPT) + name for name in
            ("train/good/000.png", "train/good/001.png", "manifest.json", "validation.json")} <= quarantined
    assert store.exists(prefix + "train/good/001.png")  # copied, never moved
    assert versions() == ["1", "2"] and registry.aliases(P)[CHAMPION] == "1"
    runs = mlflow.search_runs(experiment_names=[tracking.experiment_name(P)],
                              filter_string=f"tags.`fsad.upload_id` = '{U_CORRUPT}'", output_format="list")
    assert [r.data.tags["fsad.status"] for r in runs] == ["failed"] and runs[0].info.status == "FAILED"
    assert "validation.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}


def test_training_checks_the_pixel_budget_before_decoding_an_image(env, tmp_path, monkeypatch):
    """Validation refuses an upload over the budget; should one get past it, training stops before
    the image that would overrun the budget is decoded."""
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(3):  # 64 x 64 each
        pixels = np.random.default_rng(i).integers(40, 210, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    result = upload_folder(open_store(), "budget", folder, upload_id="20260101T000000Z-budget")
    monkeypatch.setenv("FSAD_MAX_SET_PIXELS", str(2 * 64 * 64))
    with pytest.raises(ImageReadError, match="its 3 images hold 12288 decoded pixels, above the budget of 8192"):
        job = dataclasses.replace(_job(), product="budget", upload_id=result.upload_id)
        load_images.fn(load_settings(), job, result.manifest)


def test_incomplete_upload_is_refused_without_quarantine(env):
    store = open_store()
    store.put_bytes(upload_prefix(P, U_PARTIAL) + "train/good/000.png", b"\x89PNG half")
    with pytest.raises(ManifestError, match="incomplete"):
        retrain_flow(P, upload_id=U_PARTIAL)
    assert not store.list(quarantine_prefix(P, U_PARTIAL))
    assert versions() == ["1", "2"]


def test_gpu_slot_neither_blocks_nor_fails_without_a_limit_and_is_held_with_one(env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    start = time.monotonic()
    with training_slot("cuda"):  # no limit named gpu exists: Prefect skips the acquisition
        pass
    with training_slot("cpu"):
        pass
    assert time.monotonic() - start < 30
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
        try:
            with training_slot("cuda"):
                assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 1
            assert client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots == 0
        finally:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)


@pytest.mark.parametrize("temporary_api", [False, True], ids=["server-lease", "file-lock"])
def test_product_lock_admits_one_retraining_per_product_at_a_time(env, temporary_api):
    """On a Prefect server the lock is its leased slot; on a temporary server of this process, a
    file lock under FSAD_HOME (the kernel frees it when the process dies)."""
    env.setattr("flows.pipeline.retrain.api_is_temporary", lambda: temporary_api)
    settings, events = load_settings(), []

    def first() -> None:
        with product_lock(settings, "locked"):
            events.append("first in")
            time.sleep(3)
            events.append("first out")

    holder = threading.Thread(target=first)
    holder.start()
    while not events:
        time.sleep(0.1)
    with product_lock(settings, "another"):  # other products are not held up
        events.append("another in")
    with product_lock(settings, "locked"):
        events.append("second in")
    holder.join()
    assert events == ["first in", "another in", "first out", "second in"]
    assert (settings.home / "locks" / "fsad-retrain-locked.lock").exists() is temporary_api


def test_settings_come_from_the_environment(env):
    s = load_settings()
    assert s.embedded_tracking and s.storage_url.endswith("store") and s.train_overrides == TINY_TRAINING
    tracking.configure(s)
    assert mlflow.get_tracking_uri() == s.tracking_uri


# ---- the summaries, without running a flow ---------------------------------------------------------

IDENTITY = ["product", "upload_id", "content_sha256", "method", "seed", "config_sha256", "validation"]


def _job() -> RetrainJob:
    return RetrainJob("washer", U_GOOD, "c" * 64, "default", 3, DetectorConfig(), "d" * 64, "cpu",
                      "file:///store/validation.json", "{}", LabelSnapshot(()), LoopSettings())


def _record(job: RetrainJob) -> tracking.TrainingRecord:
    threshold = Threshold(1.5, "normal_prediction_bound", 0.02, None)
    return tracking.TrainingRecord(
        product=job.product, upload_id=job.upload_id, content_sha256=job.content_sha256, method=job.method,
        config=job.config, config_sha256=job.config_sha256, k=2, eval_set="labelled",
        metrics={"benchmark_auroc": 0.875, "f1": 0.5}, history=None, threshold=threshold, validation_json="{}",
        fit_report={}, roc_labels=[0, 1], roc_scores=[0.1, 0.9], overlays=[], example_image=np.zeros((4, 4, 3)))


def test_an_already_trained_summary_names_the_existing_version_and_its_recorded_verdict():
    existing = {"version": "4", "run_id": "r4", "tags": {"gate.verdict": "passed", "gate.reason": "AUROC 0.9"}}
    summary = already_trained_summary(_job(), existing, {CHAMPION: "4"})
    assert summary.seed == 3 and summary.validation == "file:///store/validation.json"
    assert summary.status == "already_trained" and summary.run_id == "r4" and summary.trained is None
    assert summary.model == f"models:/{registry.model_name('washer')}/4"
    assert summary.gate == GateSummary(True, "AUROC 0.9") and summary.aliases == {CHAMPION: "4"}
    assert summary.message == "already trained as version 4 (same content_sha256 and configuration); not training again"
    untagged = already_trained_summary(_job(), {**existing, "tags": {}}, {})
    assert untagged.gate == GateSummary(False, "no gate verdict recorded")
    assert list(summary.to_dict()) == [*IDENTITY, "status", "message", "version", "run_id", "model", "gate", "aliases"]


@pytest.mark.parametrize("passed", [True, False])
def test_a_trained_summary_has_the_same_fields_whether_the_gate_passed_or_not(passed):
    job = _job()
    record = _record(job)
    decision = registry.GateDecision(passed, "why", 0.8, 0.875, "labelled", "1", 0.9)
    summary = trained_summary(job, record, Published("r5", "5", decision, {CHAMPION: "1"}, "what happened")).to_dict()
    assert list(summary) == [*IDENTITY, "status", "message", "version", "run_id", "model", "gate", "aliases",
                             "eval_set", "k", "metrics", "threshold", "training"]
    assert summary["status"] == ("promoted" if passed else "gate_failed") and summary["message"] == "what happened"
    assert (summary["version"], summary["run_id"], summary["k"]) == ("5", "r5", 2)
    assert summary["metrics"] == record.metrics and summary["eval_set"] == "labelled"
    assert summary["gate"] == {"passed": passed, "reason": "why", "min_auroc": 0.8, "candidate_auroc": 0.875,
                               "champion_version": "1", "champion_auroc": 0.9, "evidence": "synthetic",
                               "champion_below_minimum": False}
    assert summary["threshold"] == {"value": 1.5, "rule": "normal_prediction_bound", "expected_false_alarm_rate": 0.02}
    assert summary["training"] == {"size": job.config.size, "steps": job.config.finetune.steps,
                                   "pool_views": job.config.pool_views, "backbone": job.config.backbone,
                                   "device": "cpu"}
    json.dumps(summary)


def test_a_failed_gate_says_which_champion_stays_and_the_version_is_tagged_for_finding_it_again():
    decision = registry.GateDecision(False, "too low", 0.8, 0.5, "labelled")
    assert gate_failed_message("5", decision, {CHAMPION: "1"}) == \
        f"version 5 failed the gate (too low); {CHAMPION} stays v1"
    assert gate_failed_message("1", decision, {}).endswith(f"{CHAMPION} stays unset")
    job = _job()
    assert version_tags(job, _record(job)) == {
        "content_sha256": "c" * 64, "config_sha256": "d" * 64, "method": "default", "seed": "3",
        "upload_id": U_GOOD, "eval_set": "labelled", "k": "2", "benchmark_auroc": "0.875000",
        "labels_sha256": NO_LABELS, "labels_good": "0", "labels_defect": "0"}
