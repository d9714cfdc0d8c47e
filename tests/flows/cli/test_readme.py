"""The README's Python example and serving recipe, run as written after `fsad demo` (a user's
~/.fsad in a home of the test's own), with the demo's part and with an image over 150 KB."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def readme_block(section: str, language: str) -> str:
    """The one ``language`` fenced block of the README's section ``section``."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(rf"```{language}\n(.*?)```", body, re.S)
    return block


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict[str, str]:
    """A fresh user's environment after `fsad demo`: HOME of its own, fsad on the PATH."""
    home = tmp_path_factory.mktemp("user")
    env = {"HOME": str(home), "PATH": f"{BIN}:/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(BIN / "fsad"), "demo"], env=env, cwd=home, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return env


def big_part(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(60, 200, (360, 360, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    assert path.stat().st_size > 150_000
    return path


def test_the_serving_recipe_runs_as_written_and_answers_in_strict_json(user, tmp_path):
    recipe = readme_block("How a line calls the model", "sh")
    post = "\n".join(line for line in recipe.splitlines() if line.startswith(("python3", "curl")))
    big = f"{sys.executable} -c 'import pathlib, tests.flows.cli.test_readme as t; t.big_part(pathlib.Path(\"p.png\"))'"
    script = f"set -e\n{recipe}\necho\n{big}\nmv p.png part.png\n{post}\necho\n"
    out_file, err_file = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_file.open("w") as stdout, err_file.open("w") as stderr:  # files: the server keeps a pipe open
        shell = subprocess.Popen(["bash", "-c", script], env={**user, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                                 stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            shell.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGTERM)  # the server the recipe left running
    out = out_file.read_text()
    assert shell.returncode == 0, err_file.read_text()[-3000:]
    answers = [json.loads(line, parse_constant=pytest.fail) for line in out.splitlines() if line.startswith("{")]
    assert len(answers) == 2, out
    for answer in answers:
        [row] = answer["predictions"]
        assert row["error"] == "" and isinstance(row["score"], float) and row["model_name"] == "fsad-demo-washer"
    assert (tmp_path / "part.png").stat().st_size > 150_000


def test_the_python_example_runs_as_written(user, tmp_path, monkeypatch):
    home = Path(user["HOME"])
    big_part(tmp_path / "part.png")
    monkeypatch.chdir(tmp_path)
    names = {"normal_paths": sorted((home / ".fsad/demo/upload-set/train/good").glob("*.png"))}
    exec(readme_block("In Python", "python"), names)  # noqa: S102 - the README's own example
    result = names["result"]
    assert np.isfinite(result.scores).all() and result.raw_threshold == names["detector"].threshold.value
    assert (tmp_path / "washer-model" / "config.json").is_file()


def test_the_pipeline_commands_run_as_written(user, tmp_path):
    from flows.cli.demo import DEMO_TRAINING

    text = (ROOT / "README.md").read_text().split("\n## The pipeline\n", 1)[1]
    commands = [line.strip() for line in text.split("\n\n", 1)[0].splitlines() if line.strip().startswith("fsad ")]
    assert [c.split()[1] for c in commands] == ["upload", "retrain"]
    env = {**user, "FSAD_TRAIN_OVERRIDES": json.dumps(DEMO_TRAINING)}  # the demo's small settings: quicker
    done = subprocess.run(["bash", "-c", "set -e\n" + "\n".join(commands)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "washer" in done.stdout and "champion" in done.stdout


def test_the_export_recipe_runs_as_written(user, tmp_path):
    recipe = readme_block("Running without torch: ONNX", "sh")
    done = subprocess.run(["bash", "-c", "set -e\n" + recipe], env=user, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    fsad_row, line_answer = done.stdout.splitlines()[-2:]
    score, flagged = line_answer.split()
    assert fsad_row.startswith("part.png,") and abs(float(fsad_row.split(",")[1]) - float(score)) < 1e-5
    assert fsad_row.split(",")[2] == str(int(flagged == "True"))
    assert json.loads((tmp_path / "washer-onnx" / "model.json").read_text())["check"]["decisions_identical"]
