"""`make bench-replay`'s runner: the days' parts and a replay on a generated category."""

from __future__ import annotations

import json

import numpy as np

from flows.cli import replay_bench
from fsad_core.synthetic import make_category


def test_each_day_takes_new_parts_at_the_defect_share():
    labels = np.asarray([0] * 300 + [1] * 60)
    days = replay_bench.day_parts(labels, 5, 60, 0.1, np.random.default_rng(0))
    taken = np.concatenate(days)
    assert len(taken) == len(set(taken.tolist())) == 300  # no part twice
    assert all(labels[d].sum() == 6 and len(d) == 60 for d in days)


def test_a_replay_sets_the_benchmark_against_the_truth_of_the_same_model(tmp_path):
    root = make_category(tmp_path / "washer", kind="object", n_train=6, n_test_good=60, n_test_defect=30, size=64)
    out = tmp_path / "replay.json"
    assert replay_bench.main(["--data", str(root), "--days", "3", "--per-day", "30", "--reviews", "20",
                              "--defect-share", "0.3", "--benchmark-share", "0.9", "--replays", "5",
                              "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["labelled_days"] > 0 and 0 <= record["coverage"] <= 1 and 0 < record["mean_interval_width"] <= 1
    assert record["mean_absolute_gap"] >= abs(record["mean_gap"])
