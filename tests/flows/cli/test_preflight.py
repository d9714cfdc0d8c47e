"""Refusals before anything heavy: a wrong path, an unknown product or model, a product with no
upload each cost one line, in under 3 s, with neither torch nor Prefect imported, and the line says
what would fix it."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[3]
RUN = ("import json, sys\nfrom flows.cli.main import main\nrc = main(sys.argv[1:])\n"
       "print(json.dumps({'rc': rc, 'heavy': sorted(m for m in ('torch', 'prefect') if m in sys.modules)}))")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An FSAD_HOME whose registry exists and is warm (one unrelated model), and a folder of images."""
    home = tmp_path_factory.mktemp("home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model("fsad-other")
    (home / "images").mkdir()
    (home / "images" / "a.png").write_bytes(b"\x89PNG")
    (home / "flat").mkdir()
    (home / "empty" / "train" / "good").mkdir(parents=True)
    return home


CASES = {
    "missing data folder": (["train", "--data", "{home}/nope", "--k", "4", "--out", "{home}/m"], "no such folder"),
    "no train/good": (["train", "--data", "{home}/flat", "--k", "4", "--out", "{home}/m"],
                      "no train/good folder (expected the MVTec layout"),
    "no training images": (["train", "--data", "{home}/empty", "--k", "4", "--out", "{home}/m"],
                           "{home}/empty/train/good: no images"),
    "unknown product": (["retrain", "--product", "ghost"],
                        "no complete upload of product ghost in {home}/store; `fsad upload --product ghost FOLDER`"),
    "no such upload": (["retrain", "--product", "ghost", "--upload", "20260101T000000Z-aaaaaa"],
                       "upload 20260101T000000Z-aaaaaa of product ghost in {home}/store: not found"),
    "unknown model": (["score", "--model", "models:/fsad-ghost@champion", "{home}/images"],
                      "not in the registry at sqlite:///{home}/mlflow.db; `fsad retrain --product ghost` registers"),
    "no champion to score a prefix": (["score-prefix", "ghost", "{home}/images"], "`fsad retrain --product ghost`"),
    "not a model folder": (["score", "--model", "{home}/flat", "{home}/images"],
                           "not a model folder (no config.json); `fsad train --data DIR --k K --out"),
    "missing image": (["score", "--model", "{home}/flat", "{home}/nope.png"], "{home}/nope.png: no such file"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_command_is_refused_in_one_line_in_a_moment_before_anything_heavy(home, case):
    argv, expected = CASES[case]
    argv = [a.format(home=home) for a in argv]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "FSAD_HOME": str(home)}
    times = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", RUN, *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        times.append(time.perf_counter() - start)
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"fsad {argv[0]}: NotReady: ") and expected.format(home=home) in line, line
    assert json.loads(done.stdout) == {"rc": 1, "heavy": []}
    assert statistics.median(times) < 3.0, times
