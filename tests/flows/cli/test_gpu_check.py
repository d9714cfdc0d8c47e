"""`make gpu-check` runs the same code on the CPU here: the comparison with the CPU record, and the
one-line refusal where no CUDA device is."""

import json
import re

import pytest
import torch

from flows.cli.gpu_check import main
from fsad_core.synthetic import make_category


def _record(path, category: str, auroc: float):
    path.write_text(json.dumps({"records": [{"category": category, "method": "fast", "k": 2, "seed": 0,
                                             "image_auroc": auroc}]}))
    return str(path)


def test_the_device_run_is_compared_with_the_cpu_record(tmp_path, capsys):
    make_category(tmp_path / "data" / "shop" / "washer", kind="object", n_train=3, n_test_good=4,
                  n_test_defect=4, size=96, seed=3)
    args = [str(tmp_path / "data" / "shop" / "washer"), "--method", "fast", "--k", "2", "--device", "cpu"]
    assert main(args + ["--cpu-record", _record(tmp_path / "wrong.json", "washer", -1.0)]) == 1
    line = capsys.readouterr().out
    assert "DIFFERS" in line and "images a second at batch 64" in line
    auroc = float(re.search(r"image AUROC (\d\.\d{4})", line).group(1))
    assert main(args + ["--cpu-record", _record(tmp_path / "same.json", "washer", auroc)]) == 0
    assert "DIFFERS" not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_a_cuda_device_it_says_so_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--cpu-record", _record(tmp_path / "r.json", "bottle", 0.99)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gpu-check: --device cuda asked for, but no CUDA device is available"
