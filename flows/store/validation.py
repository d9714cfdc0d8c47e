"""Data validation of an upload with Great Expectations, before anything is trained on it.

The upload is turned into a pandas DataFrame (one row per object or missing manifest entry, with
facts recomputed from the bytes), and a GX 1.x expectation suite runs over it in an ephemeral
context: nothing is written to a GX project folder and nothing is sent anywhere. A failed upload is
reported and copied to quarantine; the original is never deleted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from flows.store.storage import (
    MANIFEST_NAME,
    VALIDATION_NAME,
    ObjectNotFound,
    StorageError,
    Store,
    manifest_key,
    quarantine_prefix,
    upload_prefix,
    validation_key,
)
from flows.store.upload import ManifestError, content_sha256, describe_image, read_manifest, sha256_hex
from fsad_core.imageio import ImageLimits, ImageReadError, image_limits
from infra.config import telemetry_off

COLUMNS = ["key", "split", "label", "layout", "exists", "bytes", "sha256", "decodes", "decode_error",
           "width", "height", "pixels", "channels", "mode", "mean_brightness", "std_brightness",
           "in_manifest", "manifest_sha256_matches", "manifest_size_matches", "manifest_status",
           "manifest_content_sha256"]
_UPLOAD_WIDE = ("manifest_status", "manifest_content_sha256")  # one value for the whole upload
LAYOUTS = ["train/good", "eval/good", "eval/defect"]
_GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's "L" conversion
_MAX_KEYS_SHOWN = 10


class UploadNotFound(StorageError):
    """Neither objects nor a manifest exist under the upload prefix."""


@dataclass(frozen=True)
class ValidationLimits:
    """Thresholds of the suite; the defaults suit few-shot industrial sets. The image limits (bytes,
    pixels, shape, the upload's pixel budget) are the ones every reader applies, from the environment."""

    min_train: int = 1
    max_train: int = 64
    max_side: int = 8192  # the shorter side's minimum and the aspect ratio are the image limits
    min_std_brightness: float = 2.0  # below: a blank or nearly constant frame
    min_mean_brightness: float = 2.0  # below / above: a black or white (saturated) frame
    max_mean_brightness: float = 253.0
    image: ImageLimits = field(default_factory=image_limits)


@dataclass
class ValidationReport:
    product: str
    upload_id: str
    success: bool
    failed: list[str]  # "expectation name: offending keys or observed value"
    result: dict[str, Any]  # GX ExpectationSuiteValidationResult.to_json_dict()
    limits: dict[str, Any] = field(default_factory=dict)
    checked: str = ""
    gx_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"


def _split_label(rel: str) -> tuple[str | None, str | None, str | None]:
    parts = rel.split("/")
    if len(parts) == 3:
        return parts[0], parts[1], f"{parts[0]}/{parts[1]}"
    return None, None, "/".join(parts[:-1]) or "."


def _describe(rel: str, data: bytes, limits: ImageLimits) -> dict[str, Any]:
    row: dict[str, Any] = {"exists": True, "bytes": len(data)}
    try:
        facts, rgb = describe_image(data, rel, limits)
    except ImageReadError as exc:
        row.update(sha256=sha256_hex(data), decodes=False, decode_error=str(exc))
        return row
    grey = rgb.astype(np.float32) @ _GREY.astype(np.float32)
    row.update(sha256=facts.sha256, decodes=True, decode_error=None, width=facts.width, height=facts.height,
               pixels=facts.width * facts.height, channels=facts.channels, mode=facts.mode,
               mean_brightness=float(grey.mean()), std_brightness=float(grey.std()))
    return row


def _object_row(store: Store, key: str, rel: str, size: int, limits: ImageLimits) -> dict[str, Any]:
    """The facts of one object; one over the byte limit is judged from its listed size, never read."""
    try:
        limits.check_bytes(size, rel)
    except ImageReadError as exc:
        return {"exists": True, "bytes": size, "decodes": False, "decode_error": str(exc)}
    try:
        return _describe(rel, store.get_bytes(key), limits)
    except ObjectNotFound:  # deleted since the listing
        return {"exists": False}


def _content_status(manifest: dict[str, Any]) -> str:
    """Whether the manifest's content_sha256 is the one its (checked) file entries give."""
    declared, actual = manifest.get("content_sha256"), content_sha256(manifest["files"])
    if not isinstance(declared, str):
        return "missing"
    return "ok" if declared == actual else f"mismatch (declared {declared[:16]}..., its files give {actual[:16]}...)"


def _upload_objects(store: Store, prefix: str) -> dict[str, int]:
    """Size of each object of the upload by its path in it; the manifest and the report are not data."""
    objects = {o.key[len(prefix):]: o.size for o in store.list_info(prefix)}
    return {rel: size for rel, size in objects.items() if rel not in (MANIFEST_NAME, VALIDATION_NAME)}


def _load_manifest(store: Store, product: str, upload_id: str) -> tuple[dict[str, Any] | None, str]:
    """The manifest (None unless readable) and its status: "ok", "missing" (an incomplete upload) or
    "invalid: " and why."""
    if not store.exists(manifest_key(product, upload_id)):
        return None, "missing"
    try:
        return read_manifest(store, product, upload_id), "ok"
    except ManifestError as exc:
        return None, f"invalid: {exc}"


def _location(rel: str) -> dict[str, Any]:
    """The key and where it sits: the layout is what the suite checks, split and label what it counts."""
    split, label, layout = _split_label(rel)
    return {"key": rel, "split": split, "label": label, "layout": layout}


def _manifest_match(row: dict[str, Any], entry: dict[str, Any] | None) -> dict[str, Any]:
    """How an object's recomputed facts compare with its manifest entry (None: it has none)."""
    match: dict[str, Any] = {"in_manifest": entry is not None}
    if entry is not None and row["exists"]:
        match["manifest_size_matches"] = entry.get("size") == row["bytes"]
        if "sha256" in row:  # an object too large to read is refused by its size alone
            match["manifest_sha256_matches"] = entry.get("sha256") == row["sha256"]
    return match


def _frame_row(store: Store, prefix: str, rel: str, size: int, entries: dict[str, dict[str, Any]] | None,
               limits: ImageLimits) -> dict[str, Any]:
    """The row of one object; ``entries`` are the manifest's by key, None when there is no manifest to match."""
    row = {**_location(rel), **_object_row(store, prefix + rel, rel, size, limits)}
    if entries is not None:
        row.update(_manifest_match(row, entries.get(rel)))
    return row


def build_upload_frame(store: Store, product: str, upload_id: str,
                       limits: ImageLimits | None = None) -> pd.DataFrame:
    """One row per object of the upload (manifest.json / validation.json excluded), recomputed from
    the bytes and cross-checked against the manifest, plus a row per manifest entry with no object."""
    limits = limits or image_limits()
    prefix = upload_prefix(product, upload_id)
    objects = _upload_objects(store, prefix)
    manifest, status = _load_manifest(store, product, upload_id)
    if not objects and status == "missing":
        raise UploadNotFound(f"no upload {upload_id} of product {product} at {store.uri(prefix)}")
    entries = {f["key"]: f for f in manifest["files"]} if manifest is not None else None
    rows = [_frame_row(store, prefix, rel, size, entries, limits) for rel, size in objects.items()]
    rows += [{**_location(rel), "exists": False, "in_manifest": True}  # listed, never stored
             for rel in sorted(set(entries or {}) - set(objects))]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["manifest_status"] = status
    frame["manifest_content_sha256"] = _content_status(manifest) if manifest is not None else None
    return frame


def _named(expectation: Any, name: str) -> Any:
    """The expectation with the name its failure is reported under."""
    expectation.meta = {"name": name}
    return expectation


def _in_set(column: str, value_set: list[Any], name: str) -> Any:
    import great_expectations.expectations as gxe

    return _named(gxe.ExpectColumnValuesToBeInSet(column=column, value_set=value_set), name)


def _existing(column: str, value: str) -> Any:
    """Row condition: the rows whose ``column`` is ``value``, of objects that exist (not missing entries)."""
    from great_expectations.expectations.row_conditions import Column

    return (Column(column) == value) & (Column("exists") == True)  # noqa: E712


def _integrity_expectations() -> list[Any]:
    """The upload is complete and each object is the one its manifest names, no more, no less."""
    return [
        _in_set("manifest_status", ["ok"], "manifest.json present and valid (upload complete)"),
        _in_set("manifest_content_sha256", ["ok"], "manifest content_sha256 is the one its files give"),
        _in_set("exists", [True], "every manifest entry exists in storage"),
        _in_set("in_manifest", [True], "no object outside the manifest"),
        _in_set("manifest_sha256_matches", [True], "sha256 matches the manifest"),
        _in_set("manifest_size_matches", [True], "size matches the manifest"),
    ]


def _layout_expectations(limits: ValidationLimits) -> list[Any]:
    """Every file is an image where training looks for one, and the normals are few enough to be few-shot."""
    import great_expectations.expectations as gxe

    return [
        _in_set("layout", LAYOUTS, "files are under train/good, eval/good or eval/defect"),
        _in_set("decodes", [True], "every file decodes as an image"),
        _named(gxe.ExpectTableRowCountToBeBetween(min_value=limits.min_train, max_value=limits.max_train,
                                                  row_condition=_existing("layout", "train/good")),
               f"train/good image count within [{limits.min_train}, {limits.max_train}]"),
    ]


def _size_expectations(limits: ValidationLimits) -> list[Any]:
    """The upload fits the pixel budget and no image is too large to feature-extract."""
    import great_expectations.expectations as gxe

    max_pixels, max_side = limits.image.max_set_pixels, limits.max_side
    return [
        _named(gxe.ExpectColumnSumToBeBetween(column="pixels", min_value=0, max_value=max_pixels),
               f"decoded pixels of the upload within {max_pixels} (FSAD_MAX_SET_PIXELS)"),
        _named(gxe.ExpectColumnValuesToBeBetween(column="width", max_value=max_side), f"width at most {max_side}"),
        _named(gxe.ExpectColumnValuesToBeBetween(column="height", max_value=max_side),
               f"height at most {max_side}"),
    ]


def _content_expectations(limits: ValidationLimits) -> list[Any]:
    """No image that teaches nothing: a duplicate, a blank frame or a black or white (saturated) one."""
    import great_expectations.expectations as gxe

    low, high = limits.min_mean_brightness, limits.max_mean_brightness
    return [
        _named(gxe.ExpectColumnValuesToBeUnique(column="sha256"), "no duplicate images (sha256 unique)"),
        _named(gxe.ExpectColumnValuesToBeBetween(column="std_brightness", min_value=limits.min_std_brightness),
               f"not blank (grey std >= {limits.min_std_brightness})"),
        _named(gxe.ExpectColumnValuesToBeBetween(column="mean_brightness", min_value=low, max_value=high),
               f"not saturated (grey mean within [{low}, {high}])"),
    ]


def _eval_expectations(frame: pd.DataFrame) -> list[Any]:
    """An eval set, when there is one, measures nothing without both classes."""
    import great_expectations.expectations as gxe

    if not bool(((frame["split"] == "eval") & (frame["exists"] == True)).any()):  # noqa: E712
        return []
    return [_named(gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=["good", "defect"],
                                                              row_condition=_existing("split", "eval")),
                   "eval set has both good and defect images")]


def _suite(frame: pd.DataFrame, limits: ValidationLimits) -> list[Any]:
    """The expectations over ``frame``, in the order their failures are reported."""
    return [*_integrity_expectations(), *_layout_expectations(limits), *_size_expectations(limits),
            *_content_expectations(limits), *_eval_expectations(frame)]


def _describe_failure(res: dict[str, Any], frame: pd.DataFrame) -> str:
    cfg = res["expectation_config"]
    name = (cfg.get("meta") or {}).get("name") or cfg["type"]
    r = res.get("result") or {}
    if res.get("exception_info", {}).get("raised_exception"):
        return f"{name}: could not be evaluated ({res['exception_info'].get('exception_message')})"
    column = cfg.get("kwargs", {}).get("column")
    if column in _UPLOAD_WIDE:
        return f"{name}: {', '.join(map(str, frame[column].dropna().unique()))}"
    keys = [row["key"] for row in r.get("unexpected_index_list") or [] if isinstance(row, dict) and "key" in row]
    if column == "decodes":  # each file with its reason: the error names the file and the limit
        keys = frame.loc[frame["key"].isin(keys), "decode_error"].tolist()
    if keys:
        more = len(keys) - _MAX_KEYS_SHOWN
        return f"{name}: " + ", ".join(sorted(keys)[:_MAX_KEYS_SHOWN]) + (f" and {more} more" if more > 0 else "")
    if r.get("partial_missing_list"):
        return f"{name}: missing {', '.join(map(str, r['partial_missing_list']))}"
    if "observed_value" in r:
        return f"{name}: observed {r['observed_value']}"
    return name


def run_expectations(frame: pd.DataFrame, limits: ValidationLimits) -> tuple[bool, list[str], dict[str, Any], str]:
    """Run the suite over ``frame`` in an ephemeral GX context: (success, failed, result dict, gx version).
    GX reads its analytics switch when first imported, so telemetry is switched off before that."""
    telemetry_off()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("fsad_upload")
             .add_dataframe_asset("upload_objects")
             .add_batch_definition_whole_dataframe("whole")
             .get_batch(batch_parameters={"dataframe": frame}))
    suite = gx.ExpectationSuite(name="fsad_upload")
    for exp in _suite(frame, limits):
        suite.add_expectation(exp)
    res = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                               "unexpected_index_column_names": ["key"]})
    result = json.loads(json.dumps(res.to_json_dict(), default=str))
    failed = [_describe_failure(r, frame) for r in result["results"] if not r["success"]]
    return bool(res.success), failed, result, gx.__version__


def validate_upload(store: Store, product: str, upload_id: str,
                    limits: ValidationLimits | None = None) -> ValidationReport:
    """Validate one upload; never raises for bad data (that is a failed report), only for a missing upload."""
    limits = limits or ValidationLimits()
    frame = build_upload_frame(store, product, upload_id, limits.image)
    success, failed, result, version = run_expectations(frame, limits)
    checked = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return ValidationReport(product, upload_id, success, failed, result, asdict(limits), checked, version)


def write_report(store: Store, product: str, upload_id: str, report: ValidationReport) -> str:
    """Write ``validation.json`` beside the upload; returns its key."""
    key = validation_key(product, upload_id)
    store.put_bytes(key, report.to_json().encode("utf-8"), content_type="application/json")
    return key


def quarantine_upload(store: Store, product: str, upload_id: str, report: ValidationReport) -> str:
    """Copy every object of the upload to ``quarantine/P/U/`` plus the report; the original stays.

    Returns the quarantine prefix. Copying again is harmless (same keys, same content).
    """
    src, dst = upload_prefix(product, upload_id), quarantine_prefix(product, upload_id)
    for key in store.list(src):
        rel = key[len(src):]
        if rel != VALIDATION_NAME:
            store.copy(key, dst + rel)
    store.put_bytes(dst + VALIDATION_NAME, report.to_json().encode("utf-8"), content_type="application/json")
    return dst


__all__ = ["COLUMNS", "UploadNotFound", "ValidationLimits", "ValidationReport",
           "build_upload_frame", "quarantine_upload", "run_expectations", "validate_upload", "write_report"]
