"""The benchmark grid on Dask (prefect-dask's DaskTaskRunner on a LocalCluster) gives the records of
the serial run: only the times differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsad_core.benchmark import grid
from fsad_core.synthetic import make_category

TIMES = {"fit_seconds", "score_ms_per_image", "peak_rss_mb", "backbone_ms_per_image"}
OPTIONS = ["--k", "1", "2", "--seeds", "0", "--methods", "pretrained", "fast", "--size", "64", "--patch-size", "96",
           "--device", "cpu"]


def bench(*args: str, out: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "flows.cli.main", "bench", *args, *OPTIONS, "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[3],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # as each Dask worker runs
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["records"]


@pytest.fixture(scope="module")
def categories(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    make_category(root / "washer", kind="object", n_train=2, n_test_good=3, n_test_defect=3, size=64, seed=5)
    make_category(root / "felt", kind="texture", n_train=1, n_test_good=3, n_test_defect=3, size=64, seed=6)
    return root


def test_the_grid_keeps_categories_together_and_names_what_it_skips(categories):
    cells, skipped = grid(sorted(categories.iterdir()), [1, 2], ["pretrained", "fast"], [0, 1])
    assert [(Path(c.root).name, c.k, c.method, c.seed) for c in cells] == [
        ("felt", 1, m, s) for m in ("pretrained", "fast") for s in (0, 1)] + [
        ("washer", k, m, s) for k in (1, 2) for m in ("pretrained", "fast") for s in (0, 1)]
    assert skipped == ["skip felt k=2: only 1 training images"]


def test_bench_on_a_local_dask_cluster_gives_the_serial_records(categories, tmp_path):
    serial = bench("--data", str(categories), out=tmp_path / "serial.json")
    spread = bench("--data", str(categories), "--dask", "local", out=tmp_path / "dask.json")
    assert len(serial) == 6  # felt k = 2 skipped
    assert [{k: v for k, v in r.items() if k not in TIMES} for r in spread] == \
        [{k: v for k, v in r.items() if k not in TIMES} for r in serial]
