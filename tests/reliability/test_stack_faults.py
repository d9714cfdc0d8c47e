"""Against the real local stack (Swift S3, MLflow server, Prefect server), one per module on free
ports in a temporary FSAD_HOME: loopback-only services, a private bucket, keys that cannot escape
the product prefix, and faults while the retraining flow runs (``fsad retrain`` in a subprocess,
as a worker would run it): MLflow down at logging time, S3 down at download time, the process
killed mid-fine-tuning, two runs of the same upload at once. The last test checks the state the
module built: every uploaded object exactly once, champions verified."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests as requests_lib
from conftest import CLEARED, Fsad, noise_rgb, png_bytes

from flows.cli.main import main as cli_main
from flows.mlops import registry
from flows.store.storage import S3Store, StorageKeyError, manifest_key, quarantine_prefix, upload_prefix
from flows.store.upload import upload_folder
from infra import procs, swift
from infra.config import TELEMETRY_OFF, StackConfig, free_port_env
from infra.netcheck import non_loopback
from infra.probes import http_status
from infra.s3client import make_s3_client
from infra.stack import StackInfo, listening_addresses, running, up
from tests.tiny_training import TINY_TRAINING_PROMOTING

pytestmark = pytest.mark.integration
UPLOADED: dict[str, bytes] = {}  # every object key this module uploaded -> its bytes
RUNS: list[Fsad] = []  # every fsad retrain this module ran (their console output is checked)
TOKEN = "fsadCanaryToken-3hT8sQ"  # sent to the MLflow server with every request of the module


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[StackInfo, Path, dict[str, str]]]:
    home = tmp_path_factory.mktemp("fsad-stack-home")
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED:
            mp.delenv(name, raising=False)
        for key, value in {**free_port_env(), **TELEMETRY_OFF}.items():
            mp.setenv(key, value)
        with running(home) as info:
            env = {**info.env(), "FSAD_HOME": str(home / "client"),
                   "FSAD_TRAIN_OVERRIDES": json.dumps(TINY_TRAINING_PROMOTING), "FSAD_DEVICE": "cpu",
                   "FSAD_GATE_MIN_AUROC": "0", "PREFECT_HOME": str(home / "prefect-client"),
                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                   "MLFLOW_TRACKING_TOKEN": TOKEN, "FSAD_IO_RETRY_DELAYS": "1,1,1"}
            for key, value in env.items():
                mp.setenv(key, value)
            mlflow.set_tracking_uri(info.mlflow_uri)
            mlflow.set_registry_uri(info.mlflow_uri)
            yield info, home, env


def _store(info: StackInfo) -> S3Store:
    return S3Store(info.bucket, client=make_s3_client(info.s3_endpoint, info.access_key, info.secret_key, info.region))


def _upload(info: StackInfo, product: str, upload_id: str, seeds: range, tmp: Path) -> None:
    folder = tmp / f"{product}-{upload_id}"
    folder.mkdir(parents=True)
    for s in seeds:
        (folder / f"{s}.png").write_bytes(png_bytes(noise_rgb(s)))
    result = upload_folder(_store(info), product, folder, upload_id=upload_id)
    prefix = upload_prefix(product, upload_id)
    for f in result.manifest["files"]:
        UPLOADED[prefix + f["key"]] = (folder / f["key"].rsplit("/", 1)[1]).read_bytes()


def versions_of(product: str) -> list[mlflow.entities.model_registry.ModelVersion]:
    from mlflow.exceptions import MlflowException
    try:
        return list(mlflow.MlflowClient().search_model_versions(f"name = '{registry.model_name(product)}'"))
    except MlflowException:
        return []


def _run_dir(home: Path) -> Path:
    return StackConfig.load(home).run_dir


# ---- security against the real services -----------------------------------------------------------

def test_services_listen_on_loopback_only(stack):
    info, home, _ = stack
    listening = listening_addresses(home)
    assert {"mlflow", "prefect-server", "swift-proxy"} <= {n for n, a in listening.items() if a}
    assert non_loopback(listening) == []
    assert all(ip.startswith("127.") for addrs in listening.values() for ip, _ in addrs)


def test_bucket_is_private_unsigned_requests_are_refused(stack, tmp_path):
    info, _, _ = stack
    _upload(info, "seal", "20260101T000001Z-good01", range(2), tmp_path)
    key = f"{upload_prefix('seal', '20260101T000001Z-good01')}manifest.json"
    for url in (f"{info.s3_endpoint}/{info.bucket}", f"{info.s3_endpoint}/{info.bucket}/{key}",
                f"{info.s3_endpoint}/{info.bucket}?list-type=2"):
        status = http_status(url)
        assert status is not None and 400 <= status < 500, (url, status)  # Swift s3api: 401/403/412
    put = urllib.request.Request(f"{info.s3_endpoint}/{info.bucket}/anonymous.txt", data=b"x", method="PUT")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(put, timeout=10)
    assert 400 <= err.value.code < 500
    assert not _store(info).exists("anonymous.txt")


@pytest.mark.parametrize("key", ["../escape", "products/seal/../../escape", "/abs/escape", "products\\seal\\x",
                                 "products/seal/\x07x", "products/seal/\udcffx", "products//seal/x",
                                 "products/seal/" + "n" * 256])
def test_unsafe_keys_never_reach_the_bucket(stack, key):
    """Refused by the client before any request is sent; the bucket is unchanged."""
    info, _, _ = stack
    store = _store(info)
    store.put_bytes("keys-test/ok.txt", b"ok")
    requests: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: requests.append(request.url))
    before = store.list()
    assert requests  # the hook sees what the client sends
    requests.clear()
    for unsafe in (lambda: store.put_bytes(key, b"x"), lambda: store.copy("keys-test/ok.txt", key),
                   lambda: store.get_bytes(key), lambda: store.delete(key)):
        with pytest.raises(StorageKeyError):
            unsafe()
    assert requests == []
    assert store.list() == before


# ---- faults during the flow ---------------------------------------------------------------------

def test_good_upload_is_promoted_on_the_real_stack(stack):
    info, _, env = stack
    run = Fsad.retrain(env, "seal", "20260101T000001Z-good01", RUNS)
    assert run.finish() == 0, run.output[-4000:]
    assert "passed the gate and is now champion" in run.output
    (mv,) = versions_of("seal")
    assert registry.aliases("seal")[registry.CHAMPION] == mv.version


def test_mlflow_down_at_logging_time_fails_cleanly_and_a_rerun_succeeds(stack, tmp_path):
    info, home, env = stack
    product, uid = "seal", "20260101T000002Z-mlfdwn"
    _upload(info, product, uid, range(10, 12), tmp_path)
    before = sorted(v.version for v in versions_of(product))
    aliases_before = registry.aliases(product)
    run = Fsad.retrain(env, product, uid, RUNS)
    run.wait_for("fine-tuning on")  # the last MLflow call before logging is behind us
    assert procs.stop(_run_dir(home), "mlflow")
    code = run.finish()
    assert code != 0, run.output[-4000:]
    assert "Traceback" in _one_failure_line(run)
    up(home)  # restarts only what is down: mlflow
    assert sorted(v.version for v in versions_of(product)) == before  # registry untouched
    assert registry.aliases(product) == aliases_before
    rerun = Fsad.retrain(env, product, uid, RUNS)
    assert rerun.finish() == 0, rerun.output[-4000:]
    mine = [v for v in versions_of(product) if v.tags.get("upload_id") == uid]
    assert len(mine) == 1 and mine[0].tags.get("verified") == "true"


def test_s3_down_during_download_retries_then_fails_and_a_rerun_completes(stack, tmp_path):
    info, home, env = stack
    product, uid = "ring", "20260101T000001Z-s3down"
    _upload(info, product, uid, range(20, 22), tmp_path)
    run = Fsad.retrain(env, product, uid, RUNS)
    run.wait_for(f"validation of {uid}: passed")
    assert procs.stop(_run_dir(home), "swift-proxy")
    code = run.finish()
    assert code != 0, run.output[-4000:]
    assert "Retry 1/3" in run.output and "Retry 3/3" in run.output, run.output[-4000:]  # retried, then failed
    assert versions_of(product) == []
    up(home)
    rerun = Fsad.retrain(env, product, uid, RUNS)
    assert rerun.finish() == 0, rerun.output[-4000:]
    assert [v.tags.get("upload_id") for v in versions_of(product)] == [uid]


def test_s3_down_during_an_upload_retries_fails_clearly_and_resume_stores_each_object_once(stack, tmp_path, capsys,
                                                                                         monkeypatch):
    """Through ``fsad upload`` as a user runs it: one line naming the incomplete upload, then
    ``--resume`` writes only what is missing."""
    info, home, _ = stack
    product = "gasket"
    folder = tmp_path / "set"
    folder.mkdir()
    for s in range(60, 66):
        (folder / f"{s}.png").write_bytes(png_bytes(noise_rgb(s)))
    client = make_s3_client(info.s3_endpoint, info.access_key, info.secret_key, info.region)
    sends: list[str] = []
    client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sends.append(request.url))

    class ServerStopsAfterTwoPuts(S3Store):
        def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
            if len(sends) == 2:
                assert procs.stop(_run_dir(home), "swift-proxy")
            super().put_bytes(key, data, content_type)

    monkeypatch.setattr("flows.store.upload.open_store", lambda: ServerStopsAfterTwoPuts(info.bucket, client=client))
    assert cli_main(["upload", "--product", product, str(folder)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    found = re.search(r"upload (\S+) left incomplete \(no manifest\); finish it with --resume (\S+)$", line)
    assert line.startswith("fsad upload: StorageError: ") and found and found[1] == found[2], line
    uid = found[1]
    assert len(sends) >= 2 + 3 and len(set(sends[2:])) == 1  # the third object: retried, then the failure
    up(home)
    store, prefix = _store(info), upload_prefix(product, uid)
    assert len(store.list(prefix)) == 2 and not store.exists(manifest_key(product, uid))

    monkeypatch.setattr("flows.store.upload.open_store", lambda: store)
    assert cli_main(["upload", "--product", product, "--resume", uid, str(folder)]) == 0
    assert f"uploaded {product} {uid}: 6 train/good" in capsys.readouterr().out
    manifest = store.get_json(manifest_key(product, uid))
    expected = sorted([prefix + f["key"] for f in manifest["files"]] + [manifest_key(product, uid)])
    assert store.list(prefix) == expected and len(expected) == 7
    for f in manifest["files"]:
        data = (folder / f["key"].rsplit("/", 1)[1]).read_bytes()
        assert store.get_bytes(prefix + f["key"]) == data
        UPLOADED[prefix + f["key"]] = data


def test_killed_mid_fine_tuning_then_rerun_registers_exactly_one_version(stack, tmp_path):
    info, _, env = stack
    product, uid = "ring", "20260101T000002Z-killed"
    _upload(info, product, uid, range(30, 32), tmp_path)
    run = Fsad.retrain(env, product, uid, RUNS)
    run.wait_for("fine-tuning on")
    run.kill()
    assert not [v for v in versions_of(product) if v.tags.get("upload_id") == uid]
    rerun = Fsad.retrain(env, product, uid, RUNS)
    assert rerun.finish() == 0, rerun.output[-4000:]
    again = Fsad.retrain(env, product, uid, RUNS)  # and once more: already trained, nothing new
    assert again.finish() == 0 and "already trained" in again.output
    assert len([v for v in versions_of(product) if v.tags.get("upload_id") == uid]) == 1


def test_two_runs_of_the_same_upload_at_once_make_one_version(stack, tmp_path):
    info, _, env = stack
    product, uid = "shim", "20260101T000001Z-twice1"
    _upload(info, product, uid, range(40, 42), tmp_path)
    runs = [Fsad.retrain(env, product, uid, RUNS), Fsad.retrain(env, product, uid, RUNS)]
    codes = [r.finish() for r in runs]
    assert codes == [0, 0], [r.output[-2000:] for r in runs]
    assert len(versions_of(product)) == 1, f"{len(versions_of(product))} versions for one upload"
    assert sum("already trained" in r.output for r in runs) == 1


def test_rejected_upload_is_quarantined_in_the_bucket(stack, tmp_path):
    info, _, env = stack
    product, uid = "ring", "20260101T000003Z-reject"
    _upload(info, product, uid, range(50, 52), tmp_path)
    key = f"{upload_prefix(product, uid)}train/good/50.png"
    _store(info).put_bytes(key, b"<html>gone</html>")  # replaced after upload: fails sha256 and decode
    UPLOADED[key] = b"<html>gone</html>"
    run = Fsad.retrain(env, product, uid, RUNS)
    assert run.finish() != 0
    assert _store(info).exists(quarantine_prefix(product, uid) + "validation.json")
    log = _one_failure_line(run, "UploadRejected", "every file decodes as an image: train/good/50.png")
    assert "Traceback (most recent call last)" in log and "UploadRejected" in log


def _one_failure_line(run: Fsad, *phrases: str) -> str:
    """The console of a failed ``fsad retrain``: no traceback, one ``fsad retrain:`` line with the
    reason and the log file, which keeps the traceback; returns the log's text."""
    assert "Traceback" not in run.output, run.output[-4000:]
    (line,) = [ln for ln in run.output.splitlines() if ln.startswith("fsad retrain:")]
    assert all(phrase in line for phrase in phrases), line
    found = re.search(r"\(full log: (\S+\.log)\)$", line)
    assert found, line
    return Path(found[1]).read_text()


def test_the_stack_secret_never_reaches_logs_mlflow_prefect_or_the_bucket(stack):
    """After every run above: the S3 secret is only where the stack keeps it by design (stack.json,
    env.sh, the proxy config), not in a service log, the MLflow or Prefect database (params, tags,
    flow-run logs), a client file, an object in the bucket, or the console of any run."""
    info, home, _ = stack
    sent: list[str] = []  # the token is in use: every MLflow request of the module carries it
    real_send = requests_lib.Session.send
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(requests_lib.Session, "send",
                   lambda self, request, **kw: sent.append(request.headers.get("Authorization", ""))
                   or real_send(self, request, **kw))
        mlflow.MlflowClient().search_registered_models()
    assert sent and all(header == f"Bearer {TOKEN}" for header in sent)
    cfg = StackConfig.load(home)
    kept = {cfg.state_file, cfg.env_file, swift.conf_path(cfg, "proxy")}
    secret = info.secret_key.encode()
    assert len(RUNS) >= 6 and secret in cfg.env_file.read_bytes()
    files = [p for p in home.rglob("*") if p.is_file()]
    leaks = [str(p) for p in files if p not in kept and secret in p.read_bytes()]
    leaks += [f"{p} (the MLflow token)" for p in files if TOKEN.encode() in p.read_bytes()]
    store = _store(info)
    leaks += [f"s3://{info.bucket}/{key}" for key in store.list() if secret in store.get_bytes(key)
              or TOKEN.encode() in store.get_bytes(key)]
    leaks += [f"console of fsad retrain #{i}" for i, run in enumerate(RUNS)
              if info.secret_key in run.output or TOKEN in run.output]
    assert leaks == []


# ---- the state this module built ----------------------------------------------------------------

def test_final_state_every_object_once_and_champions_verified(stack):
    info, _, _ = stack
    store = _store(info)
    keys = store.list()
    assert len(keys) == len(set(keys))
    assert not [k for k in keys if k.endswith(".fsadtmp") or "/." in k]
    for key, data in UPLOADED.items():
        assert store.get_bytes(key) == data, key  # every uploaded object, whole
    allowed = {"manifest.json", "validation.json"}
    for k in keys:
        if k.startswith("products/"):
            assert k in UPLOADED or k.rsplit("/", 1)[1] in allowed, f"unexpected object {k}"
    # quarantine holds copies of rejected uploads only, byte for byte
    for k in keys:
        if k.startswith("quarantine/"):
            _, product, uid, rel = k.split("/", 3)
            original = upload_prefix(product, uid) + rel
            if rel != "validation.json":
                assert hashlib.sha256(store.get_bytes(k)).digest() == hashlib.sha256(store.get_bytes(original)).digest()
    client = mlflow.MlflowClient()
    for product in ("seal", "ring"):
        champion = registry.alias_version(product, registry.CHAMPION)
        assert champion is not None, product
        tags = client.get_model_version(registry.model_name(product), champion).tags
        assert tags["verified"] == "true" and tags["gate.verdict"] == "passed", (product, tags)
        assert "same files, score and decision" in tags["verified.reason"]
    # every version that holds or held champion (previous) is verified and passed the gate
    aliased = [(p, a, v) for p in ("seal", "ring") for a, v in registry.aliases(p).items()
               if a in (registry.CHAMPION, registry.PREVIOUS)]
    assert any(a == registry.PREVIOUS for _, a, _ in aliased)
    for product, alias, version in aliased:
        tags = client.get_model_version(registry.model_name(product), version).tags
        assert tags.get("verified") == "true" and tags.get("gate.verdict") == "passed", (product, alias, tags)
