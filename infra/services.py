"""The stack's processes: command line, environment, port and health probe of each.

Why one table: ``up`` starts them in this order, ``down`` stops them in reverse, ``status``
probes them, and the listening-address check maps pids to names, all from the same list.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from infra import swift
from infra.config import HOST, TELEMETRY_OFF, WORK_POOL, StackConfig, StackError
from infra.info import StackInfo
from infra.probes import http_ok, http_post_json, tcp_ok

# Never inherited by the services, so a caller's settings cannot point them elsewhere.
_SCRUBBED_PREFIXES = ("PREFECT_", "MLFLOW_", "AWS_")
_SHIM_DIR = Path(__file__).resolve().parent / "botocore_shim"
QUIET_ENV = {**TELEMETRY_OFF, "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Service:
    """One long-running process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    healthy: Callable[[], bool]
    url: str
    port: int | None = None  # the TCP port it must be able to take
    port_var: str | None = None  # the variable that changes that port
    after: str | None = None  # a service that must be healthy before this one starts
    prepare: Callable[[], None] | None = None  # files it needs, made once before it starts


def _exe(name: str) -> str:
    """A console script of this virtualenv (mlflow, prefect), else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name} is not installed in this environment (pip install {name})")
    return found


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(QUIET_ENV)
    return env


def _s3_server_env(info: StackInfo) -> dict[str, str]:
    """S3 settings for a server-side boto3 (MLflow's artifact proxy, flow runs)."""
    env = {k: v for k, v in info.env().items() if k.startswith("AWS_")}
    env["MLFLOW_S3_ENDPOINT_URL"] = info.s3_endpoint
    return env


def _prefect_env(cfg: StackConfig) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(cfg.prefect_dir),
        "PREFECT_API_URL": cfg.prefect_api_url,
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(cfg.prefect_port),
        "PREFECT_API_DATABASE_CONNECTION_URL":
            f"sqlite+aiosqlite:///{cfg.prefect_dir / 'prefect.db'}",
    }


def build_services(cfg: StackConfig, info: StackInfo) -> list[Service]:
    """The services in start order."""
    env = base_env()
    swift_cwd = cfg.swift_dir
    services: list[Service] = []
    mlflow_env = {**env, **_s3_server_env(info), "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "path",
                  # no GenAI job runner: it forks 8 more processes (~2 GB) that fsad never uses
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                  # the shim's sitecustomize adds Content-MD5 to DeleteObjects (artifact deletion)
                  "PYTHONPATH": os.pathsep.join(filter(None, [str(_SHIM_DIR),
                                                              env.get("PYTHONPATH")]))}
    services.append(Service(
        "mlflow", [
            _exe("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{cfg.mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{cfg.bucket}/mlflow-artifacts",
            "--host", HOST, "--port", str(cfg.mlflow_port), "--workers", "1",
        ], mlflow_env, cfg.mlflow_dir, lambda: http_ok(f"{cfg.mlflow_uri}/health"),
        cfg.mlflow_uri, cfg.mlflow_port, "FSAD_MLFLOW_PORT"))

    prefect_env = {**env, **_prefect_env(cfg)}
    services.append(Service(
        "prefect-server", [
            _exe("prefect"), "server", "start", "--host", HOST, "--port", str(cfg.prefect_port),
            "--analytics-off",
        ], prefect_env, cfg.prefect_dir, lambda: http_ok(f"{cfg.prefect_api_url}/health"),
        cfg.prefect_api_url.removesuffix("/api"), cfg.prefect_port, "FSAD_PREFECT_PORT"))

    # Swift comes after the slow Python servers so its ring building overlaps their start-up.
    services.append(Service(
        "memcached", swift.memcached_argv(cfg), env, swift_cwd,
        lambda: tcp_ok(cfg.memcached_port), f"{HOST}:{cfg.memcached_port}",
        cfg.memcached_port, "FSAD_MEMCACHED_PORT"))
    prepare_swift = partial(swift.prepare, cfg)
    for ring in swift.RINGS:
        port = swift.backend_port(cfg, ring)
        services.append(Service(
            f"swift-{ring}", swift.server_argv(cfg, ring), env, swift_cwd,
            lambda port=port: tcp_ok(port), f"http://{HOST}:{port}", port,
            "FSAD_SWIFT_BACKEND_PORT", prepare=prepare_swift))
    services.append(Service(
        "swift-proxy", swift.server_argv(cfg, "proxy"), env, swift_cwd,
        lambda: http_ok(f"{cfg.s3_endpoint}/healthcheck"), cfg.s3_endpoint, cfg.s3_port,
        "FSAD_S3_PORT", prepare=prepare_swift))

    # Flow runs are children of the worker and inherit its environment: give it the clients' env.
    worker_env = {**prefect_env, **info.env(), **threads_per_run(cfg.worker_limit, env)}
    worker_name = f"fsad-worker-{cfg.prefect_port}"
    services.append(Service(
        "prefect-worker", [
            _exe("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
            "--name", worker_name, *(["--limit", str(cfg.worker_limit)] if cfg.worker_limit else []),
        ], worker_env, cfg.prefect_dir, lambda: _worker_online(cfg, worker_name),
        f"{cfg.prefect_api_url}/work_pools/{WORK_POOL}", after="prefect-server"))
    return services


def threads_per_run(limit: int, env: dict[str, str]) -> dict[str, str]:
    """OMP_NUM_THREADS for a worker's runs: its share of the CPUs it may use when it runs ``limit``
    at once (each torch run otherwise takes every core, and runs side by side oversubscribe them);
    nothing when the environment already says, or for one run at a time (torch's own default)."""
    if limit <= 1 or "OMP_NUM_THREADS" in env:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // limit))}


def _worker_online(cfg: StackConfig, worker_name: str) -> bool:
    """The work pool exists and our worker has sent a heartbeat to it."""
    workers = http_post_json(f"{cfg.prefect_api_url}/work_pools/{WORK_POOL}/workers/filter", {})
    return isinstance(workers, list) and any(
        w.get("name") == worker_name and w.get("status", "ONLINE") == "ONLINE" for w in workers)


SERVICE_NAMES = ("mlflow", "prefect-server", "memcached", "swift-object", "swift-container",
                 "swift-account", "swift-proxy", "prefect-worker")
