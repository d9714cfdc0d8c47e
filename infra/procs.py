"""Background processes tracked by pid files: start, liveness, stop, log tails.

Why pid files with the process start time: ``down``/``status`` run in other processes than
``up`` (the CLI exits), and a recycled pid must never be mistaken for (or killed as) ours.
Each service runs in its own session, so stopping it signals its whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from infra.config import StackError

# Popen objects of services started by this interpreter, kept so they are reaped cleanly.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def log_file(log_dir: Path, name: str) -> Path:
    return log_dir / f"{name}.log"


def start(name: str, argv: list[str], env: Mapping[str, str], run_dir: Path, log_dir: Path,
          cwd: Path | None = None) -> int:
    """Start ``argv`` detached (own session, stdin closed, output appended to its log)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_file(log_dir, name)
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            raise StackError(f"{name}: cannot start {argv[0]}: {exc}") from exc
    _CHILDREN[proc.pid] = proc
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:  # died at once: the pid file then reads "not running"
        created = 0.0
    _pid_file(run_dir, name).write_text(f"{proc.pid} {created}\n")
    return proc.pid


def running_pid(run_dir: Path, name: str) -> int | None:
    """The pid of the service if its pid file names a live process that started at that time."""
    try:
        pid_text, created_text = _pid_file(run_dir, name).read_text().split()
        proc = psutil.Process(int(pid_text))
        if abs(proc.create_time() - float(created_text)) > 0.05:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            _reap(proc.pid)
            return None
        return proc.pid
    except (OSError, ValueError, psutil.Error):
        return None


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            _CHILDREN[pid] = child


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (services may fork workers)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def stop(run_dir: Path, name: str, timeout_s: float = 15.0) -> bool:
    """SIGTERM the service's process group (and stray descendants), SIGKILL after the timeout.

    Returns True if something was running. Idempotent.
    """
    pid_file = _pid_file(run_dir, name)
    pid = running_pid(run_dir, name)
    if pid is None:
        # The leader may have died leaving children in its group: Linux never reuses a pid
        # while a group carries it as id, so members of that group are still ours.
        leftovers = _group_members(_recorded_pid(pid_file))
        if leftovers:
            _signal_all(None, leftovers, signal.SIGKILL)
            _wait_gone(leftovers, 5.0)
        pid_file.unlink(missing_ok=True)
        return bool(leftovers)
    procs = process_tree(pid)
    _signal_all(pid, procs, signal.SIGTERM)
    if alive := _wait_gone(procs, timeout_s):
        _signal_all(pid, alive, signal.SIGKILL)
        _wait_gone(alive, 5.0)
    _reap(pid)
    pid_file.unlink(missing_ok=True)
    return True


def _recorded_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _group_members(pgid: int | None) -> list[psutil.Process]:
    """Live processes whose process group is ``pgid``."""
    if pgid is None:
        return []
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until the processes are dead (zombies count as dead); return those still alive.

    Polls quickly: psutil.wait_procs sleeps up to a second per round for non-children.
    """
    _reap_all(procs)
    deadline = time.monotonic() + timeout_s
    alive = procs
    while True:
        alive = [p for p in alive if not _is_zombie(p.pid) and p.is_running()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)
        _reap_all(alive)


def _reap_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        if proc.pid in _CHILDREN and _CHILDREN[proc.pid].poll() is not None:
            _CHILDREN.pop(proc.pid, None)


def _signal_all(pgid: int | None, procs: list[psutil.Process], sig: signal.Signals) -> None:
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs:  # descendants that left the group
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file (empty string when missing)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until(name: str, check: Callable[[], bool], pid: int | None, log: Path,
               timeout_s: float, what: str = "to become healthy",
               others: Callable[[], None] | None = None) -> None:
    """Poll ``check`` until it is true; fail early if the process died, with the log tail.

    ``others`` is called on every round and may raise to fail fast on another service's death.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - any failure of a probe means "not yet"
            pass
        if pid is not None and _is_zombie(pid):  # gone or zombie: it died
            raise_if_dead({name: (pid, log)})
        if others is not None:
            others()
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not {what.removeprefix('to ')} within {timeout_s:.0f} s; "
                             f"last lines of {log}:\n{tail(log)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def raise_if_dead(watched: Mapping[str, tuple[int, Path]]) -> None:
    """StackError with the log tail for the first watched service whose process died."""
    for name, (pid, log) in watched.items():
        if _is_zombie(pid):
            _reap(pid)
            raise StackError(f"{name} exited during startup; last lines of {log}:\n{tail(log)}")


def _is_zombie(pid: int) -> bool:
    """True when the process is a zombie or does not exist any more."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
