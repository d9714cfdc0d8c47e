"""A command's flow logs: progress on the console, the whole record (tracebacks included) in a file.

Prefect reports a failed task or flow run on the console with its full traceback, several times
over; a person running ``fsad retrain`` needs the one-line reason and where to read more. While
`logged_to` is active, every log record also goes to the file; the console keeps its own format
but shows no traceback and none of Prefect's failure reports (the command prints the reason
itself), and a failure raised through the block is written to the file with its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

_FAILURE_REPORTERS = ("prefect.flow_runs", "prefect.task_runs")  # their ERROR records restate the failure
_FILE_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"


def run_log_path(home: Path, command: str, subject: str) -> Path:
    """``HOME/logs/COMMAND-SUBJECT-UTCTIME.log`` (the folder is created)."""
    folder = home / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{subject}-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.log"


class _WithoutTraceback(logging.Formatter):
    """Another formatter's output with the record's traceback and stack left out."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _not_a_failure_report(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.name.startswith(_FAILURE_REPORTERS))


@contextlib.contextmanager
def logged_to(path: Path) -> Iterator[Path]:
    """Every log record into ``path`` as well; the console's handlers quiet as the module says."""
    root = logging.getLogger()
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    saved = [h.formatter for h in consoles]
    for handler in consoles:
        handler.setFormatter(_WithoutTraceback(handler.formatter))
        handler.addFilter(_not_a_failure_report)
    root.addHandler(file_handler)
    try:
        yield path
    except BaseException:  # failed outside a flow or task run too (the server did not start, ...)
        file_handler.handle(logging.LogRecord(__name__, logging.ERROR, __file__, 0, "the command failed", None,
                                              sys.exc_info()))
        raise
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
        for handler, formatter in zip(consoles, saved):
            handler.setFormatter(formatter)
            handler.removeFilter(_not_a_failure_report)
