"""Where the stack lives and which ports/credentials it uses.

The configuration is read from the environment when the stack is started and then saved to
``STACK_DIR/stack.json``, so ``status``/``down`` act on what is actually running even when the
environment of the caller differs.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# The Swift tempauth user; the S3 access key is "ACCOUNT:USER". Its secret is drawn at random for
# each stack (or set with FSAD_S3_SECRET) and kept in stack.json and env.sh, both readable by the
# owner only: a well-known password on a service would be one more way in.
SWIFT_ACCOUNT = "test"
SWIFT_USER = "tester"
REGION = "us-east-1"
WORK_POOL = "fsad-process"
HOST = "127.0.0.1"
# Telemetry of the libraries fsad drives (its commands, the stack's services, the tests) is off.
TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "GX_ANALYTICS_ENABLED": "false"}


def telemetry_off(env: MutableMapping[str, str] = os.environ) -> None:
    """Every service's telemetry off, unless the environment already says otherwise."""
    for key, value in TELEMETRY_OFF.items():
        env.setdefault(key, value)

# env var -> default port
PORT_ENV = {
    "s3_port": ("FSAD_S3_PORT", 8080),
    "mlflow_port": ("FSAD_MLFLOW_PORT", 5000),
    "prefect_port": ("FSAD_PREFECT_PORT", 4200),
    # object server on this port, container +1, account +2
    "swift_backend_port": ("FSAD_SWIFT_BACKEND_PORT", 6200),
    # not 11211, so a system memcached can keep its port
    "memcached_port": ("FSAD_MEMCACHED_PORT", 11212),
}


class StackError(RuntimeError):
    """A service could not be installed, started or reached; the message says which and why."""


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds the stack's S3 secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def fsad_home(home: Path | None = None, env: Mapping[str, str] = os.environ) -> Path:
    """The fsad home: the argument, else ``$FSAD_HOME``, else ``~/.fsad``; the one place it is defaulted."""
    return Path(home or env.get("FSAD_HOME") or "~/.fsad").expanduser().resolve()


def _whole(var: str, default: int) -> int:
    raw = os.environ.get(var, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = -1
    if value < 0:
        raise StackError(f"{var}={raw!r} is not a whole number")
    return value


@dataclass(frozen=True)
class StackConfig:
    """Ports, bucket and paths of one stack (one per fsad home)."""

    root: Path  # FSAD_HOME/stack
    s3_port: int
    mlflow_port: int
    prefect_port: int
    swift_backend_port: int
    memcached_port: int
    bucket: str
    timeout_s: float
    secret_key: str
    worker_limit: int = 0  # flow runs the stack's worker runs at once (0: no limit)

    @classmethod
    def from_env(cls, home: Path | None = None) -> StackConfig:
        """Fresh configuration from ``FSAD_*`` environment variables (defaults otherwise)."""
        ports = {}
        for field, (var, default) in PORT_ENV.items():
            raw = os.environ.get(var, "").strip()
            try:
                ports[field] = int(raw) if raw else default
            except ValueError as exc:
                raise StackError(f"{var}={raw!r} is not a port number") from exc
        return cls(
            root=fsad_home(home) / "stack",
            bucket=os.environ.get("FSAD_S3_BUCKET", "").strip() or "fsad",
            timeout_s=float(os.environ.get("FSAD_STACK_TIMEOUT", "") or 180),
            secret_key=os.environ.get("FSAD_S3_SECRET", "").strip() or secrets.token_urlsafe(24),
            worker_limit=_whole("FSAD_WORKER_LIMIT", 0),
            **ports,
        )

    @classmethod
    def load(cls, home: Path | None = None) -> StackConfig:
        """The saved configuration of the stack in ``home``, else the one from the environment."""
        fresh = cls.from_env(home)
        try:
            saved = json.loads(fresh.state_file.read_text())
        except (OSError, ValueError):
            return fresh
        saved.pop("root", None)
        known = {k: v for k, v in saved.items() if k in asdict(fresh)}
        return replace(fresh, **known)

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "root"}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.state_file, json.dumps(data, indent=2) + "\n")

    # -- paths -----------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def swift_dir(self) -> Path:
        return self.root / "swift"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def prefect_dir(self) -> Path:
        return self.root / "prefect"

    @property
    def env_file(self) -> Path:
        return self.root / "env.sh"

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"


def _bindable(port: int, host: str = HOST) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def free_port_env() -> dict[str, str]:
    """``FSAD_*_PORT`` values that are free right now (tests use them to avoid clashing with a
    stack a user already runs on the default ports)."""
    env: dict[str, str] = {}
    held: list[socket.socket] = []
    try:
        for field, (var, _) in PORT_ENV.items():
            width = 3 if field == "swift_backend_port" else 1
            while True:
                sock = socket.socket()
                sock.bind((HOST, 0))
                base = sock.getsockname()[1]
                held.append(sock)
                if width == 1 or all(_bindable(base + i) for i in range(1, width)):
                    break
            env[var] = str(base)
    finally:
        for sock in held:
            sock.close()
    return env
