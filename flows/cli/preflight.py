"""What a command checks before it loads the model's code or starts a server: a wrong path, an
unknown product or model, or a product with nothing uploaded is refused in one line, in a moment,
and the line says what would fix it."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path

from flows.mlops.names import CANDIDATE, CHAMPION, MODEL_PREFIX, model_name
from flows.settings import Locations
from flows.store.storage import latest_complete_upload, list_uploads, open_store, validate_name
from fsad_core.data import CategoryError, load_category

_MODEL_REF = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))")


class NotReady(ValueError):
    """What a command needs is not there; the message names what would make it so."""


def paths(given: list[str]) -> None:
    """Files or folders that exist."""
    for path in given:
        if not Path(path).exists():
            raise NotReady(f"{path}: no such file or folder")


def category(path: str) -> None:
    """An MVTec-layout category, as `fsad_core.data.load_category` reads it (no image is decoded)."""
    if not Path(path).is_dir():
        raise NotReady(f"{path}: no such folder")
    try:
        load_category(path)
    except CategoryError as exc:
        raise NotReady(f"{exc}: train/good/*.png, test/good|DEFECT/*.png; `fsad upload` takes a flat folder of "
                       f"normal images instead") from None


def model(ref: str, where: Locations) -> None:
    """A model folder `fsad train` wrote, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` the registry holds."""
    found = _MODEL_REF.fullmatch(ref)
    if found is None:
        if not (Path(ref) / "config.json").is_file():
            raise NotReady(f"{ref}: not a model folder (no config.json); `fsad train --data DIR --k K --out {ref}` "
                           f"makes one, or give models:/NAME@ALIAS")
        return
    name, alias, version = found.groups()
    product = name.removeprefix(MODEL_PREFIX)
    fix = f"`fsad retrain --product {product}` registers one (after `fsad upload --product {product} FOLDER`)"
    if not _registry_exists(where):
        raise NotReady(f"{ref}: no registry yet at {where.tracking_uri} (nothing trained); {fix}")
    _registered(ref, name, alias, version, where, fix)


def exported(folder: str) -> None:
    """A folder `fsad export` wrote (its graph and spec)."""
    if not all((Path(folder) / name).is_file() for name in ("model.onnx", "model.json")):
        raise NotReady(f"{folder}: not an exported model (no model.onnx and model.json); `fsad export --model MODEL "
                       f"--format onnx --out {folder}` makes one")


def deciding(product: str, where: Locations) -> None:
    """A version to decide the product's line: its champion, else its candidate (in shadow)."""
    name = model_name(validate_name(product, "product name"))
    try:
        model(f"models:/{name}@{CHAMPION}", where)
    except NotReady:
        with contextlib.suppress(NotReady):
            model(f"models:/{name}@{CANDIDATE}", where)
            return
        raise


def upload(product: str, upload_id: str | None, where: Locations) -> None:
    """A complete upload of ``product`` (``upload_id``, else any)."""
    store = open_store(where.storage_url)
    fix = f"`fsad upload --product {product} FOLDER` uploads one"
    if upload_id is None:
        if latest_complete_upload(store, product) is None:
            raise NotReady(f"no complete upload of product {product} in {where.storage_url}; {fix}")
        return
    found = {u.upload_id: u for u in list_uploads(store, product)}.get(upload_id)
    if found is None or not found.complete:
        what = "not complete (no manifest; `fsad upload --resume` finishes it)" if found else "not found"
        raise NotReady(f"upload {upload_id} of product {product} in {where.storage_url}: {what}")


def _registry_exists(where: Locations) -> bool:
    """False for the embedded SQLite registry before its file exists (MLflow would make an empty one)."""
    if not where.tracking_uri.startswith("sqlite:///"):
        return True
    return Path(where.tracking_uri.removeprefix("sqlite:///")).is_file()


def _registered(ref: str, name: str, alias: str | None, version: str | None, where: Locations, fix: str) -> None:
    found = _in_sqlite_registry(name, alias, version, where) if where.tracking_uri.startswith("sqlite:///") else None
    if found is False:
        raise NotReady(f"{ref}: not in the registry at {where.tracking_uri}; {fix}")
    if found is None:
        _in_registry(ref, name, alias, version, where, fix)


def _in_sqlite_registry(name: str, alias: str | None, version: str | None, where: Locations) -> bool | None:
    """Asked of the embedded registry's tables directly, read-only: a moment, where importing
    MLflow takes seconds on a busy machine; None when its tables are not as expected (MLflow is asked)."""
    path = where.tracking_uri.removeprefix("sqlite:///")
    query, args = (("SELECT 1 FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, alias)) if alias
                   else ("SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (name, int(version or 0))))
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute(query, args).fetchone() is not None
    except sqlite3.Error:
        return None


def _in_registry(ref: str, name: str, alias: str | None, version: str | None, where: Locations, fix: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=where.tracking_uri, registry_uri=where.tracking_uri)
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        else:
            client.get_model_version(name, version)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise NotReady(f"{ref}: not in the registry at {where.tracking_uri}; {fix}") from None
        raise
