"""`make bench-negatives`' runner on a generated category."""

from __future__ import annotations

import json

from flows.cli import negatives_bench
from fsad_core.data import load_category
from fsad_core.synthetic import make_category


def test_both_fits_score_the_same_images_and_the_drawn_defects_are_never_scored(tmp_path):
    root = make_category(tmp_path / "washer", kind="object", n_train=3, n_test_good=4, n_test_defect=5, size=64)
    out = tmp_path / "negatives.json"
    assert negatives_bench.main(["--data", str(root), "--method", "pretrained", "--k", "2", "--seeds", "0",
                                 "--defects", "2", "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["defects"] == 2 and record["images"] == len(load_category(root).test) - 2
    assert record["difference"] == 0.0  # no fine-tuning: the defects change nothing
    negatives_bench.main(["--data", str(root), "--method", "pretrained", "--k", "2", "--seeds", "0",
                          "--out", str(out)])
    assert len(json.loads(out.read_text())["records"]) == 1  # a finished (set, seed) is not run again
