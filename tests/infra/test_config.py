"""Configuration, client info and S3 client helpers: no services needed."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
from pathlib import Path

import pytest

from infra.config import StackConfig, StackError, free_port_env
from infra.info import StackInfo
from infra.s3client import _add_content_md5, make_s3_client
from infra.services import threads_per_run


def test_config_from_env_and_saved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in free_port_env():  # a stack fixture of this test process may have set them for its session
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FSAD_HOME", str(tmp_path))
    monkeypatch.setenv("FSAD_S3_PORT", "18080")
    monkeypatch.setenv("FSAD_S3_BUCKET", "b1")
    cfg = StackConfig.from_env()
    assert cfg.root == tmp_path.resolve() / "stack"
    assert (cfg.s3_port, cfg.mlflow_port, cfg.prefect_port) == (18080, 5000, 4200)
    assert cfg.prefect_api_url == "http://127.0.0.1:4200/api"
    cfg.save()
    monkeypatch.setenv("FSAD_S3_PORT", "19090")
    assert StackConfig.load().s3_port == 18080  # a saved stack keeps its ports
    assert StackConfig.from_env().s3_port == 19090
    monkeypatch.setenv("FSAD_MLFLOW_PORT", "x")
    with pytest.raises(StackError, match="FSAD_MLFLOW_PORT"):
        StackConfig.from_env()


def test_free_ports_are_bindable() -> None:
    env = free_port_env()
    assert set(env) == {"FSAD_S3_PORT", "FSAD_MLFLOW_PORT", "FSAD_PREFECT_PORT",
                        "FSAD_SWIFT_BACKEND_PORT", "FSAD_MEMCACHED_PORT"}
    for value in env.values():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", int(value)))


def test_info_env_and_env_sh(tmp_path: Path) -> None:
    cfg = StackConfig.from_env(tmp_path)
    info = StackInfo.from_config(cfg)
    env = info.env()
    assert env["AWS_ACCESS_KEY_ID"] == "test:tester" and env["AWS_SECRET_ACCESS_KEY"] == cfg.secret_key
    assert env["FSAD_STORAGE"] == f"s3://{cfg.bucket}"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] == info.s3_endpoint
    out = subprocess.run(["sh", "-c", "set -e; . /dev/stdin; env"], input=info.env_sh(),
                         capture_output=True,
                         text=True, check=True, env={}).stdout
    for key, value in env.items():
        assert f"{key}={value}" in out.splitlines()


def test_delete_objects_gets_content_md5() -> None:
    body = b"<Delete><Object><Key>a</Key></Object></Delete>"
    params = {"body": body, "headers": {}}
    _add_content_md5(params)
    assert params["headers"]["Content-MD5"] == base64.b64encode(hashlib.md5(body).digest()).decode()
    kept = {"body": body, "headers": {"content-md5": "x"}}
    _add_content_md5(kept)
    assert kept["headers"] == {"content-md5": "x"}


def test_s3_client_is_path_style_without_default_checksums() -> None:
    client = make_s3_client("http://127.0.0.1:1", "k", "s")
    config = client.meta.config
    assert config.s3["addressing_style"] == "path"
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    url = client.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    assert url.startswith("http://127.0.0.1:1/b/k?")


def test_install_is_a_quick_noop_when_present(tmp_path: Path) -> None:
    from infra import install

    if install.missing_binaries():
        pytest.skip("Swift packages not installed here")
    assert install.ensure_packages(tmp_path / "install.log") is False
    assert not (tmp_path / "install.log").exists()


def test_each_stack_draws_its_own_secret_and_keeps_it_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSAD_S3_SECRET", raising=False)
    a, b = StackConfig.from_env(tmp_path / "a"), StackConfig.from_env(tmp_path / "b")
    assert a.secret_key != b.secret_key and len(a.secret_key) >= 32
    a.save()
    assert StackConfig.load(tmp_path / "a").secret_key == a.secret_key
    assert a.state_file.stat().st_mode & 0o077 == 0  # owner only
    monkeypatch.setenv("FSAD_S3_SECRET", "chosen-by-the-user")
    assert StackConfig.from_env(tmp_path / "c").secret_key == "chosen-by-the-user"


def test_a_limited_worker_gives_each_run_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # the CPUs this process may use
    assert threads_per_run(4, {}) == {"OMP_NUM_THREADS": "2"}
    assert threads_per_run(16, {}) == {"OMP_NUM_THREADS": "1"}
    assert threads_per_run(0, {}) == threads_per_run(1, {}) == {}  # one run at a time: torch's default
    assert threads_per_run(4, {"OMP_NUM_THREADS": "3"}) == {}  # the environment's word stands
