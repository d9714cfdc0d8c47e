"""The command line as a user runs it: a real subprocess, real files, exit codes and outputs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli.commands import collect_images, decoded_batches, map_files
from flows.cli.main import (
    BACKBONE_DEFAULT,
    CORESET_HELP,
    FLIPS_HELP,
    MAP_SIGMA_HELP,
    PATCH_SIZE_HELP,
    ROTATION_HELP,
    SIZE_HELP,
    build_parser,
)
from flows.cli.main import main as cli_main
from fsad_core.augment import AugmentConfig
from fsad_core.config import DetectorConfig
from fsad_core.detector import Detector
from fsad_core.imageio import ImageLimits, ImageReadError, read_image
from fsad_core.methods import method_config
from fsad_core.synthetic import make_category

FSAD = [sys.executable, "-m", "flows.cli.main"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FSAD, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[3])


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_category(tmp_path_factory.mktemp("cli") / "washer", kind="object", n_train=4, n_test_good=4,
                         n_test_defect=4, size=64, seed=5)


def test_help_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("demo", "train", "score", "score-prefix", "bench", "report", "upload", "label", "settings", "retrain",
                "promote", "rollback", "pin", "review-queue", "review", "serve", "export", "stack"):
        assert cmd in out.stdout


def test_bad_input_exits_non_zero_with_one_line_reason(tmp_path):
    out = run("train", "--data", str(tmp_path / "missing"), "--k", "2", "--out", str(tmp_path / "m"))
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "missing: no such folder" in out.stderr


@pytest.mark.parametrize("target", ["1", "0", "five"])
def test_a_false_alarm_target_outside_zero_to_one_is_refused_before_any_fit(category, tmp_path, target):
    out = run("train", "--data", str(category), "--k", "2", "--out", str(tmp_path / "m"),
              "--false-alarm-target", target)
    assert out.returncode == 2 and "--false-alarm-target" in out.stderr
    assert not (tmp_path / "m").exists()


def test_train_then_score_writes_csv_and_maps_and_reports_bad_files(category, tmp_path):
    model = tmp_path / "model"
    out = run("train", "--data", str(category), "--k", "2", "--seed", "0", "--out", str(model),
              "--method", "pretrained", "--size", "64", "--patch-size", "64", "--score", "patch",
              "--false-alarm-target", "0.05", "--flips", "vertical", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    config = json.loads((model / "config.json").read_text())
    assert config["detector"]["score"] == "patch" and config["threshold"]["value"] > 0
    # --flips changes the method's augmentations and nothing else of them
    assert config["detector"]["augment"] == {**AugmentConfig().to_dict(), "hflip": False, "vflip": True,
                                             "crop_scale": list(AugmentConfig().crop_scale)}
    assert config["detector"]["target_false_alarm_rate"] == 0.05
    assert config["threshold"]["details"]["target_false_alarm_rate"] == 0.05
    images = tmp_path / "images"
    for p in [*sorted((category / "test" / "good").glob("*.png"))[:2], sorted((category / "test").rglob("*.png"))[-1]]:
        (images / p.parent.name).mkdir(parents=True, exist_ok=True)
        (images / p.parent.name / p.name).write_bytes(p.read_bytes())
    (images / "broken.png").write_bytes(b"not a png")
    scores, maps = tmp_path / "scores.csv", tmp_path / "maps"
    out = run("score", "--model", str(model), str(images), "--out", str(scores), "--maps", str(maps))
    assert out.returncode == 1  # one bad file
    assert "broken.png" in out.stderr and "3 scored, 1 failed" in out.stderr
    every = list(csv.DictReader(scores.open()))
    [broken] = [r for r in every if r["image"].endswith("broken.png")]  # a row with its error, flagged, no score
    assert broken["score"] == "" and broken["is_anomaly"] == "1" and "not a recognised image format" in broken["error"]
    rows = [r for r in every if r is not broken]
    assert len(rows) == 3 and {"image", "score", "is_anomaly", "error"} <= set(rows[0])
    # map files mirror the images' paths within the folder given: good/000.png and crack/000.png never collide
    assert sorted(p.relative_to(maps) for p in maps.rglob("*.png")) == sorted(
        p.relative_to(images).with_name(p.stem + "_map.png") for p in images.rglob("*.png") if p.name != "broken.png")
    direct = Detector.load(model, device="cpu")  # scored in batches: the same scores, in file order
    for row in rows:
        alone = direct.score([read_image(row["image"])]).scores[0]
        assert float(row["score"]) == pytest.approx(float(alone), rel=1e-5)
    assert [Path(r["image"]) for r in every] == sorted(images.rglob("*.png"))  # every image, in file order
    assert {r["model"] for r in rows} == {str(model)} and f"model {model}" in out.stderr

    # --json: JSON Lines with the model it used; --threshold decides instead of the model's threshold
    lines = tmp_path / "scores.jsonl"
    assert cli_main(["score", "--model", str(model), "--json", "--threshold", "-1", "--out", str(lines),
                     str(images / "good")]) == 0
    decisions = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [d["image"] for d in decisions] == [r["image"] for r in rows if "/good/" in r["image"]]
    assert all(d["is_anomaly"] is True and d["threshold"] == -1 and d["model"]["folder"] == str(model)
               and d["model"]["version"] is None for d in decisions)
    assert [d["score"] for d in decisions] == pytest.approx([float(r["score"]) for r in rows if "/good/" in r["image"]],
                                                            rel=1e-5)
    refused = run("score", "--model", str(model), "--threshold", "nan", str(images))
    assert refused.returncode == 2 and "not a finite number" in refused.stderr
    # raw maps beside the overlays: float arrays at the image's size, readable without pickle
    assert cli_main(["score", "--model", str(model), "--maps", str(tmp_path / "raw"), "--raw-maps",
                     str(images / "good")]) == 0
    for png in (images / "good").glob("*.png"):
        raw = np.load(tmp_path / "raw" / f"{png.stem}_map.npy", allow_pickle=False)
        assert raw.dtype == np.float32 and raw.shape == read_image(png).shape[:2] and np.isfinite(raw).all()
    assert cli_main(["score", "--model", str(model), "--raw-maps", str(images)]) == 1


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"fsad {version('fsad')}"


def test_inputs_mirror_their_paths_and_two_that_would_share_a_map_file_are_refused(tmp_path):
    for name in ("good/000.png", "crack/000.png", "crack/000.jpg", "single.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = collect_images([str(tmp_path / "good"), str(tmp_path / "single.png")])
    assert [(p.relative_to(tmp_path), m) for p, m in found] == [(Path("good/000.png"), Path("000.png")),
                                                                (Path("single.png"), Path("single.png"))]
    assert list(map_files(found).values()) == [Path("000_map.png"), Path("single_map.png")]
    everything = collect_images([str(tmp_path)])  # without --maps, files that differ in extension alone are fine
    assert len(everything) == 4
    with pytest.raises(ValueError, match="would share the map file crack/000_map.png"):
        map_files(everything)  # crack/000.png and crack/000.jpg
    with pytest.raises(ValueError, match="would share the map file 000_map.png"):
        map_files(collect_images([str(tmp_path / "good"), str(tmp_path / "crack" / "000.png")]))


def test_images_are_decoded_in_order_in_batches_with_the_reason_for_a_bad_one(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(paths[-1])
    paths[3].write_bytes(b"not a png")
    batches = list(decoded_batches(paths, ImageLimits(), size=2))
    assert [[p for p, _ in b] for b in batches] == [paths[:2], paths[2:4], paths[4:]]
    (_, bad), = [item for b in batches for item in b if item[0] == paths[3]]
    assert isinstance(bad, ImageReadError) and "not a recognised image format" in str(bad)
    assert [int(img[0, 0, 0]) for b in batches for p, img in b if p != paths[3]] == [0, 30, 60, 120]
    # two batches are held at once: each stays within half the set budget (40 x 40 = 1600 pixels an image)
    halves = list(decoded_batches(paths, ImageLimits(max_set_pixels=2 * 1600 * 2), size=8))
    assert [len(b) for b in halves] == [2, 3]  # the bad file counts no pixels


def test_bench_writes_the_json_contract(category, tmp_path):
    out_json, report = tmp_path / "r.json", tmp_path / "r.md"
    out = run("bench", "--data", str(category), "--k", "1", "2", "--seeds", "0", "--methods", "pretrained",
              "--backbone", "tf_efficientnet_lite1", "--size", "64", "--patch-size", "96", "--resize", "letterbox",
              "--pooling", "mean+std+max", "--coreset-candidates", "20000", "--map-sigma", "2",
              "--false-alarm-target", "0.05", "--flips", "none", "--rotation", "0",
              "--out", str(out_json), "--report", str(report), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out_json.read_text())
    assert len(result["records"]) == 2 and result["environment"]["timm"] and result["environment"]["cpu"]
    label = ("pretrained[backbone=tf_efficientnet_lite1][size=64][patch_size=96][resize=letterbox]"
             "[pooling=mean+std+max][coreset_candidates=20000][map_sigma=2.0][target_false_alarm_rate=0.05]"
             "[hflip=False][vflip=False][rotation_deg=0.0]")
    keys = {"dataset", "category", "method", "k", "seed", "image_auroc", "pixel_auroc", "aupro", "f1",
            "fit_seconds", "score_ms_per_image", "peak_rss_mb", "backbone_ms_per_image"}
    for r in result["records"]:
        assert keys <= set(r) and r["backbone_ms_per_image"] > 0
        assert 0 <= r["image_auroc"] <= 1 and r["pixel_auroc"] is not None
        # overrides never share a row with defaults
        assert r["method"] == label
    assert label in out.stdout and "± " in out.stdout
    assert report.read_text().startswith("| dataset/category")

    # fsad report merges this run with another (the later file wins for the same run key)
    rerun = [dict(r, image_auroc=0.5) for r in result["records"] if r["k"] == 2]
    other = tmp_path / "rerun.json"
    other.write_text(json.dumps({"records": rerun + [dict(rerun[0], seed=1, image_auroc=0.7)]}))
    merged = run("report", str(out_json), str(other), "--markdown")
    assert merged.returncode == 0, merged.stderr
    rows = {line.split(" | ")[2]: line for line in merged.stdout.splitlines()[2:]}
    assert rows["1"].split(" | ")[3] == "1" and rows["2"].split(" | ")[3] == "2"
    assert rows["2"].split(" | ")[4] == "0.600 ± 0.141"
    # --components: the image AUROC of each score component, from the records' components_auroc
    comps = run("report", str(out_json), "--components", "--markdown")
    assert comps.returncode == 0, comps.stderr
    head, _, *body = comps.stdout.splitlines()
    assert head.split(" | ")[4:] == ["mahalanobis_auroc", "patch_auroc", "fused_auroc", "either_auroc |"]
    k1 = next(r for r in result["records"] if r["k"] == 1)
    row = next(line for line in body if line.split(" | ")[2] == "1").split(" | ")
    assert row[5] == f"{k1['components_auroc']['patch']:.3f} ± 0.000"
    # --rates: what each model's own threshold does on the test images
    rates = run("report", str(out_json), "--rates", "--markdown")
    assert rates.returncode == 0, rates.stderr
    head, _, *body = rates.stdout.splitlines()
    assert head.split(" | ")[4:] == ["f1", "false_alarm_rate", "miss_rate", "best_miss_rate |"]
    row = next(line for line in body if line.split(" | ")[2] == "1").split(" | ")
    assert row[5] == f"{k1['false_alarm_rate']:.3f} ± 0.000"
    assert 0 <= k1["best_miss_rate"] <= k1["miss_rate"] or k1["false_alarm_rate"] > 0.01
    # --defect-types: the image AUROC of each defect type against all normal test images
    per_type = run("report", str(out_json), "--defect-types", "--markdown")
    assert per_type.returncode == 0, per_type.stderr
    head, _, *body = per_type.stdout.splitlines()
    types = sorted(k1["defect_type_auroc"])
    assert len(types) >= 2 and head.split(" | ")[4:] == [f"{t}_auroc" for t in types[:-1]] + [f"{types[-1]}_auroc |"]
    row = next(line for line in body if line.split(" | ")[2] == "1").split(" | ")
    assert row[4] == f"{k1['defect_type_auroc'][types[0]]:.3f} ± 0.000"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"records": [{key: v for key, v in r.items() if key != "defect_type_auroc"}
                                           for r in result["records"]]}))
    lacking = run("report", str(old), "--defect-types")
    assert lacking.returncode == 1 and "no per-defect-type AUROC" in lacking.stderr
    assert run("report", str(out_json), "--rates", "--components").returncode != 0
    bad = run("report", str(report))
    assert bad.returncode == 1 and "not a result file of fsad bench" in bad.stderr


def test_building_the_parser_imports_no_torch():
    # `fsad --help` and a mistyped option answer at once: the choices come from fsad_core.options
    code = ("import sys; from flows.cli.main import build_parser; build_parser().format_help(); "
            "print(sorted({'torch', 'torchvision', 'timm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_states_the_configs_defaults_and_bounds():
    # restated in words so that --help does not import torch
    config = DetectorConfig()
    assert f"the method's, {config.backbone})" in BACKBONE_DEFAULT
    assert f"the method's, {config.size})" in SIZE_HELP
    assert f"the method's, {config.patch_size}; fast: as --size)" in PATCH_SIZE_HELP
    assert method_config("fast").patch_side == method_config("fast").size
    assert f"the method's, {config.coreset_candidates}; at least {config.memory_max}" in CORESET_HELP
    assert f"the method's, {config.map_sigma:g};" in MAP_SIGMA_HELP
    assert f"the method's, {config.augment.flips})" in FLIPS_HELP
    assert f"the method's, {config.augment.rotation_deg:g})" in ROTATION_HELP


@pytest.mark.parametrize(("value", "parsed"), [("all", 0), ("0", 0), ("20000", 20000)])
def test_coreset_candidates_take_a_count_or_all(value, parsed):
    args = build_parser().parse_args(["train", "--data", "d", "--k", "2", "--out", "m", "--coreset-candidates", value])
    assert args.coreset_candidates == parsed


SIGMA_ARGV = ["bench", "--data", "d", "--out", "r.json", "--map-sigma"]


ROTATION_ARGV = ["train", "--data", "d", "--k", "2", "--out", "m", "--rotation"]


@pytest.mark.parametrize(("argv", "value", "parsed"), [
    (SIGMA_ARGV, "0", 0.0), (SIGMA_ARGV, "2", 2.0),  # a blur from 0 to below 64
    (ROTATION_ARGV, "0", 0.0), (ROTATION_ARGV, "15", 15.0), (ROTATION_ARGV, "180", 180.0)])  # 0 to 180 degrees
def test_bounded_number_options_take_values_within_their_bounds(argv, value, parsed):
    args = build_parser().parse_args([*argv, value])
    assert getattr(args, argv[-1].removeprefix("--").replace("-", "_")) == parsed


@pytest.mark.parametrize(("argv", "value"), [
    (SIGMA_ARGV, "-1"), (SIGMA_ARGV, "64"), (SIGMA_ARGV, "wide"),
    (ROTATION_ARGV, "-5"), (ROTATION_ARGV, "181"), (ROTATION_ARGV, "tilted")])
def test_bounded_number_options_refuse_values_outside_their_bounds(argv, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, value])
    assert exit_.value.code == 2 and argv[-1] in capsys.readouterr().err


def test_settings_sets_shows_and_clears_a_products_training_settings_and_refuses_bad_ones(tmp_path):
    env = {"FSAD_HOME": str(tmp_path / "home"), "FSAD_STORAGE": "", "FSAD_TRAIN_OVERRIDES": '{"size": 96}'}
    stored = tmp_path / "home" / "store" / "products" / "washer" / "training.json"
    good, bad, broken = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "broken.json"
    good.write_text('{"augment": {"hflip": false}, "map_sigma": 8}')
    bad.write_text('{"augment": {"rotation_deg": 400}}')
    broken.write_text("{augment")
    out = run("settings", "--product", "washer", env=env)
    assert out.returncode == 0 and "none" in out.stdout and not stored.exists()
    out = run("settings", "--product", "washer", "--set", str(good), env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(stored.read_text()) == {"augment": {"hflip": False}, "map_sigma": 8}
    assert '"map_sigma": 8' in run("settings", "--product", "washer", env=env).stdout
    for refused, reason in ((bad, "rotation_deg 400"), (broken, "not valid JSON")):
        out = run("settings", "--product", "washer", "--set", str(refused), env=env)
        assert out.returncode == 1 and reason in out.stderr and str(refused) in out.stderr
        assert json.loads(stored.read_text())["map_sigma"] == 8  # what was stored stays
    out = run("settings", "--product", "washer", "--clear", env=env)
    assert out.returncode == 0 and "none" in out.stdout and not stored.exists()
    assert run("settings", "--product", "../x", env=env).returncode == 1


def test_a_coreset_candidate_count_that_is_not_a_number_is_refused_before_any_fit(category, tmp_path):
    out = run("train", "--data", str(category), "--k", "2", "--out", str(tmp_path / "m"),
              "--coreset-candidates", "many")
    assert out.returncode == 2 and "--coreset-candidates" in out.stderr and "'many'" in out.stderr
    assert not (tmp_path / "m").exists()


def test_outputs_that_would_overwrite_an_input_are_refused_before_anything_is_written(tmp_path, capsys):
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / "part.png")
    Image.fromarray(np.full((40, 40, 3), 20, np.uint8)).save(tmp_path / "part_map.png")  # named like an overlay
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{}")  # passes the command's first look; never loaded
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    no_model = str(tmp_path / "no-model")
    assert cli_main(["score", "--model", no_model, str(tmp_path / "part.png"), "--out",
                     str(tmp_path / "." / "part.png")]) == 1
    assert cli_main(["score", "--model", no_model, str(tmp_path), "--maps", str(tmp_path)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--out would write" in errors[0] and "--maps would write" in errors[1]
    assert all("which is one of the images to score" in e for e in errors)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_csv_cell_that_begins_like_a_formula_is_written_as_text(tmp_path):
    from flows.cli.commands import CsvRows, ModelSource, csv_text
    from fsad_core.decision import Decision

    assert csv_text("=cmd|' -C calc'!A0.png") == "'=cmd|' -C calc'!A0.png"
    assert [csv_text(t) for t in ("+1.png", "-x.png", "@sum.png", "\tx.png", "part.png")] == [
        "'+1.png", "'-x.png", "'@sum.png", "'\tx.png", "part.png"]
    with (tmp_path / "scores.csv").open("w", newline="") as out:
        CsvRows(out, ModelSource(Path("m")))(Decision("=cmd|' -C calc'!A0.png", 0.5, True, 0.4))
    rows = list(csv.reader((tmp_path / "scores.csv").open()))
    assert rows[1][0] == "'=cmd|' -C calc'!A0.png"


@pytest.mark.parametrize("argv", [["--product", "../../../../outside/evil"],
                                  ["--product", "washer", "--upload", "../up"]])
def test_retrain_refuses_an_unsafe_product_or_upload_before_it_writes_anything(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.setenv("FSAD_HOME", str(tmp_path / "home" / "a" / "b" / "c"))
    assert cli_main(["retrain", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "StorageKeyError: invalid" in err
    assert not list(tmp_path.rglob("*"))  # no log file, inside FSAD_HOME or out of it
