"""Bad and unusual input at the level a user meets it: ``fsad upload`` / upload_folder, the
retraining flow (embedded store, SQLite MLflow, Prefect test API) and ``fsad score``.

Every refusal names the file and the reason in one line, and nothing is lost: a refused upload
writes nothing, a rejected upload is copied (never moved) to quarantine, an incomplete upload is
reported and kept.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import bomb_png, embedded_env, noise_rgb, png_bytes
from PIL import Image

from flows.cli.main import main as cli_main
from flows.mlops import registry
from flows.pipeline.retrain import NoUpload, retrain_flow
from flows.pipeline.scheduled import STALE_UPLOAD_S, plan_product
from flows.settings import load_settings
from flows.store.storage import (
    LocalStore,
    StorageKeyError,
    list_uploads,
    manifest_key,
    open_store,
    quarantine_prefix,
    stale_incomplete_uploads,
    upload_prefix,
)
from flows.store.upload import ManifestError, UploadError, content_sha256, upload_folder
from fsad_core.imageio import read_image

REPO = Path(__file__).resolve().parents[2]
P = "bolt"


@pytest.fixture(scope="module")
def home(tmp_path_factory, prefect_api):
    home = tmp_path_factory.mktemp("fsad-home")
    with pytest.MonkeyPatch.context() as mp:
        embedded_env(mp, home)
        mp.setenv("FSAD_GATE_MIN_AUROC", "0")  # these tests are about input, not model quality
        yield home


def versions(product: str) -> list[str]:
    from mlflow.exceptions import MlflowException
    try:
        found = mlflow.MlflowClient().search_model_versions(f"name = '{registry.model_name(product)}'")
    except MlflowException:
        return []
    return sorted(str(v.version) for v in found)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def good_folder(root: Path, n: int = 2, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"good_{i}.png").write_bytes(png_bytes(noise_rgb(seed + i)))
    return root


def _jpeg(arr: np.ndarray) -> bytes:
    return png_bytes(arr, format="JPEG", quality=90)


BAD = {  # file name -> (bytes, the reason the one-line message must give)
    "zero.png": (lambda: b"", "empty file (0 bytes)"),
    "truncated.png": (lambda: png_bytes(noise_rgb(7))[:600], "corrupt or truncated"),
    "truncated.jpg": (lambda: _jpeg(noise_rgb(8))[:700], "corrupt or truncated"),
    "page.png": (lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "not a recognised image format"),
    "bomb.png": (lambda: bomb_png(30000, 30000), "refused, too many pixels"),
    "thin.png": (lambda: png_bytes(np.full((1, 20000), 128, np.uint8)),  # one tile per pixel, once
                 "refused, 20000x1: the shorter side is below the minimum of 32 px"),
}


# ---- fsad upload --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD))
def test_upload_refuses_a_bad_file_naming_it_and_writes_nothing(name, tmp_path, capsys):
    data, reason = BAD[name][0](), BAD[name][1]
    folder = good_folder(tmp_path / "set")
    (folder / name).write_bytes(data)
    before = tree(folder)
    store = LocalStore(tmp_path / "store")

    with pytest.raises(UploadError) as err:
        upload_folder(store, P, folder)
    assert name in str(err.value) and reason in str(err.value) and "nothing uploaded" in str(err.value)
    assert store.list() == []  # nothing written
    assert tree(folder) == before  # and nothing touched at the source

    os.environ["FSAD_STORAGE"] = str(tmp_path / "cli-store")
    try:
        assert cli_main(["upload", "--product", P, str(folder)]) == 1
    finally:
        del os.environ["FSAD_STORAGE"]
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and name in err_lines[0] and reason in err_lines[0]
    assert LocalStore(tmp_path / "cli-store").list() == []


def test_pixel_limit_is_configurable_and_checked_before_decoding(tmp_path):
    """FSAD_MAX_PIXELS lowers the limit for the whole CLI; the refusal comes from the header."""
    folder = good_folder(tmp_path / "set", n=1)
    (folder / "big.png").write_bytes(png_bytes(noise_rgb(3, w=100, h=50)))  # 5000 pixels
    env = {k: v for k, v in os.environ.items() if k not in ("FSAD_STORAGE",)}
    env.update(FSAD_MAX_PIXELS="4500", FSAD_STORAGE=str(tmp_path / "store"))
    proc = subprocess.run([sys.executable, "-m", "flows.cli.main", "upload", "--product", P, str(folder)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "big.png: refused, 100x50 = 5000 pixels exceeds the limit of 4500" in proc.stderr
    assert not (tmp_path / "store").exists() or LocalStore(tmp_path / "store").list() == []
    # 64x64 = 4096 pixels is under the limit: the same folder without big.png uploads
    (folder / "big.png").unlink()
    proc = subprocess.run([sys.executable, "-m", "flows.cli.main", "upload", "--product", P, str(folder)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _cli_upload_fails(folder: Path, store_root: Path, capsys, **env: str) -> str:
    """``fsad upload`` with the settings given: exit 1, one stderr line (returned), nothing stored."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSAD_STORAGE", str(store_root))
        for name, value in env.items():
            mp.setenv(name, value)
        assert cli_main(["upload", "--product", P, str(folder)]) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1, err_lines
    assert not store_root.exists() or LocalStore(store_root).list() == []
    return err_lines[0]


@pytest.mark.parametrize("variable", ["FSAD_MAX_PIXELS", "FSAD_MAX_FILE_BYTES", "FSAD_MAX_SET_PIXELS"])
def test_a_bad_limit_setting_is_named(variable, tmp_path, capsys):
    line = _cli_upload_fails(good_folder(tmp_path / "set"), tmp_path / "store", capsys, **{variable: "lots"})
    assert line == f"fsad upload: LimitSettingError: {variable}='lots': not a whole number"


def test_a_file_over_the_byte_limit_is_refused_without_being_read(tmp_path, capsys, monkeypatch):
    """A 1 GB non-image named .png (sparse here) is refused from its size: never read into memory."""
    folder = good_folder(tmp_path / "set")
    huge = folder / "huge.png"
    with huge.open("wb") as fh:
        fh.truncate(1 << 30)
    read: list[str] = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real(self))
    line = _cli_upload_fails(folder, tmp_path / "store", capsys)
    assert f"huge.png: refused, {1 << 30} bytes exceeds the per-file limit of {128 << 20} (FSAD_MAX_FILE_BYTES)" \
        in line
    assert "huge.png" not in read


def test_a_set_over_the_pixel_budget_is_refused_at_upload_and_in_the_flow(home, tmp_path, capsys):
    """Decoded pixels of a whole upload are held at once in training: a budget, checked before any
    write at upload and by validation (quarantined) for an upload that got in by other means."""
    folder = good_folder(tmp_path / "set", n=3)  # 3 x 64 x 64 = 12288 pixels
    line = _cli_upload_fails(folder, tmp_path / "store", capsys, FSAD_MAX_SET_PIXELS="10000")
    assert line.endswith(f"{folder}: refused, its 3 images hold 12288 decoded pixels, above the budget of 10000 "
                         f"(FSAD_MAX_SET_PIXELS); nothing uploaded")
    product, uid = "pin", "20260101T000007Z-budget"
    upload_folder(open_store(), product, folder, upload_id=uid)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSAD_MAX_SET_PIXELS", "10000")
        _assert_rejected(product, uid, "decoded pixels of the upload within 10000 (FSAD_MAX_SET_PIXELS): "
                                       "observed 12288")


def _unusual_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the RGB array it must decode to (JPEG: approximately))."""
    rng = np.random.default_rng(5)
    out: dict[str, tuple[bytes, np.ndarray]] = {}
    g16 = (rng.integers(0, 256, size=(48, 64)).astype(np.uint16) * 257)  # 16-bit grey, exact in 8 bits
    out["grey16.png"] = (png_bytes(Image.fromarray(g16)), np.repeat((g16 // 257).astype(np.uint8)[..., None], 3, 2))
    grey = rng.integers(30, 220, size=(48, 64), dtype=np.uint8)
    out["grey.png"] = (png_bytes(Image.fromarray(grey)), np.repeat(grey[..., None], 3, 2))
    rgb = noise_rgb(11, 64, 48)
    pal = Image.fromarray(rgb).quantize(colors=32)
    out["palette.png"] = (png_bytes(pal), np.asarray(pal.convert("RGB")))
    rgba = np.dstack([rgb, np.full((48, 64), 255, np.uint8)])
    rgba[:, :8, 3] = 0  # transparent stripe: composited on black
    expect = rgb.copy()
    expect[:, :8] = 0
    out["rgba.png"] = (png_bytes(Image.fromarray(rgba)), expect)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    out["cmyk.jpg"] = (png_bytes(cmyk, format="JPEG", quality=95), rgb)  # lossy: compared on average
    return out


def test_sixteen_bit_palette_cmyk_rgba_and_grey_in_one_set_are_converted_and_trained(home, tmp_path):
    """Every image is converted to RGB when read, so one set may mix grey, colour, alpha, palette
    and 16-bit files: stored as uploaded, validated, trained and promoted."""
    images = _unusual_images()
    folder = tmp_path / "set"
    folder.mkdir()
    for name, (data, _) in images.items():
        (folder / name).write_bytes(data)
    store, product = open_store(), "modes"
    result = upload_folder(store, product, folder, upload_id="20260101T000000Z-modes1")
    modes = {f["key"].rsplit("/", 1)[1]: f["mode"] for f in result.manifest["files"]}
    assert modes == {"grey16.png": "I;16", "grey.png": "L", "palette.png": "P", "rgba.png": "RGBA",
                     "cmyk.jpg": "CMYK"}
    prefix = upload_prefix(product, result.upload_id)
    for name, (data, expected) in images.items():
        assert store.get_bytes(f"{prefix}train/good/{name}") == data  # stored as uploaded
        arr = read_image(store.get_bytes(f"{prefix}train/good/{name}"), name=name)
        assert arr.dtype == np.uint8 and arr.shape == (48, 64, 3), name
        diff = np.abs(arr.astype(int) - expected.astype(int))
        if name.endswith(".jpg"):  # colours right (not inverted CMYK), up to JPEG loss
            assert diff.mean() < 4, name
        else:
            assert diff.max() <= 1, name
    summary = retrain_flow(product, upload_id=result.upload_id)
    assert summary["status"] == "promoted" and summary["k"] == len(images), summary["message"]


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (220, 30, 30)  # left half red, right half blue as stored
    stored[:, 32:] = (30, 30, 220)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = png_bytes(img, format="JPEG", quality=95, exif=exif.tobytes())
    folder = good_folder(tmp_path / "set", n=0)
    (folder / "rotated.jpg").write_bytes(data)
    result = upload_folder(LocalStore(tmp_path / "store"), P, folder)
    (entry,) = result.manifest["files"]
    assert (entry["width"], entry["height"]) == (32, 64)  # as the model sees it
    arr = read_image(data, name="rotated.jpg")
    assert arr.shape == (64, 32, 3)
    assert arr[5, 16, 0] > 180 and arr[5, 16, 2] < 80  # top: what was the left (red) half
    assert arr[58, 16, 2] > 180 and arr[58, 16, 0] < 80  # bottom: the right (blue) half


def test_file_names_that_are_not_safe_keys_are_refused_and_nothing_is_written(tmp_path):
    folder = good_folder(tmp_path / "set")
    bad_names = [b"back\\slash.png", b"bell\x07.png", b"newline\n.png", b"latin1-\xe9.png"]
    for raw in bad_names:
        with open(os.path.join(os.fsencode(folder), raw), "wb") as fh:
            fh.write(png_bytes(noise_rgb(len(raw))))
    store = LocalStore(tmp_path / "store")
    outside = tree(tmp_path)
    with pytest.raises(UploadError) as err:
        upload_folder(store, P, folder)
    msg = str(err.value)
    assert "4 bad file(s)" in msg and msg.count("unusable file name") == 4
    assert "backslash" in msg and "control characters" in msg and "not valid UTF-8" in msg
    assert "\n" not in msg  # one line, even for a name with a newline in it
    assert store.list() == [] and tree(tmp_path) == outside


@pytest.mark.parametrize("key", ["../escape.png", "products/p/../../../escape.png", "/tmp/escape.png",
                                 "products\\p\\x.png", "products/p/\x00x.png", "products/p/\x1b[31m.png",
                                 "products/p/\udcff.png", "C:/escape.png", "products//p/x.png"])
def test_unsafe_object_keys_are_rejected_by_the_store(key, tmp_path):
    root = tmp_path / "root" / "store"
    store = LocalStore(root)
    before = tree(tmp_path)
    for call in (lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.exists(key),
                 lambda: store.copy("products/p/a.png", key), lambda: store.delete(key)):
        with pytest.raises(StorageKeyError):
            call()
    assert tree(tmp_path) == before
    assert not Path("/tmp/escape.png").exists()


@pytest.mark.parametrize("product,upload_id", [("../evil", None), ("/abs", None), ("ok", "../../escape"),
                                               ("ok", "a/b"), ("bad\\name", None), ("ok", ".hidden")])
def test_unsafe_product_or_upload_id_is_refused_before_anything_is_written(product, upload_id, tmp_path):
    folder = good_folder(tmp_path / "set")
    store = LocalStore(tmp_path / "root" / "store")
    with pytest.raises(StorageKeyError):
        upload_folder(store, product, folder, upload_id=upload_id)
    assert store.list() == [] and sorted(p.name for p in (tmp_path / "root").iterdir()) == ["store"]


# ---- through the retraining flow ------------------------------------------------------------

def _assert_rejected(product: str, upload_id: str, *expectations: str) -> None:
    """The flow fails naming each expectation, the upload is quarantined whole, no version exists."""
    state = retrain_flow(product, upload_id=upload_id, return_state=True)
    assert state.is_failed(), state
    for expectation in expectations:
        assert expectation in state.message
    store = open_store()
    src, dst = upload_prefix(product, upload_id), quarantine_prefix(product, upload_id)
    originals = {k[len(src):]: store.get_bytes(k) for k in store.list(src) if not k.endswith("validation.json")}
    copies = {k[len(dst):]: store.get_bytes(k) for k in store.list(dst) if not k.endswith("validation.json")}
    assert originals and copies == originals  # copied whole, original kept
    report = json.loads(store.get_bytes(dst + "validation.json"))
    assert report["success"] is False
    assert versions(product) == []


def test_more_images_than_the_limit_is_quarantined_with_the_expectation_named(home, tmp_path):
    product, uid = "nut", "20260101T000001Z-many65"
    upload_folder(open_store(), product, good_folder(tmp_path / "set", n=65), upload_id=uid)
    _assert_rejected(product, uid, "train/good image count within [1, 64]: observed 65")


def test_manifest_that_lies_about_hash_and_size_is_quarantined(home, tmp_path):
    product, uid = "nut", "20260101T000002Z-liar01"
    store = open_store()
    upload_folder(store, product, good_folder(tmp_path / "set", n=3), upload_id=uid)
    manifest = store.get_json(manifest_key(product, uid))
    files = {f["key"]: f for f in manifest["files"]}
    files["train/good/good_0.png"]["sha256"] = "0" * 64
    files["train/good/good_1.png"]["size"] += 1
    store.put_json(manifest_key(product, uid), manifest)
    _assert_rejected(product, uid, "sha256 matches the manifest: train/good/good_0.png",
                     "size matches the manifest: train/good/good_1.png")


def test_a_manifest_listing_one_image_many_times_is_quarantined_before_any_training(home, tmp_path):
    """Validation counts objects while training reads manifest entries: an entry repeated 70 times
    (its content hash recomputed to match) would train at k = 70 on one image."""
    product, uid = "shim", "20260101T000002Z-repeat"
    store = open_store()
    upload_folder(store, product, good_folder(tmp_path / "set", n=1), upload_id=uid)
    manifest = store.get_json(manifest_key(product, uid))
    manifest["files"] = manifest["files"] * 70
    manifest["content_sha256"] = content_sha256(manifest["files"])
    store.put_json(manifest_key(product, uid), manifest)
    _assert_rejected(product, uid, "manifest.json present and valid (upload complete): invalid:",
                     "lists train/good/good_0.png 70 times: each file is listed once")


def test_a_manifest_carrying_another_uploads_content_hash_is_quarantined_not_taken_as_trained(home, tmp_path):
    product, store = "cog", open_store()
    first = upload_folder(store, product, good_folder(tmp_path / "first", n=2), upload_id="20260101T000001Z-first1")
    assert retrain_flow(product, upload_id=first.upload_id)["status"] == "promoted"
    uid = "20260101T000002Z-forged"
    upload_folder(store, product, good_folder(tmp_path / "new", n=2, seed=500), upload_id=uid)
    manifest = store.get_json(manifest_key(product, uid))
    manifest["content_sha256"] = first.content_sha256  # new images, named as the trained ones
    store.put_json(manifest_key(product, uid), manifest)
    plan = plan_product.fn(load_settings(), product, "default", 0)  # the nightly sweep: due, never "trained"
    assert plan.upload_id == uid and "newer than champion v1" in plan.reason, plan
    state = retrain_flow(product, upload_id=uid, return_state=True)
    assert state.is_failed() and "manifest content_sha256 is the one its files give: mismatch" in state.message
    assert store.exists(quarantine_prefix(product, uid) + "validation.json")
    assert versions(product) == ["1"]


def test_a_manifest_without_its_content_hash_is_quarantined(home, tmp_path):
    product, uid, store = "cog2", "20260101T000003Z-nohash", open_store()
    upload_folder(store, product, good_folder(tmp_path / "set", n=2), upload_id=uid)
    manifest = store.get_json(manifest_key(product, uid))
    del manifest["content_sha256"]
    store.put_json(manifest_key(product, uid), manifest)
    _assert_rejected(product, uid, "manifest content_sha256 is the one its files give: missing")


def test_eval_set_with_only_one_class_is_quarantined(home, tmp_path):
    product, uid = "nut", "20260101T000003Z-onecls"
    folder = tmp_path / "set"
    good_folder(folder / "train" / "good", n=2)
    good_folder(folder / "eval" / "good", n=2, seed=50)
    upload_folder(open_store(), product, folder, upload_id=uid)
    _assert_rejected(product, uid, "eval set has both good and defect images: missing defect")


def test_upload_whose_manifest_never_arrives_is_never_trained_and_reported_stale(home, tmp_path):
    product, uid = "washer2", "20260101T000004Z-nomani"
    store = open_store()
    prefix = upload_prefix(product, uid)
    for i in range(2):  # the images of an upload interrupted before its manifest
        store.put_bytes(f"{prefix}train/good/{i}.png", png_bytes(noise_rgb(100 + i)))
    objects = {k: store.get_bytes(k) for k in store.list(prefix)}

    with pytest.raises(NoUpload, match="no complete upload"):
        retrain_flow(product)  # the latest *complete* upload: there is none
    with pytest.raises(ManifestError, match="incomplete, not training on it"):
        retrain_flow(product, upload_id=uid)
    (info,) = list_uploads(store, product)
    assert info.upload_id == uid and not info.complete
    assert stale_incomplete_uploads(store, product, older_than_s=3600) == []  # fresh: maybe still uploading
    later = datetime.now(UTC) + timedelta(hours=2)
    assert [u.upload_id for u in stale_incomplete_uploads(store, product, 3600, now=later)] == [uid]
    assert plan_product.fn(load_settings(), product, "default", 0).stale_uploads == ()
    day_ago = time.time() - STALE_UPLOAD_S - 60
    for key in store.list(prefix):  # the nightly sweep reports it once a day has passed
        os.utime(Path(load_settings().storage_url) / key, (day_ago, day_ago))
    assert plan_product.fn(load_settings(), product, "default", 0).stale_uploads == (uid,)
    assert {k: store.get_bytes(k) for k in store.list(prefix)} == objects  # reported, not deleted
    assert store.list(quarantine_prefix(product, uid)) == [] and versions(product) == []


def test_single_image_and_mixed_sizes_train_a_registered_model(home, tmp_path):
    store = open_store()
    single = good_folder(tmp_path / "single", n=1, seed=200)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, (w, h) in enumerate([(64, 64), (96, 80), (128, 72)]):
        (mixed / f"m{i}.png").write_bytes(png_bytes(noise_rgb(300 + i, w, h)))
    product = "spring"
    results = {}
    for name, folder, uid in (("single", single, "20260101T000005Z-single"),
                              ("mixed", mixed, "20260101T000006Z-mixed1")):
        upload_folder(store, product, folder, upload_id=uid)
        results[name] = retrain_flow(product, upload_id=uid)
    assert results["single"]["k"] == 1 and results["mixed"]["k"] == 3
    for summary in results.values():
        assert summary["status"] == "promoted", summary["message"]
        assert np.isfinite(summary["threshold"]["value"])
    assert versions(product) == ["1", "2"]
    assert registry.aliases(product)[registry.CHAMPION] == "2"


# ---- fsad score -----------------------------------------------------------------------------

def test_score_scores_the_good_files_and_reports_each_bad_one(home, tmp_path, capsys):
    """Needs the model of test_single_image_and_mixed_sizes...: scored through models:/NAME@champion."""
    folder = tmp_path / "incoming"
    good_folder(folder, n=2, seed=400)
    for name, (make, _) in BAD.items():
        (folder / name).write_bytes(make())
    out = tmp_path / "scores.csv"
    code = cli_main(["score", "--model", f"models:/{registry.model_name('spring')}@champion", "--device", "cpu",
                     str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    every = list(csv.DictReader(out.open()))
    rows = [r for r in every if not r["error"]]
    assert sorted(Path(r["image"]).name for r in rows) == ["good_0.png", "good_1.png"]
    assert all(np.isfinite(float(r["score"])) for r in rows)
    unread = {Path(r["image"]).name: r for r in every if r["error"]}  # a row each, flagged, with its reason
    assert set(unread) == set(BAD) and all(r["score"] == "" and r["is_anomaly"] == "1" for r in unread.values())
    assert all(reason in unread[name]["error"] for name, (_, reason) in BAD.items())
    for name, (_, reason) in BAD.items():
        line = [ln for ln in err.splitlines() if name in ln]
        assert len(line) == 1 and reason in line[0], (name, err)
    assert f"2 scored, {len(BAD)} failed" in err


def test_no_complete_upload_is_a_permanent_error_not_retried(home):
    # The I/O tasks retry after 2, 10 and 30 s; a permanent error must not wait for any of them.
    started = time.monotonic()
    state = retrain_flow("nothing-here", return_state=True)
    elapsed = time.monotonic() - started
    assert state.is_failed() and "no complete upload" in state.message
    assert elapsed < 30, f"took {elapsed:.0f} s: the permanent error was retried"
