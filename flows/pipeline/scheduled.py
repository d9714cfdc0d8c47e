"""Scheduled retraining: retrain every product whose newest complete upload the champion has not seen,
or whose training configuration changed since its champion was fitted.

The event trigger (retrain-on-upload) reacts to each upload as it arrives; this nightly sweep
(deployment ``retrain-scheduled``) catches what it missed: events lost while the server was down,
uploads from before the sensor ran, runs that crashed. It plans every product first; then, against
a Prefect server, each due product becomes a run of its own of the ``retrain-on-upload`` deployment,
which any worker of the pool, on any machine, takes; the sweep waits for them all. Without a server
(the embedded API) or that deployment, products are retrained here, one after another. Either way
one failing product does not stop the others; the sweep fails at the end, naming them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from prefect import flow, get_run_logger, task

from flows.mlops import registry, tracking
from flows.pipeline.retrain import retrain_flow
from flows.pipeline.retries import IO_RETRIES
from flows.pipeline.runners import prefect_api_configured
from flows.pipeline.summary import RetrainSummary
from flows.settings import (
    Settings,
    config_sha256,
    load_settings,
    loop_settings,
    product_overrides,
    training_config,
)
from flows.store.labels import LabelSnapshot, current_labels
from flows.store.storage import (
    ObjectNotFound,
    latest_complete_upload,
    list_products,
    open_store,
    stale_incomplete_uploads,
    validation_key,
)

STALE_UPLOAD_S = 24 * 3600  # an upload without its manifest this long is reported (never deleted)


@dataclass(frozen=True)
class Plan:
    product: str
    upload_id: str | None  # the upload to train on; None when the product is not due
    reason: str
    stale_uploads: tuple[str, ...] = ()  # uploads interrupted before their manifest, long ago


def plan_for(product: str, latest_upload: str | None, rejected: bool, trained_version: str | None,
             champion: str | None, champion_upload: str | None, champion_config: str | None = None,
             config_hashes: tuple[str, ...] | None = None, champion_labels: str | None = None,
             labels_hash: str | None = None) -> Plan:
    """Whether ``product`` is due (no I/O). Upload ids sort by time, so a larger id is a newer upload.
    ``trained_version`` is a version the pipeline trained on that very upload under this
    configuration (its own tags say so, never a manifest: a manifest may name another upload's
    content). A champion fitted under another configuration (the product's settings or a default
    changed), or on other labels than today's, is retrained once on its upload; the gate then
    decides between the two."""
    def skip(reason: str) -> Plan:
        return Plan(product, None, reason)

    if latest_upload is None:
        return skip("no complete upload")
    if rejected:
        return skip(f"latest upload {latest_upload} was rejected by validation (quarantined)")
    if trained_version is not None:
        return skip(f"latest upload {latest_upload} already trained as version {trained_version} "
                    f"(same configuration)")
    if champion is None:
        return Plan(product, latest_upload, "no champion yet")
    if champion_upload is None or latest_upload > champion_upload:
        return Plan(product, latest_upload, f"upload {latest_upload} is newer than champion v{champion}'s "
                                            f"upload {champion_upload or 'unknown'}")
    if champion_config is not None and config_hashes is not None and champion_config not in config_hashes:
        return Plan(product, latest_upload, f"the training configuration changed since champion v{champion} "
                                            f"(config {champion_config[:12]} is none of the candidates')")
    if champion_labels is not None and labels_hash is not None and champion_labels != labels_hash:
        return Plan(product, latest_upload, f"the labels changed since champion v{champion} was trained")
    return skip(f"champion v{champion} was trained on the latest upload {champion_upload}")


@task(**IO_RETRIES)  # storage or registry down: retried; bad product settings: not
def plan_product(settings: Settings, product: str, method: str | None, seed: int) -> Plan:
    """Read the facts ``plan_for`` needs from storage and the MLflow registry. The configurations
    are the product's own (its training settings over FSAD_TRAIN_OVERRIDES, for ``method`` or each
    of its candidate methods): changing them retrains it."""
    store = open_store(settings.storage_url)
    overrides, source = product_overrides(settings, store, product)
    loop = loop_settings(overrides, source)
    config_hashes = tuple(config_sha256(training_config(name, seed, overrides, source), loop)
                          for name in loop.methods(method))
    stale = tuple(u.upload_id for u in stale_incomplete_uploads(store, product, STALE_UPLOAD_S))
    latest = latest_complete_upload(store, product)
    if latest is None:
        return replace(plan_for(product, None, False, None, None, None), stale_uploads=stale)
    try:
        rejected = store.get_json(validation_key(product, latest.upload_id)).get("success") is False
    except ObjectNotFound:
        rejected = False
    tracking.configure(settings)
    labels = LabelSnapshot.of(current_labels(store, product)).digest or registry.NO_LABELS
    trained = next((v for h in config_hashes if (v := registry.find_upload_version(product, latest.upload_id, h,
                                                                                    labels)) is not None), None)
    champion = registry.alias_version(product, registry.CHAMPION)
    tags = registry.version_tags(product, champion) if champion else {}
    plan = plan_for(product, latest.upload_id, rejected, str(trained.version) if trained is not None else None,
                    champion, tags.get("upload_id"), tags.get("config_sha256"), config_hashes,
                    tags.get("labels_sha256", registry.NO_LABELS), labels)
    return replace(plan, stale_uploads=stale)


RETRAIN_DEPLOYMENT = "retrain/retrain-on-upload"
POLL_S = 5.0
CHILD_WAIT_S = 12 * 3600  # a child run not finished by then is reported failed (no worker took it, or it hangs)


@dataclass(frozen=True)
class Outcome:
    status: str            # the retraining summary's status, or "completed" / "failed"
    message: str = ""


def retrain_here(plans: list[Plan], method: str | None, seed: int) -> dict[str, Outcome]:
    """Each product's retraining as a subflow of this run, one after another."""
    outcomes = {}
    for plan in plans:
        state = retrain_flow(plan.product, plan.upload_id, method, seed, return_state=True)
        outcomes[plan.product] = (Outcome(RetrainSummary.from_dict(state.result()).status) if state.is_completed()
                                  else Outcome("failed", f"upload {plan.upload_id}: {state.message}"))
    return outcomes


def retrain_on_pool(plans: list[Plan], method: str | None, seed: int) -> dict[str, Outcome] | None:
    """Each product's retraining as a run of ``retrain-on-upload`` for the pool's workers, all
    started before any is waited for; None when the server has no such deployment."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    runs = {}
    for plan in plans:
        try:
            runs[plan.product] = run_deployment(
                RETRAIN_DEPLOYMENT, timeout=0, flow_run_name=f"retrain-{plan.product}",
                parameters={"product": plan.product, "upload_id": plan.upload_id, "method": method, "seed": seed})
        except ObjectNotFound:
            if runs:  # the deployment vanished midway: a failure, not a reason to train twice
                raise
            return None
    deadline = time.monotonic() + CHILD_WAIT_S
    return {product: _outcome(_finished(run.id, deadline)) for product, run in runs.items()}


def _finished(flow_run_id: Any, deadline: float) -> Any:
    """The child run once final, or as it stands at ``deadline`` (time.monotonic())."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        while not (run := client.read_flow_run(flow_run_id)).state.is_final() and time.monotonic() < deadline:
            time.sleep(POLL_S)
    return run


def _outcome(run: Any) -> Outcome:
    """A child run's outcome: its summary's status where its result can be read here (a result
    store this machine shares), else the state it ended in; unfinished, a failure."""
    if not run.state.is_final():
        return Outcome("failed", f"flow run {run.name} still {run.state.name} after {CHILD_WAIT_S / 3600:.0f} h "
                                 f"(is a worker of the pool free to take it?)")
    if not run.state.is_completed():
        return Outcome("failed", f"flow run {run.name}: {run.state.name}: {run.state.message}")
    try:
        return Outcome(RetrainSummary.from_dict(run.state.result()).status)
    except Exception:  # persisted on another machine's disk: the state still says it completed
        return Outcome("completed")


@flow(name="retrain-due", persist_result=True, result_serializer="json")
def retrain_due_flow(method: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Retrain each due product (see ``plan_for``); returns per product the plan and the retraining
    status. Raises at the end when the planning or retraining of any product failed."""
    logger = get_run_logger()
    settings = load_settings()
    for name in loop_settings(settings.train_overrides).methods(method):
        training_config(name, seed, settings.train_overrides)  # a bad method fails before any product
    store = open_store(settings.storage_url)
    results: dict[str, Any] = {}
    failed: list[str] = []
    due: list[Plan] = []
    for product in list_products(store):
        planned = plan_product(settings, product, method, seed, return_state=True)
        if not planned.is_completed():
            failed.append(f"{product} (planning: {planned.message})")
            continue
        plan: Plan = planned.result()
        logger.info("%s: %s", product, plan.reason)
        if plan.stale_uploads:
            logger.warning("%s: upload(s) %s have had no manifest.json for over %.0f h: finish them with `fsad "
                           "upload --resume UPLOAD_ID`, or delete them", product, ", ".join(plan.stale_uploads),
                           STALE_UPLOAD_S / 3600)
        results[product] = asdict(plan)
        if plan.upload_id is not None:
            due.append(plan)
    outcomes = (retrain_on_pool(due, method, seed) if due and prefect_api_configured() else None)
    if outcomes is None:
        outcomes = retrain_here(due, method, seed)
    for product, outcome in outcomes.items():
        results[product]["status"] = outcome.status
        logger.info("%s: %s %s", product, outcome.status, outcome.message)
        if outcome.status == "failed":
            failed.append(f"{product} ({outcome.message})")
    if failed:
        raise RuntimeError(f"retraining failed for {len(failed)} product(s): {'; '.join(failed)}")
    return results
