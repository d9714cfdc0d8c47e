"""Start, stop and inspect the local real services: Swift S3, MLflow server, Prefect server+worker.

Everything (configs, data, logs, pid files) lives under ``FSAD_HOME/stack``; every service
listens on 127.0.0.1 only. ``python -m infra.stack up|down|status`` works as well as the CLI.

Settings (read by ``up`` when the stack is stopped, then saved in ``stack.json``):
``FSAD_HOME`` (~/.fsad), ``FSAD_S3_PORT`` (8080), ``FSAD_MLFLOW_PORT`` (5000),
``FSAD_PREFECT_PORT`` (4200), ``FSAD_SWIFT_BACKEND_PORT`` (6200-6202),
``FSAD_MEMCACHED_PORT`` (11212), ``FSAD_S3_BUCKET`` (fsad), ``FSAD_STACK_TIMEOUT`` (180 s
per service), ``FSAD_S3_SECRET`` (drawn at random on the first ``up`` of a home, then kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra import install, procs
from infra.config import WORK_POOL, StackConfig, StackError, write_private
from infra.info import StackInfo
from infra.netcheck import listening_of, non_loopback
from infra.probes import http_status, tcp_ok
from infra.s3client import make_s3_client
from infra.services import SERVICE_NAMES, Service, build_services

__all__ = ["StackError", "StackInfo", "down", "listening_addresses", "main", "running", "status",
           "stack_info", "up"]


def _running(cfg: StackConfig) -> dict[str, int]:
    """Services of this stack whose process is alive, name -> pid."""
    pids = {name: procs.running_pid(cfg.run_dir, name) for name in SERVICE_NAMES}
    return {name: pid for name, pid in pids.items() if pid is not None}


def stack_info(home: Path | None = None) -> StackInfo:
    """Client information for the stack in ``home`` (whether or not it is running)."""
    return StackInfo.from_config(StackConfig.load(home))


def _s3_ready(info: StackInfo) -> bool:
    make_s3_client(info.s3_endpoint, info.access_key, info.secret_key, info.region).list_buckets()
    return True


def _ensure_bucket(info: StackInfo) -> None:
    """Create the bucket (private: no ACL grants) unless it exists."""
    client = make_s3_client(info.s3_endpoint, info.access_key, info.secret_key, info.region)
    names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if info.bucket not in names:
        client.create_bucket(Bucket=info.bucket)


def anonymous_bucket_status(info: StackInfo) -> int | None:
    """HTTP status of an unsigned GET of the bucket listing (must not be 2xx)."""
    return http_status(f"{info.s3_endpoint}/{info.bucket}")


def _check_port_free(service: Service) -> None:
    if service.port is not None and tcp_ok(service.port):
        raise StackError(f"{service.name}: port {service.port} on 127.0.0.1 is already in use by "
                         f"another program; stop it or set {service.port_var}")


def _start_and_wait(cfg: StackConfig, info: StackInfo, services: list[Service],
                    running: dict[str, int], started: list[str]) -> None:
    """Start what is not running, dependency first, then wait for each to be healthy."""
    by_name = {s.name: s for s in services}
    pending = [s for s in services if s.name not in running]
    for service in pending:
        _check_port_free(service)

    prepared: list[object] = []

    def launch(service: Service) -> None:
        if service.prepare is not None and service.prepare not in prepared:
            service.prepare()
            prepared.append(service.prepare)
        running[service.name] = procs.start(service.name, service.argv, service.env,
                                            cfg.run_dir, cfg.log_dir, service.cwd)
        started.append(service.name)

    for service in pending:  # everything without a dependency starts at once
        if service.after is None:
            launch(service)
    for service in services:
        if service.after is not None:
            dep = by_name[service.after]
            _wait_healthy(cfg, dep, running)
            if service.name not in running:
                launch(service)
        _wait_healthy(cfg, service, running)
        if service.name == "swift-proxy":
            log = procs.log_file(cfg.log_dir, service.name)
            procs.wait_until("S3 API (swift-proxy)", lambda: _s3_ready(info),
                             running[service.name], log, cfg.timeout_s, "to answer ListBuckets")
            _ensure_bucket(info)


def _wait_healthy(cfg: StackConfig, service: Service, running: dict[str, int]) -> None:
    """Wait for one service; a crash of any other service of the stack also ends the wait."""
    watched = {name: (pid, procs.log_file(cfg.log_dir, name)) for name, pid in running.items()}
    procs.wait_until(service.name, service.healthy, running.get(service.name),
                     procs.log_file(cfg.log_dir, service.name), cfg.timeout_s,
                     others=lambda: procs.raise_if_dead(watched))


def _verify(cfg: StackConfig, info: StackInfo) -> None:
    """Post-start checks: loopback-only listeners and a private bucket."""
    if exposed := non_loopback(listening_of(_running(cfg))):
        raise StackError(f"services listen beyond 127.0.0.1: {', '.join(exposed)}")
    status_code = anonymous_bucket_status(info)
    if status_code is None or 200 <= status_code < 300:
        raise StackError(f"bucket {info.bucket} answers an anonymous GET with {status_code}; "
                         "it must be private")


def up(home: Path | None = None) -> StackInfo:
    """Start the stack (a no-op for services already running) and return client information.

    Raises StackError naming the failing service, with the tail of its log.
    """
    cfg0 = StackConfig.load(home)
    running = _running(cfg0)
    # A running stack keeps its saved ports; a stopped one takes the current environment, but keeps
    # its secret (clients hold it) unless FSAD_S3_SECRET sets another.
    secret = os.environ.get("FSAD_S3_SECRET", "").strip() or cfg0.secret_key
    cfg = cfg0 if running else dataclasses.replace(StackConfig.from_env(home), secret_key=secret)
    for folder in (cfg.log_dir, cfg.run_dir, cfg.mlflow_dir, cfg.prefect_dir, cfg.swift_dir):
        folder.mkdir(parents=True, exist_ok=True)
    install.ensure_packages(cfg.log_dir / "install.log")
    cfg.save()
    info = StackInfo.from_config(cfg)
    services = build_services(cfg, info)
    started: list[str] = []
    try:
        _start_and_wait(cfg, info, services, running, started)
        _verify(cfg, info)
    except BaseException:
        for name in reversed(started):
            procs.stop(cfg.run_dir, name)
        raise
    write_private(cfg.env_file, info.env_sh())
    return StackInfo.from_config(cfg, tuple(started))


def _down(home: Path | None = None) -> list[str]:
    cfg = StackConfig.load(home)
    return [name for name in reversed(SERVICE_NAMES) if procs.stop(cfg.run_dir, name)]


def down(home: Path | None = None) -> None:
    """Stop every service of the stack (SIGTERM, SIGKILL after a timeout); idempotent."""
    _down(home)


@contextlib.contextmanager
def running(home: Path | None = None) -> Iterator[StackInfo]:
    """The stack up for the duration of a ``with`` block (scripts, tests), down afterwards.

    Before stopping, this process's Prefect event and log workers are flushed while their server
    still answers: workers left pointing at a stopped server make a later drain wait forever."""
    try:
        yield up(home)
    finally:
        if "prefect" in sys.modules:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker
            EventsWorker.drain_all(timeout=30)
            APILogWorker.drain_all(timeout=30)
        down(home)


def status(home: Path | None = None) -> dict[str, Any]:
    """Per service: up (process alive and health probe passes), pid and URL; plus overall."""
    cfg = StackConfig.load(home)
    info = StackInfo.from_config(cfg)
    services: dict[str, dict[str, Any]] = {}
    for service in build_services(cfg, info):
        pid = procs.running_pid(cfg.run_dir, service.name)
        healthy = False
        if pid is not None:
            try:
                healthy = bool(service.healthy())
            except Exception:  # noqa: BLE001 - a failing probe means "down"
                healthy = False
        services[service.name] = {"up": healthy, "pid": pid, "url": service.url}
    return {
        "root": str(cfg.root),
        "running": all(s["up"] for s in services.values()),
        "services": services,
        "env_file": str(cfg.env_file),
    }


def listening_addresses(home: Path | None = None) -> dict[str, list[tuple[str, int]]]:
    """Listening TCP (ip, port) pairs of each running service, children included."""
    return listening_of(_running(StackConfig.load(home)))


def _print_info(info: StackInfo) -> None:
    print(f"  S3 (Swift)  {info.s3_endpoint}  bucket {info.bucket}  "
          f"key {info.access_key}  (secret in env.sh)")
    print(f"  MLflow      {info.mlflow_uri}")
    print(f"  Prefect     {info.prefect_api_url}  work pool {WORK_POOL}")
    if info.root is not None:
        print(f"  logs        {info.root / 'logs'}")
        print(f"  use it:     source {info.root / 'env.sh'}")


def main(action: str) -> int:
    """``fsad stack up|down|status``: print a short summary; 0 on success (status: 0 when all
    services are up, 3 when not), 1 with a one-line reason on failure."""
    try:
        if action == "up":
            t0 = time.monotonic()
            info = up()
            took = time.monotonic() - t0
            if info.started:
                print(f"stack up in {took:.0f} s (started: {', '.join(info.started)})")
            else:
                print("stack already running")
            _print_info(info)
            return 0
        if action == "down":
            stopped = _down()
            print(f"stack down (stopped: {', '.join(stopped)})" if stopped
                  else "stack was not running")
            return 0
        if action == "status":
            report = status()
            for name, svc in report["services"].items():
                state = "up" if svc["up"] else ("unhealthy" if svc["pid"] else "down")
                print(f"  {name:<16} {state:<9} {svc['url']}")
            print(f"stack {'running' if report['running'] else 'not running'} ({report['root']})")
            return 0 if report["running"] else 3
        print(f"error: unknown stack action {action!r} (use up, down or status)", file=sys.stderr)
        return 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "status"))
