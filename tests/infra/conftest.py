"""A real local stack (Swift S3, MLflow, Prefect) for the integration tests of this folder.

Free ports and a temporary FSAD_HOME, so a stack the user runs on the default ports is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.config import TELEMETRY_OFF, free_port_env
from infra.stack import StackInfo, running


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    home = tmp_path_factory.mktemp("fsad-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**free_port_env(), **TELEMETRY_OFF}.items():
            mp.setenv(key, value)
        with running(home) as info:
            yield info
