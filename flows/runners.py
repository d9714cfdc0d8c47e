"""Where a flow's tasks run: one after another in the flow's process, or spread over a Dask cluster
through prefect-dask's ``DaskTaskRunner`` (``"local"``: a LocalCluster of this machine's cores;
``"tcp://HOST:8786"``: a running scheduler)."""

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


def prefect_api_configured() -> bool:
    """Whether flows here talk to a Prefect server (PREFECT_API_URL, from the environment or the
    profile) rather than the embedded API."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url is not None


@contextmanager
def api_for_workers() -> Iterator[None]:
    """Dask workers report their task runs to the Prefect API. Where none is configured, a temporary
    one is started for the run and its address put in the environment the workers inherit (a
    cluster on other machines needs a Prefect server of its own: PREFECT_API_URL on every worker)."""
    if prefect_api_configured():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's own client falls back to; it stops it at exit
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield
    finally:
        del os.environ["PREFECT_API_URL"]
