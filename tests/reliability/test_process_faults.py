"""Faults of the ``fsad`` process itself, with no stack running (flows report to a temporary Prefect
server of the process): a retraining killed with SIGKILL frees its product at once and leaves no
server behind; Ctrl-C and SIGTERM end a run that waits for its product within seconds."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import CLEARED, Fsad, noise_rgb, png_bytes

from flows.store.storage import LocalStore
from flows.store.upload import upload_folder
from tests.tiny_training import TINY_TRAINING

PRODUCT = "gasket"
LONG_TRAINING = {**TINY_TRAINING, "finetune": {**TINY_TRAINING["finetune"], "steps": 100000, "patience": 100000}}
NEXT_RUN_WITHIN_S = 120  # the bound on a product freed from a killed run
INTERRUPTED_WITHIN_S = 5


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    home = tmp_path / "home"
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(2):
        (folder / f"{seed}.png").write_bytes(png_bytes(noise_rgb(seed)))
    upload_folder(LocalStore(home / "store"), PRODUCT, folder, upload_id="20260101T000000Z-first")
    return {**dict.fromkeys(CLEARED), "FSAD_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
            "FSAD_DEVICE": "cpu", "FSAD_GATE_MIN_AUROC": "0", "FSAD_TRAIN_OVERRIDES": json.dumps(LONG_TRAINING)}


def _retrain(env: dict[str, str | None], **more: str) -> Fsad:
    return Fsad({**env, **more}, "retrain", "--product", PRODUCT)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_within(processes: list[psutil.Process], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(_alive(p) for p in processes)


def _ended_within(run: Fsad, seconds: float) -> float:
    start = time.monotonic()
    try:
        run.proc.wait(timeout=seconds)
    except Exception:
        run.kill()
        raise AssertionError(f"still running {seconds} s after the signal:\n{run.output[-3000:]}") from None
    return time.monotonic() - start


@pytest.mark.timeout(900)
def test_a_killed_retraining_frees_its_product_at_once_and_a_waiting_one_can_be_interrupted(env):
    first = _retrain(env)
    waiting: list[Fsad] = []
    try:
        first.wait_for("fine-tuning on")
        server = psutil.Process(first.proc.pid).children(recursive=True)
        assert server, "the run has no temporary Prefect server"
        for sent in (signal.SIGINT, signal.SIGTERM):  # a run waiting for the product ends at once
            run = _retrain(env)
            waiting.append(run)
            run.wait_for("waiting for the retraining slot")
            time.sleep(2)
            assert "fine-tuning on" not in run.output  # the product is held
            helpers = psutil.Process(run.proc.pid).children(recursive=True)
            os.kill(run.proc.pid, sent)
            _ended_within(run, INTERRUPTED_WITHIN_S)
            assert run.proc.returncode == 130 and "fsad: interrupted" in run.output, run.output[-3000:]
            assert _gone_within(helpers, 10), f"{sent.name}: its temporary server outlived it"

        os.kill(first.proc.pid, signal.SIGKILL)  # the process alone, as the OOM killer would
        first.proc.wait(timeout=30)
        assert _gone_within(server, 10), "the killed run's temporary Prefect server outlived it"

        after = _retrain(env, FSAD_TRAIN_OVERRIDES=json.dumps(TINY_TRAINING))
        waiting.append(after)
        started = time.monotonic()
        after.wait_for("fine-tuning on", timeout_s=NEXT_RUN_WITHIN_S)
        assert time.monotonic() - started < NEXT_RUN_WITHIN_S
        assert after.finish() == 0, after.output[-3000:]
        assert "is now champion" in after.output
    finally:
        for run in (first, *waiting):
            run.kill()


def test_a_password_in_the_tracking_uri_reaches_no_console_log_or_prefect_record(env, tmp_path):
    """MLflow's messages repeat its URI: the password is moved out of it before MLflow sees it."""
    password = "s3cretPW-4kq"
    run = _retrain(env, MLFLOW_TRACKING_URI=f"http://fsad:{password}@127.0.0.1:1", FSAD_IO_RETRY_DELAYS="0",
                   MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", FSAD_TRAIN_OVERRIDES=json.dumps(TINY_TRAINING))
    assert run.finish() == 1
    assert "fsad retrain: MlflowException: API request to http://127.0.0.1:1/" in run.output, run.output[-2000:]
    leaks = [path for path in tmp_path.rglob("*") if path.is_file() and password.encode() in path.read_bytes()]
    assert password not in run.output and not leaks, leaks  # FSAD_HOME (run logs) and PREFECT_HOME (its records)


def test_two_retrainings_started_at_once_on_a_new_prefect_home_train_once_and_print_no_traceback(env):
    """Their temporary servers start one at a time (the first migrates the new database), and the
    product's lock lets one train while the other waits, then finds it trained."""
    runs = [_retrain(env, FSAD_TRAIN_OVERRIDES=json.dumps(TINY_TRAINING)) for _ in range(2)]
    assert [run.finish() for run in runs] == [0, 0], [run.output[-2000:] for run in runs]
    assert not [run.output for run in runs if "Traceback" in run.output]
    assert sorted("already trained" in run.output for run in runs) == [False, True]


@pytest.mark.parametrize("phase", ["validation of", "benchmark (", "logged run"])
def test_a_retraining_killed_at_any_stage_leaves_its_product_free_and_no_server(env, phase):
    """Killed after validation, while it logs to MLflow, or registering: whatever it held is freed
    with it (the stage it was in when the line came out is as good as any)."""
    tiny = json.dumps(TINY_TRAINING)
    first = _retrain(env, FSAD_TRAIN_OVERRIDES=tiny)
    try:
        first.wait_for(phase)
        server = psutil.Process(first.proc.pid).children(recursive=True)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        assert _gone_within(server, 10), "the killed run's temporary Prefect server outlived it"
        after = _retrain(env, FSAD_TRAIN_OVERRIDES=tiny)
        assert after.finish(timeout_s=NEXT_RUN_WITHIN_S + 60) == 0, after.output[-3000:]
        assert "is now champion" in after.output or "already trained" in after.output
        assert "Error logging to API" not in after.output  # its reports sent before its server stopped
    finally:
        first.kill()
