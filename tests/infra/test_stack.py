"""The local stack really works: S3 round trip on Swift, MLflow artifacts in S3, Prefect pool,
loopback-only listeners, private bucket, status/down/up. The last test restarts the stack."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from infra import stack as st
from infra.config import WORK_POOL, free_port_env
from infra.probes import http_post_json, http_status
from infra.s3client import make_s3_client

pytestmark = pytest.mark.integration


def _home(info: st.StackInfo) -> Path:
    assert info.root is not None
    return info.root.parent


def _s3(info: st.StackInfo):
    return make_s3_client(info.s3_endpoint, info.access_key, info.secret_key, info.region)


def _get_json(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1
    with opener.open(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_s3_roundtrip(stack: st.StackInfo) -> None:
    s3 = _s3(stack)
    prefix = f"test/{uuid.uuid4().hex}/"
    keys = [f"{prefix}a.txt", f"{prefix}sub/b.bin"]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=stack.bucket, Key=key, Body=f"payload {i}".encode())
    assert s3.get_object(Bucket=stack.bucket, Key=keys[0])["Body"].read() == b"payload 0"
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix)
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(keys)
    result = s3.delete_objects(Bucket=stack.bucket,
                               Delete={"Objects": [{"Key": k} for k in keys]})
    assert not result.get("Errors")
    assert sorted(d["Key"] for d in result["Deleted"]) == sorted(keys)
    assert s3.list_objects_v2(Bucket=stack.bucket, Prefix=prefix)["KeyCount"] == 0


def test_bucket_is_private(stack: st.StackInfo) -> None:
    s3 = _s3(stack)
    s3.put_object(Bucket=stack.bucket, Key="private/x.txt", Body=b"secret")
    account = stack.access_key.split(":")[0]
    for url in (f"{stack.s3_endpoint}/{stack.bucket}",
                f"{stack.s3_endpoint}/{stack.bucket}/private/x.txt",
                f"{stack.s3_endpoint}/v1/AUTH_{account}/{stack.bucket}",
                f"{stack.s3_endpoint}/v1/AUTH_{account}/{stack.bucket}/private/x.txt"):
        status = http_status(url)
        assert status is not None and status >= 400, (url, status)
    assert http_status(f"{stack.s3_endpoint}/v1/AUTH_{account}/{stack.bucket}") in (401, 403)


def test_mlflow_logs_artifacts_to_s3(stack: st.StackInfo, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    assert http_status(f"{stack.mlflow_uri}/health") == 200
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    exp_id = client.create_experiment(f"infra-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    client.log_param(run.info.run_id, "k", 4)
    client.log_metric(run.info.run_id, "auroc", 0.9)
    artifact = tmp_path / "report.json"
    artifact.write_text('{"ok": true}')
    client.log_artifact(run.info.run_id, str(artifact), artifact_path="reports")
    client.set_terminated(run.info.run_id)
    listed = [f.path for f in client.list_artifacts(run.info.run_id, "reports")]
    assert listed == ["reports/report.json"]
    objects = _s3(stack).list_objects_v2(Bucket=stack.bucket,
                                         Prefix=f"mlflow-artifacts/{exp_id}/{run.info.run_id}/")
    keys = [o["Key"] for o in objects.get("Contents", [])]
    assert keys == [f"mlflow-artifacts/{exp_id}/{run.info.run_id}/artifacts/reports/report.json"]


def test_prefect_server_pool_and_worker(stack: st.StackInfo) -> None:
    assert http_status(f"{stack.prefect_api_url}/health") == 200
    pool = _get_json(f"{stack.prefect_api_url}/work_pools/{WORK_POOL}")
    assert pool["type"] == "process"
    workers = http_post_json(f"{stack.prefect_api_url}/work_pools/{WORK_POOL}/workers/filter", {})
    assert isinstance(workers, list) and workers, workers
    # flow runs inherit the worker's environment: it must point at the stack
    pid = st.status(_home(stack))["services"]["prefect-worker"]["pid"]
    env = psutil.Process(pid).environ()
    for key, value in stack.env().items():
        assert env.get(key) == value, key


def test_listens_on_loopback_only(stack: st.StackInfo) -> None:
    addresses = st.listening_addresses(_home(stack))
    for name in ("memcached", "swift-object", "swift-container", "swift-account", "swift-proxy",
                 "mlflow", "prefect-server"):
        assert addresses.get(name), f"{name} listens nowhere: {addresses}"
    assert all(ip == "127.0.0.1" for addrs in addresses.values() for ip, _ in addrs), addresses


def test_status_up_is_noop_and_env_file(stack: st.StackInfo) -> None:
    report = st.status(_home(stack))
    assert report["running"], report
    assert all(svc["up"] for svc in report["services"].values())
    t0 = time.monotonic()
    again = st.up(_home(stack))
    assert again.started == () and again == stack
    assert time.monotonic() - t0 < 15
    env_sh = Path(report["env_file"]).read_text()
    assert f"export MLFLOW_TRACKING_URI={stack.mlflow_uri}" in env_sh
    assert f"export FSAD_STORAGE=s3://{stack.bucket}" in env_sh


def test_down_then_up_keeps_data(stack: st.StackInfo) -> None:
    """Runs last: stops everything, checks, then starts again so a shared fixture stays usable."""
    home = _home(stack)
    _s3(stack).put_object(Bucket=stack.bucket, Key="persist/me.txt", Body=b"still here")
    st.down(home)
    report = st.status(home)
    assert not report["running"]
    assert not any(svc["up"] or svc["pid"] for svc in report["services"].values())
    assert st.listening_addresses(home) == {}
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{stack.mlflow_uri}/health", timeout=2)
    st.down(home)  # idempotent

    restarted = st.up(home)
    assert restarted == stack and len(restarted.started) == 8
    got = _s3(stack).get_object(Bucket=stack.bucket, Key="persist/me.txt")["Body"].read()
    assert got == b"still here"


def test_port_taken_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing starts when a port is taken, and the error names the variable to change."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        for key, value in free_port_env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FSAD_MLFLOW_PORT", str(squatter.getsockname()[1]))
        with pytest.raises(st.StackError, match="FSAD_MLFLOW_PORT"):
            st.up(tmp_path)
    assert not any(svc["pid"] for svc in st.status(tmp_path)["services"].values())
