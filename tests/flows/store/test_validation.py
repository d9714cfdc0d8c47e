"""validate_upload: a good upload passes; each kind of bad upload fails a named expectation."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from flows.store.storage import LocalStore, manifest_key, quarantine_prefix, upload_prefix, validation_key
from flows.store.upload import content_sha256, describe_image, sha256_hex
from flows.store.validation import (
    COLUMNS,
    UploadNotFound,
    ValidationLimits,
    build_upload_frame,
    quarantine_upload,
    validate_upload,
    write_report,
)
from fsad_core.imageio import ImageLimits

P, U = "widget", "20260101T000000Z-abcdef"


def png(seed: int | None = None, size: int = 48, mode: str = "RGB", fill: int | None = None) -> bytes:
    """Random texture (seeded) or a constant frame (``fill``)."""
    bands = 1 if mode == "L" else 3
    if fill is not None:
        arr = np.full((size, size, bands), fill, np.uint8)
    else:
        arr = np.random.default_rng(seed).integers(30, 220, (size, size, bands), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if bands == 1 else arr, mode).save(buf, "PNG")
    return buf.getvalue()


def wide_png(width: int, height: int) -> bytes:
    arr = np.random.default_rng(width).integers(30, 220, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def entry(rel: str, data: bytes) -> dict[str, Any]:
    try:
        facts, _ = describe_image(data, rel)
        return {"key": rel, **facts.__dict__}
    except ValueError:
        return {"key": rel, "sha256": sha256_hex(data), "size": len(data)}


def put_upload(store: LocalStore, files: dict[str, bytes], manifest: bool = True,
               lie: dict[str, dict[str, Any]] | None = None, content: str | None = "computed") -> None:
    """Write objects and (optionally) a manifest directly, bypassing upload_folder's refusals;
    ``content`` is the manifest's content_sha256 when not the computed one (None: left out)."""
    prefix = upload_prefix(P, U)
    for rel, data in files.items():
        store.put_bytes(prefix + rel, data)
    if manifest:
        entries = [{**entry(rel, data), **(lie or {}).get(rel, {})} for rel, data in files.items()]
        doc = {"format": 1, "product": P, "upload_id": U, "created": "x", "files": entries,
               "content_sha256": content_sha256(entries) if content == "computed" else content}
        store.put_json(manifest_key(P, U), {k: v for k, v in doc.items() if v is not None})


def good_files(n: int = 3) -> dict[str, bytes]:
    return {f"train/good/{i:03d}.png": png(i) for i in range(n)}


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def failed_names(report) -> str:  # noqa: ANN001
    return " | ".join(report.failed)


def test_good_upload_validates_and_report_roundtrips(store: LocalStore) -> None:
    put_upload(store, {**good_files(), "eval/good/g.png": png(10), "eval/defect/d.png": png(11)})
    report = validate_upload(store, P, U)
    assert report.success, report.failed
    assert report.failed == []
    assert report.result["success"] is True and len(report.result["results"]) >= 14
    assert report.gx_version.startswith("1.")
    key = write_report(store, P, U, report)
    assert key == validation_key(P, U)
    saved = json.loads(store.get_bytes(key))
    assert saved["success"] is True and saved["upload_id"] == U
    assert validate_upload(store, P, U).success  # validation.json is not part of the data


def test_frame_columns_and_values(store: LocalStore) -> None:
    put_upload(store, good_files(2))
    frame = build_upload_frame(store, P, U)
    assert list(frame.columns) == COLUMNS and len(frame) == 2
    row = frame.iloc[0]
    assert (row.split, row.label, row.exists, row.decodes, row.width, row.channels) == \
        ("train", "good", True, True, 48, 3)
    assert 30 < row.mean_brightness < 220 and row.std_brightness > 10
    assert row.in_manifest and row.manifest_sha256_matches and row.manifest_size_matches


@pytest.mark.parametrize("case, expected", [
    ("corrupt", "every file decodes as an image: train/good/bad.png"),
    ("truncated", "every file decodes as an image: train/good/bad.png"),
    ("duplicate", "no duplicate images (sha256 unique): train/good/000.png, train/good/copy.png"),
    ("blank", "not blank (grey std >= 2.0): train/good/blank.png"),
    ("saturated", "not saturated"),
    ("lying_sha", "sha256 matches the manifest: train/good/001.png"),
    ("lying_size", "size matches the manifest: train/good/001.png"),
    ("no_manifest", "manifest.json present and valid (upload complete)"),
    ("garbage_manifest", "manifest.json present and valid (upload complete)"),
    ("eval_one_class", "eval set has both good and defect images: missing defect"),
    ("too_many", "train/good image count within [1, 3]: observed 4"),
    ("no_train", "train/good image count within [1, 3]: observed 0"),
    ("missing_object", "every manifest entry exists in storage: train/good/002.png"),
    ("extra_object", "no object outside the manifest: train/good/sneaked.png"),
    ("tiny", "every file decodes as an image: train/good/tiny.png: refused, 16x16: the shorter side is below"),
    ("thin", "every file decodes as an image: train/good/thin.png: refused, 600x32: aspect ratio above"),
    ("content_forged", "manifest content_sha256 is the one its files give: mismatch (declared 5e1c"),
    ("content_missing", "manifest content_sha256 is the one its files give: missing"),
    ("too_many_bytes", "every file decodes as an image: train/good/big.png: refused, "),
    ("too_many_pixels", "decoded pixels of the upload within 6000 (FSAD_MAX_SET_PIXELS): observed 6912"),
    ("bad_layout", "files are under train/good, eval/good or eval/defect: test/broken/x.png"),
])
def test_bad_uploads_fail_named_expectation(store: LocalStore, case: str, expected: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    files = good_files()
    kw: dict[str, Any] = {}
    if case == "corrupt":
        files["train/good/bad.png"] = b"\x89PNG garbage"
    elif case == "truncated":
        files["train/good/bad.png"] = png(7)[:100]
    elif case == "duplicate":
        files["train/good/copy.png"] = files["train/good/000.png"]
    elif case == "blank":
        files["train/good/blank.png"] = png(fill=128)
    elif case == "saturated":
        files["train/good/white.png"] = png(fill=255)
    elif case == "lying_sha":
        kw["lie"] = {"train/good/001.png": {"sha256": "0" * 64}}
    elif case == "lying_size":
        kw["lie"] = {"train/good/001.png": {"size": 1}}
    elif case in ("no_manifest", "garbage_manifest"):
        kw["manifest"] = False
    elif case == "eval_one_class":
        files["eval/good/g.png"] = png(20)
    elif case == "too_many":
        files["train/good/003.png"] = png(3)
    elif case == "no_train":
        files = {"eval/good/g.png": png(20), "eval/defect/d.png": png(21)}
    elif case == "thin":
        files["train/good/thin.png"] = wide_png(600, 32)
    elif case == "content_forged":  # another upload's hash: its images would pass as "already trained"
        kw["content"] = "5e1c" + "0" * 60
    elif case == "content_missing":
        kw["content"] = None
    elif case == "too_many_bytes":
        files["train/good/big.png"] = png(13, size=96)
    elif case == "tiny":
        files["train/good/tiny.png"] = png(9, size=16)
    elif case == "bad_layout":
        files["test/broken/x.png"] = png(12)
    put_upload(store, files, **kw)
    prefix = upload_prefix(P, U)
    if case == "missing_object":
        store.delete(prefix + "train/good/002.png")
    elif case == "extra_object":
        store.put_bytes(prefix + "train/good/sneaked.png", png(30))
    elif case == "garbage_manifest":
        store.put_bytes(manifest_key(P, U), b"\x00\xff not json")

    image = ImageLimits(max_file_bytes=len(png(0)) + 100 if case == "too_many_bytes" else
                        ImageLimits.max_file_bytes, max_set_pixels=6000 if case == "too_many_pixels" else
                        ImageLimits.max_set_pixels)
    read: list[str] = []
    real_get = store.get_bytes
    monkeypatch.setattr(store, "get_bytes", lambda key: read.append(key) or real_get(key))
    report = validate_upload(store, P, U, ValidationLimits(max_train=3, image=image))
    assert not [key for key in read if key.endswith("big.png")]  # over the byte limit: judged by its size
    assert not report.success
    assert any(f.startswith(expected) for f in report.failed), failed_names(report)
    assert report.result["success"] is False
    json.loads(report.to_json())


def test_unknown_upload_is_an_error(store: LocalStore) -> None:
    with pytest.raises(UploadNotFound, match="no upload"):
        validate_upload(store, P, U)


def test_quarantine_copies_and_keeps_original(store: LocalStore) -> None:
    files = good_files()
    files["train/good/blank.png"] = png(fill=0)
    put_upload(store, files)
    report = validate_upload(store, P, U)
    assert not report.success
    write_report(store, P, U, report)
    src = upload_prefix(P, U)
    original = {k[len(src):]: store.get_bytes(k) for k in store.list(src)}
    dst = quarantine_upload(store, P, U, report)
    assert dst == quarantine_prefix(P, U)
    copied = {k[len(dst):]: store.get_bytes(k) for k in store.list(dst)}
    assert set(copied) == set(original)  # images, manifest and the report
    assert all(copied[k] == original[k] for k in original)
    assert {k[len(src):]: store.get_bytes(k) for k in store.list(src)} == original  # untouched
    assert json.loads(copied["validation.json"])["success"] is False
    quarantine_upload(store, P, U, report)  # again: harmless
    assert store.list(src) == [src + k for k in sorted(original)]


def test_grey_colour_and_alpha_images_in_one_upload_validate(store: LocalStore) -> None:
    """Every image is converted to RGB on read, so a set that mixes file modes is usable as it is."""
    files = {**good_files(2), "train/good/grey.png": png(8, mode="L")}
    rgba = np.dstack([np.random.default_rng(5).integers(30, 220, (48, 48, 3), dtype=np.uint8),
                      np.full((48, 48), 255, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    files["train/good/rgba.png"] = buf.getvalue()
    put_upload(store, files)
    report = validate_upload(store, P, U)
    assert report.success, report.failed
    assert sorted(build_upload_frame(store, P, U)["channels"]) == [1, 3, 3, 4]
