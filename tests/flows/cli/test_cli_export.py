"""`fsad export` and `fsad score --runtime onnx` as a user runs them, and the export run where only
onnxruntime, NumPy and Pillow are installed."""

import csv
import io
import json
import subprocess
import sys
import textwrap

import pytest

from fsad_core.synthetic import make_category
from tests.flows.cli.test_cli import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model `fsad train` wrote (it records its training images), and its export."""
    root = tmp_path_factory.mktemp("export")
    category = make_category(root / "washer", kind="object", n_train=4, n_test_good=4, n_test_defect=6, size=80,
                             seed=7)
    model, exported = root / "model", root / "exported"
    out = run("train", "--data", str(category), "--k", "3", "--out", str(model), "--method", "fast", "--size", "64")
    assert out.returncode == 0, out.stderr
    out = run("export", "--model", str(model), "--format", "onnx", "--out", str(exported))
    assert out.returncode == 0, out.stderr
    assert "checked on 6 images, 3 of the model's and a defect made on each" in out.stdout
    return category, model, exported


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_score_with_onnxruntime_gives_the_torch_decisions(trained):
    category, model, exported = trained
    with_torch, with_onnx = (run("score", "--model", str(model), str(category / "test")),
                             run("score", "--runtime", "onnx", "--model", str(exported), str(category / "test")))
    assert with_torch.returncode == with_onnx.returncode == 0, with_onnx.stderr
    torch_rows, onnx_rows = _rows(with_torch.stdout), _rows(with_onnx.stdout)
    assert len(onnx_rows) == 10 and [r["image"] for r in onnx_rows] == [r["image"] for r in torch_rows]
    assert [r["is_anomaly"] for r in onnx_rows] == [r["is_anomaly"] for r in torch_rows]
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(onnx_rows, torch_rows)) <= 1e-3
    assert {r["model"] for r in onnx_rows} == {str(exported)}


def test_wrong_uses_are_refused_in_one_line(trained, tmp_path):
    category, model, exported = trained
    not_exported = run("score", "--runtime", "onnx", "--model", str(model), str(category / "test"))
    assert not_exported.returncode == 1 and "fsad export --model MODEL --format onnx" in not_exported.stderr
    maps = run("score", "--runtime", "onnx", "--model", str(exported), "--maps", str(tmp_path / "m"),
               str(category / "test"))
    assert maps.returncode == 1 and "--maps draws with the torch runtime" in maps.stderr
    again = run("export", "--model", str(model), "--out", str(exported))
    assert again.returncode == 1 and "not an empty folder" in again.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model / "config.json").read_text().replace('"training_images"', '"x"'))
    for name in ("network.safetensors", "scoring.safetensors"):
        (bare / name).write_bytes((model / name).read_bytes())
    no_images = run("export", "--model", str(bare), "--out", str(tmp_path / "e"))
    assert no_images.returncode == 1 and "give --images" in no_images.stderr
    assert not (tmp_path / "e").exists()


CHECK = textwrap.dedent("""
    import importlib.util, json, sys
    assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("fsad_core") is None
    from fsad_runtime import ExportedModel, read_rgb
    model = ExportedModel(".", threads=1)
    print(json.dumps([[path, model.score(read_rgb(path)).is_anomaly, model.score(read_rgb(path)).score]
                      for path in sys.argv[1:]]))
""")


def test_the_export_runs_where_only_onnxruntime_numpy_and_pillow_are_installed(trained, tmp_path):
    category, model, exported = trained
    venv = tmp_path / "line"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "onnxruntime",
                    "numpy", "pillow"], check=True, timeout=600, capture_output=True)
    images = sorted(str(p) for p in (category / "test").rglob("*.png"))
    line = subprocess.run([str(python), "-I", "-c", f"import sys; sys.path.insert(0, '.'); {CHECK}", *images],
                          cwd=exported, capture_output=True, text=True, timeout=300)
    assert line.returncode == 0, line.stderr
    torch_rows = {r["image"]: r for r in _rows(run("score", "--model", str(model), *images).stdout)}
    for path, is_anomaly, score in json.loads(line.stdout):
        assert int(is_anomaly) == int(torch_rows[path]["is_anomaly"])
        assert abs(score - float(torch_rows[path]["score"])) <= 1e-3
