"""Registry side on embedded MLflow (SQLite in tmp): the gate's rules, the no-pickle pyfunc model,
verification, promotion with champion/previous, download_model and the idempotency lookup.

One tiny real model is fitted for the module (pretrained features, k=2, 64 px) and logged twice,
so two versions exist without a second fit.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flows.mlops import registry, tracking
from flows.mlops.registry import CANDIDATE, CHAMPION, PREVIOUS, RegistryError, WrittenModel, gate_decision
from flows.mlops.run_report import GalleryItem
from flows.pyfunc import LOADER_MODULE, artifact_problem, encode_png, log_pyfunc_model, requirements, served_code
from flows.settings import config_sha256, load_settings, training_config
from fsad_core.data import load_category
from fsad_core.detector import Detector
from fsad_core.evidence import LABELLED, RESAMPLES, SYNTHETIC, Evidence, weighted_auroc
from fsad_core.metrics import image_auroc
from fsad_core.synthetic import make_category
from tests.tiny_training import TINY_TRAINING

PRODUCT = "regtest"
CLEARED = ("FSAD_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FSAD_TRAIN_OVERRIDES", "FSAD_GATE_MIN_AUROC",
           "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("FSAD_HOME", str(tmp_path_factory.mktemp("fsad-home")))
        s = load_settings()
        tracking.configure(s)
        yield s


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = make_category(tmp_path_factory.mktemp("data") / "washer", kind="object", n_train=2, n_test_good=4,
                         n_test_defect=4, size=96, seed=5)
    cat = load_category(root)
    config = training_config("pretrained", 0, TINY_TRAINING)
    detector, report = Detector.fit([s.image() for s in cat.train], config, device="cpu")
    images = [s.image() for s in cat.test]
    labels = [s.label for s in cat.test]
    return detector, report, config, images, labels, [s.path for s in cat.test]


def log(settings, fitted, upload_id: str, content: str, overlays: list[GalleryItem] | None = None
        ) -> tracking.LoggedRun:
    detector, report, config, images, labels, _ = fitted
    scores = detector.score(images).scores
    record = tracking.TrainingRecord(
        product=PRODUCT, upload_id=upload_id, content_sha256=content, method="pretrained", config=config,
        config_sha256=config_sha256(config), k=2, eval_set="labelled",
        metrics={"benchmark_auroc": image_auroc(labels, scores)}, history=report.history,
        threshold=detector.threshold, validation_json='{"success": true}\n', fit_report=report.to_dict(),
        roc_labels=labels, roc_scores=scores.tolist(),
        overlays=overlays or [GalleryItem("training image", "first", 0.0, images[0], np.zeros(images[0].shape[:2]))],
        example_image=images[0])
    return tracking.log_training_run(record, detector, settings)


@pytest.fixture(scope="module")
def versions(settings, fitted):
    """Two registered versions of the same real model (logged twice)."""
    _, _, config, _, _, _ = fitted
    out = []
    for i, content in enumerate(["a" * 64, "b" * 64]):
        logged = log(settings, fitted, f"20260101T00000{i}Z-cafe0{i}", content)
        tags = {"content_sha256": content, "config_sha256": config_sha256(config)}
        out.append((logged, str(registry.register(PRODUCT, logged.model_uri, logged.run_id, tags).version)))
    return out


# ---- the gate's rules (no I/O) ------------------------------------------------------------------

def _evidence(auroc: float, kind: str = LABELLED, spread: float = 0.0, missed: float | None = None) -> Evidence:
    """Evidence whose paired resamples lie evenly within ``spread`` of the AUROC (in one order)."""
    resampled = auroc + np.linspace(-spread, spread, RESAMPLES)
    return Evidence(kind, auroc, auroc - 0.05, min(1.0, auroc + 0.05), 20, 10 if kind == LABELLED else 3, resampled,
                    missed)


@pytest.mark.parametrize("candidate, champ, champion, allow, retrained, passed, phrase", [
    # The minimum guards the first champion, on any evidence.
    (_evidence(0.95, SYNTHETIC), None, None, False, False, True, "no champion yet"),
    (_evidence(0.85), None, None, False, False, False, "below the minimum"),
    # Labelled evidence both were scored on decides between them, whatever the minimum: another
    # method must be credibly better (above the champion in 90 % of the paired resamples) ...
    (_evidence(0.95), "3", _evidence(0.97), False, False, False, "not credibly better than champion v3"),
    (_evidence(0.97), "3", _evidence(0.97), False, False, False, "above it in 50% of the paired resamples"),
    (_evidence(0.98, spread=0.04), "3", _evidence(0.97), False, False, False, "above it in 62% of the paired"),
    (_evidence(0.99, spread=0.01), "3", _evidence(0.97), False, False, True, "better than champion v3"),
    (_evidence(0.85), "3", _evidence(0.80), False, False, True, "champion v3 is below the minimum"),
    # ... and let no more of the benchmark's defects pass at its own threshold ...
    (_evidence(0.99, spread=0.01, missed=0.6), "3", _evidence(0.97, missed=0.5), False, False, False,
     "lets pass 60% of the benchmark's defects against the champion's 50%"),
    (_evidence(0.99, spread=0.01, missed=0.5), "3", _evidence(0.97, missed=0.5), False, False, True, "better than"),
    # ... the champion's method and upload trained again with newer labels at least as likely above it as below.
    (_evidence(0.98, spread=0.04), "3", _evidence(0.97), False, True, True, "50% needed for its own model"),
    (_evidence(0.97), "3", _evidence(0.97), False, True, True, "above it in 50% of the paired resamples"),
    (_evidence(0.98, missed=0.6), "3", _evidence(0.97, missed=0.5), False, True, True, "50% needed for its own"),
    (_evidence(0.96, spread=0.04), "3", _evidence(0.97), False, True, False, "more often below than above"),
    # Evidence that cannot compare them keeps the champion, unless the product's settings allow it.
    (_evidence(0.99, SYNTHETIC), "3", None, False, True, False, "cannot be compared with champion v3"),
    (_evidence(0.99, SYNTHETIC), "3", _evidence(0.9, SYNTHETIC), False, False, False, "cannot be compared"),
    (_evidence(0.95, SYNTHETIC), "3", None, True, False, True, "not compared (the product's settings allow it)"),
    (_evidence(0.85, SYNTHETIC), "3", None, True, False, False, "below the minimum"),
    (None, None, None, False, False, False, "undefined"),
])
def test_gate_policy(candidate, champ, champion, allow, retrained, passed, phrase):
    d = gate_decision(candidate, 0.9, "labelled", champ, champion, allow, retrained)
    assert d.passed is passed and phrase in d.reason
    tags = d.tags()
    assert tags["gate.verdict"] == ("passed" if passed else "failed")
    assert tags["gate.champion_version"] == (champ or "none") and tags["gate.reason"] == d.reason
    assert d.champion_below_minimum is (champion is not None and champion.auroc < 0.9)
    if candidate is not None:
        assert f"{candidate.n_normal} normal and {candidate.n_defect} defective, {candidate.kind}" in d.reason
        assert tags["gate.evidence"] == candidate.kind
        assert tags["gate.candidate_missed"] == ("n/a" if candidate.missed is None else f"{candidate.missed:.6f}")


# ---- the pyfunc model -----------------------------------------------------------------------------

def test_logged_model_is_a_no_pickle_pyfunc_that_scores_like_the_detector(settings, fitted, versions, tmp_path):
    detector, _, _, images, _, paths = fitted
    logged, _ = versions[0]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.model_uri, dst_path=str(tmp_path)))
    names = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "config.json", "network.safetensors", "scoring.safetensors"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".pickle")) or "cloudpickle" in n]
    assert f"loader_module: {LOADER_MODULE}" in (local / "MLmodel").read_text()
    model = mlflow.pyfunc.load_model(logged.model_uri)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    assert artifact_problem(local) is None  # what the pipeline writes passes its own check
    out = model.predict(pd.DataFrame({"image": [encode_png(images[0]), base64.b64encode(paths[1].read_bytes())
                                                .decode("ascii")]}))
    expected = detector.score(images[:2])
    np.testing.assert_allclose(out["score"].to_numpy(dtype=float), expected.scores, rtol=1e-5, atol=1e-5)
    assert out["is_anomaly"].tolist() == expected.is_anomaly.tolist() and out["error"].tolist() == ["", ""]
    assert out["threshold"].tolist() == [0.5] * 2 and out["map_png"].tolist() == ["", ""]
    assert out["model_name"].tolist() == [registry.model_name(PRODUCT)] * 2
    assert out["model_version"].tolist() == [versions[0][1]] * 2  # asked of the registry by the run's id
    bad = model.predict(pd.DataFrame({"image": [base64.b64encode(b"not an image").decode() + "!"]}))
    assert bad["error"].tolist() == ["row 0: not base64 image bytes"] and bool(bad["is_anomaly"].iloc[0])
    run_artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(logged.run_id)}
    assert {"validation.json", "threshold.json", "fit_report.json", "plots"} <= run_artifacts


def test_eval_images_with_names_as_long_as_a_store_allows_are_logged_with_short_overlay_names(settings, fitted):
    """An eval image named with 237 bytes (an upload accepts up to 255) is logged, its overlay under
    a name cut short and told apart from its neighbour's by a digest."""
    detector, _, _, images, _, _ = fitted
    long_names = ["d" * 233 + ".png", "d" * 232 + "e.png"]
    items = [GalleryItem("worst defect", name, 1.0, images[0], np.zeros(images[0].shape[:2])) for name in long_names]
    files = [tracking.overlay_filename(item) for item in items]
    assert len(set(files)) == 2 and all(len(f.encode()) <= 120 for f in files)
    logged = log(settings, fitted, "20260101T000011Z-long00", "e" * 64, overlays=items)
    shown = {f.path for f in mlflow.MlflowClient().list_artifacts(logged.run_id, "plots")}
    assert {f"plots/{f}" for f in files} <= shown


# ---- versions, verification, promotion ----------------------------------------------------------

def test_register_verify_promote_moves_champion_and_previous(settings, fitted, versions):
    detector, _, _, images, labels, _ = fitted
    (_, v1), (_, v2) = versions
    assert registry.aliases(PRODUCT)[CANDIDATE] == v2
    with pytest.raises(RegistryError, match="not verified"):
        registry.promote(PRODUCT, v1)
    for logged, version in versions:
        registry.record_gate(PRODUCT, version, gate_decision(_evidence(1.0), 0.9, "labelled"))
        check = registry.verify(PRODUCT, version, WrittenModel.of(detector, images[0], logged.model_files))
        assert check.ok, check.reason
        assert registry.version_tags(PRODUCT, version)["verified"] == "true"
    assert registry.promote(PRODUCT, v1) == {CANDIDATE: v2, CHAMPION: v1}
    champion = registry.champion_view(PRODUCT, images, labels, device="cpu", settings=settings)
    scores = detector.score(images).scores
    assert champion.version == v1 and champion.evidence.auroc == pytest.approx(image_auroc(labels, scores))
    assert champion.tags["verified"] == "true" and champion.evidence.missed is not None
    weights = [1.0 + 9.0 * (i % 2) for i in range(len(labels))]  # as the candidate's benchmark counts them
    weighted = registry.champion_view(PRODUCT, images, labels, weights, device="cpu", settings=settings).evidence
    assert weighted.auroc == pytest.approx(weighted_auroc(labels, scores, weights))
    unscored = registry.champion_view(PRODUCT, None, None, settings=settings)
    assert unscored.version == v1 and unscored.evidence is None
    assert registry.promote(PRODUCT, v2) == {CANDIDATE: v2, CHAMPION: v2, PREVIOUS: v1}


@pytest.mark.parametrize("differs, reason", [
    ({"score": 1e6}, "scores"), ({"is_anomaly": None}, "decides the smoke image"), ({"threshold": 1e308}, "decides"),
])
def test_a_version_that_does_not_reproduce_its_score_or_decision_is_never_champion(settings, fitted, versions,
                                                                                 differs, reason):
    detector, _, _, images, _, _ = fitted
    logged = log(settings, fitted, "20260101T000009Z-bad000", "c" * 64)
    version = str(registry.register(PRODUCT, logged.model_uri, logged.run_id, {}).version)
    registry.record_gate(PRODUCT, version, gate_decision(_evidence(1.0), 0.9, "labelled"))
    written = WrittenModel.of(detector, images[0], logged.model_files)
    if differs.get("is_anomaly", 0) is None:
        differs = {"is_anomaly": not written.is_anomaly}
    check = registry.verify(PRODUCT, version, dataclasses.replace(written, **differs))
    assert not check.ok and reason in check.reason and "in memory" in check.reason, check.reason
    assert registry.version_tags(PRODUCT, version)["verified"] == "false"
    before = registry.alias_version(PRODUCT, CHAMPION)
    with pytest.raises(RegistryError, match="not verified"):
        registry.promote(PRODUCT, version)
    assert registry.alias_version(PRODUCT, CHAMPION) == before


def test_register_is_safe_to_retry_for_the_same_run(settings, versions):
    logged, version = versions[0]
    assert str(registry.register(PRODUCT, logged.model_uri, logged.run_id, {}).version) == version


def test_find_trained_version_matches_content_and_configuration(settings, fitted, versions):
    _, _, config, _, _, _ = fitted
    v2 = versions[1][1]
    assert str(registry.find_trained_version(PRODUCT, "b" * 64, config_sha256(config)).version) == v2
    assert registry.find_trained_version(PRODUCT, "b" * 64, "0" * 64) is None
    assert registry.find_trained_version("no-such-product", "a" * 64, config_sha256(config)) is None


def test_the_artifact_carries_its_code_and_requirements_that_name_only_what_an_index_has(versions, tmp_path):
    """Served where fsad is not installed: the code is inside, the requirements pin third-party
    distributions only, and every module the code imports is provided by one of them."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=versions[0][0].model_uri, dst_path=str(tmp_path)))
    assert {f"code/{rel}": data for rel, data in served_code().items()} == {
        p.relative_to(local).as_posix(): p.read_bytes() for p in (local / "code").rglob("*") if p.is_file()}
    pinned = {line.split("==")[0].lower() for line in (local / "requirements.txt").read_text().split()}
    assert "fsad" not in pinned and {"torch", "timm", "safetensors", "pillow", "matplotlib", "mlflow"} <= pinned
    with pytest.raises(RuntimeError, match="'not_a_module_anywhere', which no installed distribution"):
        requirements({"x.py": b"import not_a_module_anywhere\n"})


def test_a_changed_byte_in_the_bundled_code_is_refused(versions, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=versions[0][0].model_uri, dst_path=str(tmp_path)))
    source = local / "code" / "fsad_core" / "detector.py"
    source.write_bytes(source.read_bytes().replace(b"def score(", b"def score (", 1))
    assert artifact_problem(local) == "bundled code is not this fsad's own: code/fsad_core/detector.py"
    assert artifact_problem(local, own_code=False) is None  # another fsad version's model still scores here
    source.unlink()
    assert artifact_problem(local) == "bundled code is not this fsad's own: code/fsad_core/detector.py"


def test_served_answers_carry_maps_on_request(versions, fitted):
    detector, _, _, images, _, _ = fitted
    model = mlflow.pyfunc.load_model(versions[0][0].model_uri)
    out = model.predict(pd.DataFrame({"image": [encode_png(images[0]), "not base64!"]}), params={"maps": True})
    picture = Image.open(io.BytesIO(base64.b64decode(out["map_png"].iloc[0])))
    assert picture.size[1] == images[0].shape[0] and picture.size[0] > images[0].shape[1]  # image + colour bar
    assert out["map_png"].iloc[1] == "" and out["error"].iloc[1] == "row 1: not base64 image bytes"


def test_download_model_resolves_aliases_and_versions_into_a_loadable_folder(settings, fitted, versions):
    detector, _, _, images, _, _ = fitted
    folder = registry.download_model(f"models:/{registry.model_name(PRODUCT)}@{CHAMPION}", settings=settings)
    assert folder.name == "detector" and (folder / "config.json").is_file()
    assert folder.parent.parent == (settings.home / "models" / registry.registry_key() / registry.model_name(PRODUCT)
                                    / versions[1][1])
    np.testing.assert_allclose(Detector.load(folder, device="cpu").score(images[:2]).scores,
                               detector.score(images[:2]).scores, rtol=1e-5, atol=1e-5)
    again = registry.download_model(f"models:/{registry.model_name(PRODUCT)}/{versions[1][1]}", settings=settings)
    assert again == folder
    for bad in ("fsad-regtest@champion", f"models:/{registry.model_name(PRODUCT)}@nope", "models:/fsad-none/1"):
        with pytest.raises(RegistryError):
            registry.download_model(bad, settings=settings)


def test_downloads_from_two_registries_with_the_same_name_and_version_are_kept_apart(settings, fitted, tmp_path):
    """Scoring against another registry whose version has the same name and number uses its own model."""
    detector = fitted[0]
    folders = []
    try:
        for i, raised in enumerate((detector.threshold.value, detector.threshold.value + 1.0)):
            other = dataclasses.replace(settings, tracking_uri=f"sqlite:///{tmp_path}/other{i}.db",
                                        artifact_root=tmp_path / f"artifacts{i}")
            tracking.configure(other)
            with mlflow.start_run(experiment_id=tracking.ensure_experiment("twin", other)):
                model = detector.with_threshold(dataclasses.replace(detector.threshold, value=raised))
                info = log_pyfunc_model(model.save(tmp_path / f"m{i}" / "detector"), fitted[3][0], "fsad-twin")
            mlflow.register_model(info.model_uri, "fsad-twin")
            folders.append(registry.download_model("models:/fsad-twin/1", settings=other))
    finally:
        tracking.configure(settings)
    assert folders[0] != folders[1]
    assert [Detector.load(f, device="cpu").threshold.value for f in folders] == [
        detector.threshold.value, detector.threshold.value + 1.0]


# ---- faults around promotion (last: they leave extra versions behind) ----------------------------

def _perturb_weights(weights: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.ndim == 4 else v
               for k, v in load_file(str(weights)).items()}, str(weights))


def _truncate(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:1000])


def _raise_threshold(weights: Path) -> None:
    """The attack of a threshold no defect reaches: config.json edited beside the weights."""
    config = weights.parent / "config.json"
    text = json.loads(config.read_text())
    text["threshold"]["value"] = 1e308
    config.write_text(json.dumps(text, indent=2, sort_keys=True))


@pytest.mark.parametrize("damage, reason", [(_perturb_weights, "differ from the ones the pipeline wrote: network"),
                                            (_truncate, "differ from the ones the pipeline wrote: network"),
                                            (_raise_threshold, "differ from the ones the pipeline wrote: config.json")])
def test_an_artifact_changed_after_logging_fails_verification_and_is_never_champion(settings, fitted, versions,
                                                                                   damage, reason):
    detector, _, _, images, _, _ = fitted
    logged = log(settings, fitted, "20260101T000010Z-tamper", "d" * 64)
    version = str(registry.register(PRODUCT, logged.model_uri, logged.run_id, {}).version)
    registry.record_gate(PRODUCT, version, gate_decision(_evidence(1.0), 0.9, "labelled"))
    stored = mlflow.get_logged_model(logged.model_uri.removeprefix("models:/")).artifact_location
    [weights] = Path(stored.removeprefix("file://")).rglob("network.safetensors")
    damage(weights)  # changed in the store after logging, before verification

    before = registry.aliases(PRODUCT)
    check = registry.verify(PRODUCT, version, WrittenModel.of(detector, images[0], logged.model_files))
    assert not check.ok and reason in check.reason, check.reason
    assert registry.version_tags(PRODUCT, version)["verified"] == "false"
    with pytest.raises(RegistryError, match="not verified"):
        registry.promote(PRODUCT, version)
    assert registry.aliases(PRODUCT) == {**before, CANDIDATE: version}


def test_a_failure_while_moving_aliases_never_leaves_champion_on_an_unverified_version(settings, fitted, versions,
                                                                                      monkeypatch):
    """``previous`` moves before ``champion``: MLflow failing at either alias leaves ``champion`` on
    the former, verified version (failing at ``previous`` pins the order), a retry completes the
    move, and a version that is not verified never moves any alias."""
    (logged, v1), (_, v2) = versions
    assert registry.alias_version(PRODUCT, CHAMPION) == v2
    before = registry.aliases(PRODUCT)
    real = mlflow.MlflowClient.set_registered_model_alias

    def server_gone_at(alias: str):
        def set_alias(self, name, alias_, version):
            if alias_ == alias:
                raise mlflow.exceptions.MlflowException("connection refused")
            return real(self, name, alias_, version)
        return set_alias

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", server_gone_at(PREVIOUS))
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry.promote(PRODUCT, v1)
    assert registry.aliases(PRODUCT) == before  # nothing moved: champion is not set first
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", server_gone_at(CHAMPION))
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry.promote(PRODUCT, v1)
    assert registry.aliases(PRODUCT) == {**before, PREVIOUS: v2}
    monkeypatch.undo()
    assert registry.promote(PRODUCT, v1)[CHAMPION] == v1  # the retry completes the move
    assert registry.version_tags(PRODUCT, v1)["verified"] == "true"

    unverified = str(mlflow.register_model(logged.model_uri, registry.model_name(PRODUCT)).version)
    registry.record_gate(PRODUCT, unverified, gate_decision(_evidence(1.0), 0.9, "labelled"))
    mlflow.MlflowClient().set_model_version_tag(registry.model_name(PRODUCT), unverified, "verified", "false")
    moved = registry.aliases(PRODUCT)
    with pytest.raises(RegistryError, match="not verified"):
        registry.promote(PRODUCT, unverified)
    assert registry.aliases(PRODUCT) == moved and moved[CHAMPION] == v1


def test_the_gates_latest_labelled_view_of_a_version_is_its_belief():
    def gated(version: str, candidate: Evidence, champion_version: str | None = None,
              champion: Evidence | None = None) -> registry.VersionRecord:
        tags = gate_decision(candidate, 0.9, "labelled", champion_version, champion).tags()
        return registry.VersionRecord(version, 0, "run", tags)

    first = gated("1", _evidence(0.95, SYNTHETIC))
    assert registry.belief([first], "1") == registry.Belief(SYNTHETIC, 0.95, (0.9, 1.0))
    unlabelled = gated("2", _evidence(0.99, SYNTHETIC), "1", None)
    judged = gated("3", _evidence(0.97), "1", _evidence(0.88))
    later = gated("4", _evidence(0.90, SYNTHETIC), "1", None)
    # The newest verdict that scored version 1 on labelled evidence, however old, and never its own synthetic one.
    assert registry.belief([first, unlabelled, judged, later], "1") == registry.Belief(LABELLED, 0.88, (0.83, 0.93))
    assert registry.belief([first, judged], "3") == registry.Belief(LABELLED, 0.97, (0.92, 1.0))
    assert registry.belief([first], "7") == registry.Belief(None, None, None)
