"""prefect.yaml against the real local stack: `prefect --no-prompt deploy --all` creates the
deployments with their schedules and trigger, and the event path runs end to end on the stack's
process worker: an upload to S3 -> upload-sensor announces it -> the trigger starts retrain-on-upload
with product/upload_id from the event -> a registered model version. Then neither a second sensor
run nor the scheduled sweep trains it again. Last, the sweep fans four due products out as runs of
retrain-on-upload, side by side, the second of two process workers taking some.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import Deployment, FlowRun
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from flows.pipeline.scheduled import retrain_due_flow
from flows.pipeline.sensor import EVENT, announced_key, upload_sensor_flow
from flows.store.storage import open_store
from flows.store.upload import upload_folder, write_upload_folder
from fsad_core.data import load_category
from fsad_core.synthetic import make_category
from infra.config import TELEMETRY_OFF, WORK_POOL, free_port_env
from infra.stack import StackInfo, running
from tests.tiny_training import TINY_TRAINING

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = "washer"
NAMES = {"retrain-scheduled": "retrain-due/retrain-scheduled", "retrain-on-upload": "retrain/retrain-on-upload",
         "upload-sensor": "upload-sensor/upload-sensor", "benchmark": "benchmark/benchmark",
         "score-prefix": "score-prefix/score-prefix"}
T = TypeVar("T")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """The stack on free ports in a temporary home. Flow runs inherit the worker's environment, so the
    small training settings and a gate minimum of 0 (a tiny model must still become champion) are
    set before it starts; this process then uses the stack as a client."""
    home = tmp_path_factory.mktemp("fsad-home")
    env = {**free_port_env(), **TELEMETRY_OFF, "FSAD_HOME": str(home),
           "FSAD_TRAIN_OVERRIDES": json.dumps(TINY_TRAINING),
           "FSAD_GATE_MIN_AUROC": "0",
           # The stack's worker takes two runs at once (a sweep and one training), so that another
           # worker must take the rest of a fan-out; make bench-sweep sets 1.
           "FSAD_WORKER_LIMIT": os.environ.get("FSAD_WORKER_LIMIT", "2")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with running(home) as info:
            for key, value in info.env().items():
                mp.setenv(key, value)
            with temporary_settings(updates={PREFECT_API_URL: info.prefect_api_url,
                                             PREFECT_RESULTS_LOCAL_STORAGE_PATH: info.root / "prefect-results"}):
                yield info


@pytest.fixture(scope="module")
def client(stack: StackInfo) -> Iterator[SyncPrefectClient]:
    with get_client(sync_client=True) as c:
        yield c


@pytest.fixture(scope="module")
def deployments(stack: StackInfo, client: SyncPrefectClient,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Deployment]:
    """What a user runs: `prefect --no-prompt deploy --all` in the repository root."""
    env = {**os.environ, **stack.env(), **TELEMETRY_OFF,
           "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-cli"))}
    done = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"prefect deploy failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return {name: client.read_deployment_by_name(full) for name, full in NAMES.items()}


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, stack: StackInfo, every_s: float = 3.0) -> T:
    """Poll ``check`` until it returns something truthy; on timeout fail with the worker's log tail."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if time.monotonic() > deadline:
            log = (stack.root / "logs" / "prefect-worker.log").read_text(errors="replace")[-4000:]
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; worker log:\n{log}")
        time.sleep(every_s)
    return found


def retrain_runs(client: SyncPrefectClient, upload_id: str | None = None) -> list[FlowRun]:
    """Runs of the `retrain` flow (deployment or subflow) for PRODUCT, optionally for one upload."""
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])))
    return [r for r in runs if r.parameters.get("product") == PRODUCT
            and (upload_id is None or r.parameters.get("upload_id") == upload_id)]


def tiny_upload_folder(tmp: Path) -> Path:
    """A valid few-shot set in upload layout: 2 normal images, eval 2 good + 2 defect (96 px)."""
    category = load_category(make_category(tmp / "data" / PRODUCT, kind="object", n_train=2, n_test_good=2,
                                           n_test_defect=2, size=96, seed=5))
    return write_upload_folder(tmp / "upload", [s.path for s in category.train],
                               [s.path for s in category.test if s.label == 0],
                               [s.path for s in category.test if s.label == 1])


def test_deployments_from_prefect_yaml(deployments: dict[str, Deployment], client: SyncPrefectClient) -> None:
    for name, d in deployments.items():
        assert d.work_pool_name == WORK_POOL, name
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}], name

    [nightly] = deployments["retrain-scheduled"].schedules
    assert nightly.active and nightly.schedule.cron == "0 2 * * *" and nightly.schedule.timezone == "UTC"
    [sensor] = deployments["upload-sensor"].schedules
    assert sensor.active and sensor.schedule.interval == timedelta(seconds=60)
    assert deployments["retrain-on-upload"].schedules == [] and deployments["benchmark"].schedules == []
    assert deployments["benchmark"].parameters["methods"] == ["pretrained", "default"]
    assert deployments["score-prefix"].entrypoint == "flows/pipeline/score_prefix.py:score_prefix_flow"

    on_upload = deployments["retrain-on-upload"]
    [automation] = client.read_resource_related_automations(f"prefect.deployment.{on_upload.id}")
    trigger, [action] = automation.trigger, automation.actions
    assert automation.enabled and trigger.expect == {EVENT}
    assert trigger.match.model_dump()["prefect.resource.id"] == "fsad.upload.*"
    assert action.type == "run-deployment" and action.deployment_id == on_upload.id
    assert action.parameters == {"product": "{{ event.resource['fsad.product'] }}",
                                 "upload_id": "{{ event.resource['fsad.upload_id'] }}"}


def test_upload_is_announced_trained_once_and_not_retrained(
        stack: StackInfo, deployments: dict[str, Deployment], client: SyncPrefectClient, tmp_path: Path) -> None:
    store = open_store()
    uploaded = upload_folder(store, PRODUCT, tiny_upload_folder(tmp_path))
    # The sensor runs every minute anyway; one run now saves the wait. Either announces the upload.
    run_deployment(NAMES["upload-sensor"], timeout=0)

    [run] = wait_for("a retrain-on-upload run for the upload", lambda: retrain_runs(client, uploaded.upload_id),
                     300, stack)
    assert run.deployment_id == deployments["retrain-on-upload"].id
    assert run.parameters == {"product": PRODUCT, "upload_id": uploaded.upload_id}
    assert store.exists(announced_key(PRODUCT, uploaded.upload_id))

    def finished() -> FlowRun | None:
        current = client.read_flow_run(run.id)
        return current if current.state.is_final() else None

    final = wait_for("the retrain run to finish", finished, 900, stack)
    assert final.state.is_completed(), f"{final.state.type}: {final.state.message}"
    # Both URIs: a registry URI set globally by an earlier module (mlflow.set_registry_uri) would
    # otherwise win over the tracking URI given here, and this would read another registry.
    mlflow = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    versions = mlflow.search_model_versions(f"name = 'fsad-{PRODUCT}'")
    assert len(versions) == 1, [(v.version, v.run_id, v.tags) for v in versions]
    [version] = versions
    assert version.tags["upload_id"] == uploaded.upload_id
    assert version.tags["content_sha256"] == uploaded.content_sha256
    assert mlflow.get_registered_model(f"fsad-{PRODUCT}").aliases["champion"] == version.version

    # Announced once: another sensor run finds nothing new.
    assert asyncio.run(upload_sensor_flow()) == []
    # The nightly sweep sees the champion trained on the latest upload and trains nothing.
    sweep = run_deployment(NAMES["retrain-scheduled"], timeout=300)
    assert sweep.state.is_completed(), f"{sweep.state.type}: {sweep.state.message}"
    assert [r.id for r in retrain_runs(client)] == [run.id]
    assert len(mlflow.search_model_versions(f"name = 'fsad-{PRODUCT}'")) == 1


@contextmanager
def extra_worker(stack: StackInfo, tmp: Path, *limit: str) -> Iterator[str]:
    """Another process worker of the pool, as a second machine would run one."""
    name = f"fsad-worker-{tmp.name}"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **stack.env(), **TELEMETRY_OFF, "PREFECT_HOME": str(tmp / "prefect-worker")}
    with (tmp / "worker.log").open("wb") as log:
        worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                   WORK_POOL, "--type", "process", "--name", name, *limit], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with get_client(sync_client=True) as client:
                wait_for("the second worker's heartbeat", lambda: any(
                    w.name == name for w in client.read_workers_for_work_pool(WORK_POOL)), 120, stack)
            yield name
        finally:  # a worker slow to stop on a loaded machine is not what the tests are about
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)


@contextmanager
def only_the_sweep_trains(client: SyncPrefectClient, deployments: dict[str, Deployment]) -> Iterator[None]:
    """No sensor run and no trigger from an upload event meanwhile."""
    sensor = deployments["upload-sensor"].id
    [trigger] = client.read_resource_related_automations(f"prefect.deployment.{deployments['retrain-on-upload'].id}")
    client.pause_deployment(sensor)
    client.pause_automation(trigger.id)
    try:
        yield
    finally:
        client.resume_automation(trigger.id)
        client.resume_deployment(sensor)


def product_runs(client: SyncPrefectClient, products: list[str]) -> list[FlowRun]:
    return [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])))
            if r.parameters.get("product") in products]


def test_the_sweep_fans_due_products_out_to_the_pool_and_waits_for_them(
        stack: StackInfo, deployments: dict[str, Deployment], client: SyncPrefectClient, tmp_path: Path) -> None:
    store = open_store()
    products = [f"part-{i}" for i in range(4)]
    folder = tiny_upload_folder(tmp_path)
    with only_the_sweep_trains(client, deployments), extra_worker(stack, tmp_path / "worker-2"):
        for product in products:
            upload_folder(store, product, folder)
        sweep = run_deployment(NAMES["retrain-scheduled"], timeout=900)
    assert sweep.state.is_completed(), f"{sweep.state.type}: {sweep.state.message}"
    runs = product_runs(client, products)
    outcome = sweep.state.result()
    assert {p: outcome[p]["status"] for p in products} == {p: "promoted" for p in products}, \
        [(r.name, r.parameters, r.deployment_id, r.start_time) for r in runs]
    assert sorted(r.parameters["product"] for r in runs) == products  # each trained once
    assert {r.deployment_id for r in runs} == {deployments["retrain-on-upload"].id}
    assert all(r.state.is_completed() for r in runs)
    first_end = min(r.end_time for r in runs)
    assert sum(r.start_time < first_end for r in runs) >= 2  # they ran side by side, not one after another
    taken = (tmp_path / "worker-2" / "worker.log").read_text(errors="replace")
    assert sum(str(r.id) in taken for r in runs) >= 2, "the stack's worker has one slot for them: two workers took them"
    mlflow = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    for product in products:
        assert len(mlflow.search_model_versions(f"name = 'fsad-{product}'")) == 1


def timed_sweep(products: list[str], folder: Path, client: SyncPrefectClient) -> float:
    """Seconds of a sweep run in this process (it holds no worker slot) over ``products``' new uploads."""
    store = open_store()
    for product in products:
        upload_folder(store, product, folder)
    start = time.monotonic()
    outcome = retrain_due_flow()
    seconds = time.monotonic() - start
    assert {p: outcome[p]["status"] for p in products} == {p: "promoted" for p in products}
    assert sorted(r.parameters["product"] for r in product_runs(client, products)) == products
    return seconds


@pytest.mark.skipif(os.environ.get("FSAD_WORKER_LIMIT") != "1",
                    reason="a measurement: make bench-sweep (the stack's worker takes one run at a time)")
def test_sweep_on_two_workers_against_one(stack: StackInfo, deployments: dict[str, Deployment],
                                          client: SyncPrefectClient, tmp_path: Path) -> None:
    """The sweep's wall time for four due products with one worker, then two, each taking one
    training at a time; each product is trained once either way."""
    folder = tiny_upload_folder(tmp_path)
    with only_the_sweep_trains(client, deployments):
        one = timed_sweep([f"one-{i}" for i in range(4)], folder, client)
        with extra_worker(stack, tmp_path / "worker-2", "--limit", "1"):
            two = timed_sweep([f"two-{i}" for i in range(4)], folder, client)
    print(f"sweep of 4 products: one worker {one:.0f} s, two workers {two:.0f} s, ratio {two / one:.2f}")
