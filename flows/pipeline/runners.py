"""Where a flow's tasks run: one after another in the flow's process, or spread over a Dask cluster
through prefect-dask's ``DaskTaskRunner`` (``"local"``: a LocalCluster of this machine's cores;
``"tcp://HOST:8786"``: a running scheduler); and the Prefect API they report to."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LOCAL = "local"


def task_runner(dask: str | None) -> Any:
    """The runner a flow's grid of tasks is submitted to: Dask at ``dask``, else one at a time."""
    if dask is None:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if dask == LOCAL:  # a single-threaded worker a core: each fit or batch has a core of its own
        return DaskTaskRunner(cluster_kwargs={"n_workers": os.cpu_count() or 1, "threads_per_worker": 1,
                                              "processes": True})
    return DaskTaskRunner(address=dask)


# Run in the temporary server's process before uvicorn: the kernel kills it when the process that
# started it dies, however it dies (Linux's PR_SET_PDEATHSIG), and it stops at once if that process
# is already gone.
_DIE_WITH_PARENT = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
if os.getppid() != parent:
    os._exit(0)
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""
_TEMPORARY_APIS: list[str] = []  # the URLs of the temporary servers this process runs


def prefect_api_configured() -> bool:
    """Whether flows here talk to a Prefect server (PREFECT_API_URL, from the environment or the
    profile) rather than the embedded API."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is not None


def api_is_temporary() -> bool:
    """Whether flows here report to a server of this process alone (`prefect_api`'s, or Prefect's
    own fallback), which cannot be shared with other processes' runs nor outlast this one."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return url is None or url in _TEMPORARY_APIS


@contextmanager
def prefect_api() -> Iterator[None]:
    """The Prefect API a command's flows report to: the configured one, or else a temporary server
    that dies with this process, even by ``kill -9`` (Prefect's own fallback outlives a killed
    parent). Its address is put in the environment, so Dask workers started here report to it too
    (a cluster on other machines needs a Prefect server of its own: PREFECT_API_URL on every worker)."""
    if prefect_api_configured():
        yield
        return
    from filelock import FileLock
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    server = _tied_server()
    home = get_current_settings().home
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / "fsad-server-start.lock"):  # one at a time migrates a new database
        server.start()
    _TEMPORARY_APIS.append(server.api_url)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    except (Exception, GeneratorExit):
        _leave(server)
        raise
    except BaseException:  # interrupted: the process is ending, and the server dies with it
        _TEMPORARY_APIS.remove(server.api_url)
        raise
    else:
        _leave(server)


def _leave(server: Any) -> None:
    """The server stopped once the logs and events queued for it are sent."""
    _drain_reports()
    os.environ.pop("PREFECT_API_URL", None)
    _TEMPORARY_APIS.remove(server.api_url)
    server.stop()


def _drain_reports(timeout_s: float = 10.0) -> None:
    """Send the logs and events still queued for the server while it is there: queued for a
    stopped one, they keep the process from exiting for a minute of retries."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s, at_exit=False)


def _tied_server() -> Any:
    """Prefect's temporary server, started through `_DIE_WITH_PARENT`."""
    import subprocess
    import sys

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class TiedServer(SubprocessASGIServer):
        _instances: dict[int | None, Any] = {}  # not shared with Prefect's own fallback server

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect's own command and environment (UI off, marked ephemeral), behind the launcher.
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), "--app-dir",
                 str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env,
                     **get_current_settings().to_environment_variables(exclude_unset=True)})

    return TiedServer()
