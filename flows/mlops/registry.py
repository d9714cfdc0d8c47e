"""The MLflow model registry side of the pipeline: versions, the gate, verification and aliases.

Registered model ``fsad-PRODUCT``. A new version gets alias ``candidate``. The gate passes when the
benchmark AUROC is at least the minimum for a first champion, and later credibly better than the
current champion's on the same labelled benchmark (the champion is downloaded and scores that set
itself; `gate_decision` holds the policy). Its inputs
and verdict are tags on the version. Only a version whose artifact was downloaded back, loaded and
found to be the one written (the same model files byte for byte, the same score and decision on a
smoke image; tag ``verified=true``) can become ``champion``; the former
champion then becomes ``previous``.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.mlops.names import CANDIDATE, CHAMPION, PREVIOUS, model_name
from flows.mlops.tracking import configure
from flows.pyfunc import (
    INPUT_COLUMN,
    artifact_problem,
    encode_png,
    load_served_model,
    model_file_digests,
    model_folder,
)
from flows.settings import Settings, load_settings
from fsad_core.detector import Detector
from fsad_core.evidence import (
    LABELLED,
    MIN_PER_CLASS,
    PROMOTION_CONFIDENCE,
    RETRAINING_CONFIDENCE,
    SYNTHETIC,
    Evidence,
    judge,
)

_SCORE_RTOL = 1e-5
_SCORE_ATOL = 1e-5


class RegistryError(RuntimeError):
    """A registry operation that must not go ahead (bad reference, unverified promotion, ...)."""


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    min_auroc: float
    candidate_auroc: float | None
    eval_set: str
    champion_version: str | None = None
    champion_auroc: float | None = None
    evidence: str = SYNTHETIC  # what the verdict stands on (`fsad_core.evidence`)
    candidate_interval: tuple[float, float] | None = None
    champion_below_minimum: bool = False  # flagged wherever the product's state is shown
    champion_interval: tuple[float, float] | None = None  # the champion's on the same benchmark
    candidate_missed: float | None = None  # share of the benchmark's defects (by weight) let pass at its threshold
    champion_missed: float | None = None

    def tags(self) -> dict[str, str]:
        def num(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.6f}"

        low, high = self.candidate_interval or (None, None)
        champion_low, champion_high = self.champion_interval or (None, None)
        return {"gate.verdict": "passed" if self.passed else "failed", "gate.reason": self.reason,
                "gate.min_auroc": num(self.min_auroc), "gate.candidate_auroc": num(self.candidate_auroc),
                "gate.eval_set": self.eval_set, "gate.champion_version": self.champion_version or "none",
                "gate.champion_auroc": num(self.champion_auroc), "gate.evidence": self.evidence,
                "gate.candidate_auroc_low": num(low), "gate.candidate_auroc_high": num(high),
                "gate.champion_auroc_low": num(champion_low), "gate.champion_auroc_high": num(champion_high),
                "gate.champion_below_minimum": str(self.champion_below_minimum).lower(),
                "gate.candidate_missed": num(self.candidate_missed), "gate.champion_missed": num(self.champion_missed)}


def tag_number(text: str | None) -> float | None:
    """The number a version's tag holds, as `GateDecision.tags` writes it; None for "n/a", a
    missing tag, or a value that is not a finite number."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class WrittenModel:
    """What the pipeline wrote and decided in memory, which a downloaded version must match: the
    model folder's files (name -> sha256, as logged) and the smoke image's score and decision."""

    files: dict[str, str]
    smoke_image: np.ndarray
    score: float
    is_anomaly: bool
    threshold: float

    @classmethod
    def of(cls, detector: Detector, smoke_image: np.ndarray, files: dict[str, str]) -> WrittenModel:
        result = detector.score([smoke_image])
        return cls(dict(files), smoke_image, float(result.scores[0]), bool(result.is_anomaly[0]), result.threshold)


@dataclass(frozen=True)
class Verification:
    ok: bool
    expected_score: float
    loaded_score: float
    reason: str


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def alias_version(product: str, alias: str) -> str | None:
    """The version an alias points at, None when the alias (or the model) does not exist."""
    return aliases(product).get(alias)


def deciding_alias(product: str) -> str | None:
    """The alias whose version decides the product's line: the champion; before there is one, the
    candidate, whose decisions only fill the review queue (shadow), so that a product whose first
    model missed the gate still gets the labels that may make a champion of a later one."""
    found = aliases(product)
    return next((alias for alias in (CHAMPION, CANDIDATE) if alias in found), None)


def aliases(product: str) -> dict[str, str]:
    """alias -> version of ``fsad-PRODUCT`` (empty when the model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return {a: str(v) for a, v in sorted(_client().get_registered_model(model_name(product)).aliases.items())}
    except MlflowException as exc:
        if _is_missing(exc):
            return {}
        raise


def version_tags(product: str, version: str) -> dict[str, str]:
    return dict(_client().get_model_version(model_name(product), version).tags)


@dataclass(frozen=True)
class VersionRecord:
    """A registered version as the registry keeps it: when, from which run, and its tags."""

    version: str
    created_ms: int
    run_id: str
    tags: dict[str, str]


def versions(product: str) -> list[VersionRecord]:
    """Every version of ``fsad-PRODUCT``, oldest first ([] before the first)."""
    found = _client().search_model_versions(f"name = '{model_name(product)}'")
    return sorted((VersionRecord(str(mv.version), int(mv.creation_timestamp or 0), mv.run_id or "", dict(mv.tags))
                   for mv in found), key=lambda v: int(v.version))


@dataclass(frozen=True)
class Belief:
    """What the gate last saw of a version: its benchmark AUROC, interval and the evidence's kind."""

    evidence: str | None
    auroc: float | None
    interval: tuple[float, float] | None


def belief(history: list[VersionRecord], version: str) -> Belief:
    """The gate's latest view of ``version``: the newest later verdict that scored it, as champion,
    on a labelled benchmark, else its own verdict's (`GateDecision.tags`)."""
    def seen(tags: dict[str, str], role: str) -> Belief:
        low, high = tag_number(tags.get(f"gate.{role}_auroc_low")), tag_number(tags.get(f"gate.{role}_auroc_high"))
        return Belief(tags.get("gate.evidence"), tag_number(tags.get(f"gate.{role}_auroc")),
                      None if low is None or high is None else (low, high))

    for record in sorted(history, key=lambda v: -int(v.version)):
        if record.version == version:
            return seen(record.tags, "candidate")
        if record.tags.get("gate.champion_version") == version and record.tags.get("gate.evidence") == LABELLED:
            return seen(record.tags, "champion")
    return Belief(None, None, None)


NO_LABELS = "none"  # the labels_sha256 tag of a version trained without labels (absent on older versions)


def find_trained_version(product: str, content_sha256: str, config_sha256: str,
                         labels_sha256: str = NO_LABELS) -> Any | None:
    """The earliest version trained on the same content and labels with the same configuration, if any."""
    return _earliest_version(product, labels_sha256, content_sha256=content_sha256, config_sha256=config_sha256)


def find_upload_version(product: str, upload_id: str, config_sha256: str, labels_sha256: str = NO_LABELS
                        ) -> Any | None:
    """The earliest version the pipeline trained on this upload and these labels with this
    configuration, if any (from the tags it wrote at registration)."""
    return _earliest_version(product, labels_sha256, upload_id=upload_id, config_sha256=config_sha256)


def _earliest_version(product: str, labels_sha256: str, **tags: str) -> Any | None:
    """The earliest version of ``fsad-PRODUCT`` carrying every one of ``tags`` and trained on the
    labels ``labels_sha256`` names."""
    where = " and ".join([f"name = '{model_name(product)}'", *(f"tags.{k} = '{v}'" for k, v in tags.items())])
    versions = [mv for mv in _client().search_model_versions(where)
                if mv.tags.get("labels_sha256", NO_LABELS) == labels_sha256]
    return min(versions, key=lambda mv: int(mv.version)) if versions else None


def register(product: str, model_uri: str, run_id: str, tags: dict[str, str]) -> Any:
    """A version of ``fsad-PRODUCT`` for the run's model with alias ``candidate``.

    Safe to retry: a version already created for this run is reused instead of duplicated.
    """
    import mlflow

    client, name = _client(), model_name(product)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    mv = existing[0] if existing else mlflow.register_model(model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CANDIDATE, str(mv.version))
    return mv


def gate_decision(candidate: Evidence | None, min_auroc: float, eval_set: str, champion_version: str | None = None,
                  champion: Evidence | None = None, allow_unproven: bool = False, retrained: bool = False
                  ) -> GateDecision:
    """The gate's verdict from its inputs (no I/O). The minimum AUROC guards a product's first
    champion. Once there is a champion, a candidate replaces it on the same labelled benchmark
    (`evidence.LABELLED`: at least 5 defects and 5 normals, both models scored on them), whatever
    the minimum: a candidate of another method when credibly better (above the champion in
    `PROMOTION_CONFIDENCE` of the paired resamples), the champion's own method and upload trained
    again with newer labels (``retrained``) when at least as likely above it as below
    (`RETRAINING_CONFIDENCE`), and another method only if it also lets no more of the benchmark's
    defects pass at its threshold; a champion below the minimum is flagged. On evidence that cannot
    compare the two (synthetic, or too few labels) the champion stays, unless the product's settings
    allow it (``allow_unproven``: then the minimum decides, as for a first champion)."""
    auroc = None if candidate is None else candidate.auroc
    below = champion is not None and champion.auroc < min_auroc

    def made(passed: bool, reason: str) -> GateDecision:
        return GateDecision(passed, reason, min_auroc, auroc, eval_set, champion_version,
                            None if champion is None else champion.auroc, SYNTHETIC if candidate is None else
                            candidate.kind, None if candidate is None else (candidate.low, candidate.high), below,
                            None if champion is None else (champion.low, champion.high),
                            None if candidate is None else candidate.missed,
                            None if champion is None else champion.missed)

    if candidate is None or not math.isfinite(candidate.auroc):
        return made(False, "benchmark AUROC undefined (the benchmark set lacks a class)")
    measured = (f"benchmark AUROC {auroc:.4f} (90 % interval {candidate.low:.3f}-{candidate.high:.3f}, "
                f"{candidate.n_normal} normal and {candidate.n_defect} defective, {candidate.kind})")
    comparable = champion is not None and candidate.kind == LABELLED
    if champion_version is None or (not comparable and allow_unproven):
        if auroc < min_auroc:
            return made(False, f"{measured} below the minimum {min_auroc:.4f}")
        first = "no champion yet" if champion_version is None else \
            f"champion v{champion_version} not compared (the product's settings allow it)"
        return made(True, f"{measured} >= minimum {min_auroc:.4f}; {first}")
    if not comparable:
        return made(False, f"{measured} cannot be compared with champion v{champion_version}: no labelled benchmark "
                           f"of at least {MIN_PER_CLASS} defects and {MIN_PER_CLASS} normals both were scored on; "
                           f"champion stays")
    flag = f"; champion v{champion_version} is below the minimum {min_auroc:.4f}" if below else ""
    share = candidate.share_above(champion)
    versus = (f"champion v{champion_version} ({champion.auroc:.4f}): above it in {share:.0%} of the paired resamples "
              f"of the same labelled benchmark")
    if retrained:
        needed, failed, kind = RETRAINING_CONFIDENCE, "more often below than above", "its own model trained again"
    else:
        needed, failed, kind = PROMOTION_CONFIDENCE, "not credibly better than", "another method"
    if share < needed:
        return made(False, f"{measured} {failed} {versus}, {needed:.0%} needed for {kind}{flag}")
    if not retrained and candidate.misses_more(champion):
        return made(False, f"{measured} better than {versus}, but at its threshold it lets pass {candidate.missed:.0%} "
                           f"of the benchmark's defects against the champion's {champion.missed:.0%}{flag}")
    return made(True, f"{measured} better than {versus} ({needed:.0%} needed for {kind}){flag}")


@dataclass(frozen=True)
class ChampionView:
    """The champion as a retraining sees it: its version and tags, and its evidence on the run's
    labelled benchmark, which the candidate choice and the gate both compare with."""

    version: str | None
    tags: dict[str, str]
    evidence: Evidence | None

    def retraining(self, upload_id: str) -> str | None:
        """The champion's method where a candidate of it on ``upload_id`` is the champion trained
        again with newer labels (the gate's `RETRAINING_CONFIDENCE`); None otherwise."""
        return self.tags.get("method") if self.tags.get("upload_id") == upload_id else None


def champion_view(product: str, images: list[np.ndarray] | None, labels: list[int] | None,
                  weights: list[float] | None = None, device: str = "auto",
                  settings: Settings | None = None) -> ChampionView:
    """The champion, with its evidence on the given labelled set (each image counted by its weight,
    as the candidate's; None without a set to score it on)."""
    version = alias_version(product, CHAMPION)
    if version is None:
        return ChampionView(None, {}, None)
    tags = version_tags(product, version)
    if not images or labels is None:
        return ChampionView(version, tags, None)
    detector = Detector.load(download_model(f"models:/{model_name(product)}/{version}", settings=settings),
                             device=device)
    result = detector.score(images)
    return ChampionView(version, tags, judge(labels, result.scores, weights, flagged=result.is_anomaly))


def record_gate(product: str, version: str, decision: GateDecision) -> None:
    set_version_tags(product, version, decision.tags())


def verify(product: str, version: str, written: WrittenModel) -> Verification:
    """Download the version from the registry into a fresh folder and check everything that decides:
    it is an artifact this pipeline wrote (its own loader, bundled code byte for byte its own, no
    file it never writes), its model files (configuration and threshold included) are byte for byte
    the ones logged, and, loaded by the pipeline's own loader, it gives the smoke image the score,
    threshold and decision it had in memory; tag the outcome."""
    import mlflow

    name = model_name(product)
    with tempfile.TemporaryDirectory(prefix="fsad-verify-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        result = _check_and_score(local, written)
    client = _client()
    client.set_model_version_tag(name, version, "verified", "true" if result.ok else "false")
    client.set_model_version_tag(name, version, "verified.reason", result.reason)
    return result


def _check_and_score(local: Path, written: WrittenModel) -> Verification:
    def refused(reason: str, loaded: float = math.nan) -> Verification:
        return Verification(False, written.score, loaded, reason)

    problem = artifact_problem(local)
    if problem is None:  # an artifact the pipeline wrote: its model folder is where MLmodel says
        folder = model_folder(local)
        problem = _files_problem(folder, written.files)
    if problem is not None:
        return refused(problem)
    try:  # a damaged artifact is a verdict (not verified), not a crash that leaves no tag
        out = load_served_model(folder).predict(
            pd.DataFrame({INPUT_COLUMN: [encode_png(written.smoke_image)]}))
        if out["error"].iloc[0]:
            raise ValueError(out["error"].iloc[0])
    except Exception as exc:
        return refused(f"downloaded model does not load or score: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    loaded, threshold = float(out["score"].iloc[0]), float(out["threshold"].iloc[0])
    if not math.isclose(loaded, written.score, rel_tol=_SCORE_RTOL, abs_tol=_SCORE_ATOL):
        return refused(f"downloaded model scores {loaded:.6g}, in memory {written.score:.6g}", loaded)
    if threshold != written.threshold or bool(out["is_anomaly"].iloc[0]) != written.is_anomaly:
        return refused(f"downloaded model decides the smoke image {_decision(bool(out['is_anomaly'].iloc[0]))} "
                       f"at threshold {threshold:.6g}, in memory {_decision(written.is_anomaly)} at "
                       f"{written.threshold:.6g}", loaded)
    return Verification(True, written.score, loaded, "downloaded model is the one written: same files, score and "
                                                     "decision")


def _files_problem(folder: Path, expected: dict[str, str]) -> str | None:
    """Which model files differ from the digests the pipeline logged, or None when all match."""
    found = model_file_digests(folder)
    changed = sorted(name for name in expected.keys() | found.keys() if found.get(name) != expected.get(name))
    return f"model files differ from the ones the pipeline wrote: {', '.join(changed)}" if changed else None


def _decision(is_anomaly: bool) -> str:
    return "anomalous" if is_anomaly else "normal"


def promote(product: str, version: str) -> dict[str, str]:
    """Move ``champion`` to a verified, gate-passed version and ``previous`` to the former champion."""
    client, name = _client(), model_name(product)
    tags = client.get_model_version(name, version).tags
    if tags.get("verified") != "true":
        raise RegistryError(f"{name} v{version} is not verified (tag verified={tags.get('verified')!r}); "
                            f"not promoting it to {CHAMPION}")
    if tags.get("gate.verdict") != "passed":
        raise RegistryError(f"{name} v{version} did not pass the gate; not promoting it to {CHAMPION}")
    return move_champion(product, version)


def move_champion(product: str, version: str) -> dict[str, str]:
    """``previous`` to the champion, then ``champion`` to ``version``: a failure between the two
    leaves the champion where it was."""
    client, name = _client(), model_name(product)
    former = alias_version(product, CHAMPION)
    if former is not None and former != str(version):
        client.set_registered_model_alias(name, PREVIOUS, former)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return aliases(product)


def set_version_tags(product: str, version: str, tags: dict[str, str]) -> None:
    client, name = _client(), model_name(product)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def registered_model_tags(product: str) -> dict[str, str]:
    """The product's registered model's own tags; {} before its first version."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(_client().get_registered_model(model_name(product)).tags)
    except MlflowException as exc:
        if _is_missing(exc):
            return {}
        raise


def set_registered_model_tag(product: str, key: str, value: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        _client().set_registered_model_tag(model_name(product), key, value)
    except MlflowException as exc:
        if _is_missing(exc):
            raise RegistryError(f"{model_name(product)} has no registered version yet") from None
        raise


def _resolve(ref: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version)."""
    from mlflow.exceptions import MlflowException

    body = ref.removeprefix("models:/")
    if body == ref or not body:
        raise RegistryError(f"{ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, str(_client().get_model_version_by_alias(name, alias).version)
        name, _, version = body.partition("/")
        if not version.isdigit():
            raise RegistryError(f"{ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return name, str(_client().get_model_version(name, version).version)
    except MlflowException as exc:
        raise RegistryError(f"{ref}: not found in the registry at the tracking URI "
                            f"({exc.message.splitlines()[0]})") from None


def resolve_model(ref: str, settings: Settings | None = None) -> tuple[str, str]:
    """(name, version) a registry reference stands for now: an alias is read once, so a caller that
    then downloads ``models:/NAME/VERSION`` scores with the version it reports."""
    configure(settings or load_settings())
    return _resolve(ref)


def download_model(ref: str, dst: str | Path | None = None, settings: Settings | None = None) -> Path:
    """The model folder (config.json + safetensors) of a registry reference, downloaded once into
    ``dst`` (default ``FSAD_HOME/models/REGISTRY/NAME/VERSION``, REGISTRY a digest of the registry's
    URI: a version is immutable within one registry, not across them, so it is reused from there);
    RegistryError for an artifact the pipeline did not write."""
    import mlflow

    settings = settings or load_settings()
    configure(settings)
    name, version = _resolve(ref)
    target = Path(dst) if dst is not None else settings.home / "models" / registry_key() / name / version
    if not (target / "MLmodel").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(partial))
            _move_aside_remains(target)
            partial.rename(target)
        except OSError:  # a process beside this one (a Dask worker) renamed its download there first
            if not (target / "MLmodel").is_file():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    problem = artifact_problem(target, own_code=False)  # on every use: a model is only ever loaded our way
    if problem is not None:
        raise RegistryError(f"{ref} (v{version}): {problem}; not loading it")
    return model_folder(target)


def registry_key() -> str:
    """A short digest of the registry's URI, which names its downloads (credentials in it stay out of paths)."""
    import mlflow

    return hashlib.sha256(mlflow.get_registry_uri().encode()).hexdigest()[:16]


def _move_aside_remains(target: Path) -> None:
    """An incomplete earlier download at ``target`` renamed away (atomically) and removed; a
    complete one, perhaps just put there by another process, is left alone."""
    if target.exists() and not (target / "MLmodel").is_file():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
        target.rename(stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)


__all__ = ["CANDIDATE", "CHAMPION", "PREVIOUS", "ChampionView", "GateDecision", "RegistryError", "Verification",
           "VersionRecord", "WrittenModel", "alias_version", "aliases", "champion_view", "deciding_alias",
           "download_model", "gate_decision",
           "find_trained_version", "find_upload_version", "model_name", "resolve_model", "promote", "record_gate",
           "register", "tag_number", "verify", "version_tags", "versions"]
