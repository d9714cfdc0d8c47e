"""``fsad upload``: put a few-shot image set into storage as one upload, manifest last.

All-or-nothing at the level that matters: every file is read, decoded and checked before the first
byte is written, so a bad set is refused with a list of all bad files and nothing in storage. The
manifest is written only after every image, so a reader that sees ``manifest.json`` sees a complete
upload; an interrupted upload stays without a manifest and is never trained on.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import secrets
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from flows.store.storage import (
    MANIFEST_NAME,
    SPLITS_LABELS,
    ObjectNotFound,
    StorageError,
    StorageKeyError,
    Store,
    manifest_key,
    open_store,
    upload_prefix,
    validate_key,
    validate_name,
)
from fsad_core.imageio import ImageLimits, ImageReadError, image_limits, is_image_name, read_image

MANIFEST_FORMAT = 1
_MAX_LISTED = 10


class UploadError(ValueError):
    """The folder cannot be uploaded as it is; the message lists every offending file."""


class ManifestError(StorageError):
    """manifest.json is missing (the upload is incomplete) or unreadable."""


@dataclass(frozen=True)
class ImageFacts:
    """What the manifest records about one image (and what validation recomputes)."""

    sha256: str
    size: int
    width: int  # as decoded, EXIF orientation applied: what the model sees
    height: int
    channels: int  # of the source file: 1 grey, 2 grey+alpha, 3 colour, 4 colour+alpha/CMYK
    mode: str  # PIL mode of the source file, e.g. "L", "RGB", "I;16"


@dataclass
class UploadResult:
    product: str
    upload_id: str
    uri: str
    counts: dict[str, int]  # "train/good" -> n, ...
    skipped: list[str] = field(default_factory=list)  # relative paths not uploaded, with the reason
    content_sha256: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)


def new_upload_id(now: datetime | None = None) -> str:
    """UTC timestamp + random suffix, e.g. ``20261129T101500Z-ab12cd``: sorts by time, never collides."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_image(data: bytes, name: str, limits: ImageLimits | None = None) -> tuple[ImageFacts, Any]:
    """Decode ``data`` (ImageReadError if unusable) and return its facts and the RGB array."""
    rgb = read_image(data, name=name, limits=limits)
    with Image.open(io.BytesIO(data)) as img:
        mode = img.mode
        bands = len(img.getbands())
        if mode == "P":  # palette: colour, with alpha when a transparency entry exists
            bands = 4 if "transparency" in img.info else 3
    h, w = rgb.shape[:2]
    return ImageFacts(sha256_hex(data), len(data), int(w), int(h), bands, mode), rgb


def content_sha256(files: list[dict[str, Any]]) -> str:
    """Identity of the training content: sha256 over ``"KEY\\tSHA256\\n"`` for entries sorted by key.

    Keys are relative to the upload (``train/good/001.png``) and cannot contain tabs or newlines, so
    the encoding is unambiguous; the same images give the same value whatever the upload id.
    """
    h = hashlib.sha256()
    for key, digest in sorted((f["key"], f["sha256"]) for f in files):
        h.update(f"{key}\t{digest}\n".encode())
    return h.hexdigest()


def _listdir(folder: Path) -> list[Path]:
    return sorted(folder.iterdir(), key=lambda p: p.name)


def _collect(folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(relative key, file) pairs to upload and the skipped entries with reasons.

    ``DIR/train/good/*`` (+ ``DIR/eval/good|defect/*``) when ``DIR/train`` exists, otherwise the
    images directly in ``DIR`` are the train/good set. Sub-folders are not descended into.
    """
    wanted: list[tuple[str, Path]] = []
    skipped: list[str] = []

    def take(src: Path, rel_dir: str, shown_dir: str) -> None:
        for p in _listdir(src):
            shown = f"{shown_dir}{p.name}"
            if p.is_dir():
                skipped.append(f"{shown}/ (folder not used here)")
            elif not p.is_file():
                skipped.append(f"{shown} (not a regular file)")
            elif not is_image_name(p.name):
                skipped.append(f"{shown} (not an image suffix)")
            else:
                wanted.append((f"{rel_dir}/{p.name}", p))

    if (folder / "train").is_dir():
        layout = {f"{s}/{lab}" for s, lab in SPLITS_LABELS}
        for top in _listdir(folder):
            if top.name not in ("train", "eval") or not top.is_dir():
                skipped.append(f"{top.name}{'/' if top.is_dir() else ''} (not train/ or eval/)")
                continue
            for sub in _listdir(top):
                rel = f"{top.name}/{sub.name}"
                if rel in layout and sub.is_dir():
                    take(sub, rel, rel + "/")
                else:
                    slash = "/" if sub.is_dir() else ""
                    skipped.append(f"{rel}{slash} (expected train/good, eval/good or eval/defect)")
    else:
        take(folder, "train/good", "")
    return wanted, skipped


def _first_few(problems: list[str]) -> str:
    shown = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return shown + (f"; ... and {more} more" if more > 0 else "")


def write_upload_folder(out: Path, train: Sequence[Path], eval_good: Sequence[Path] = (),
                        eval_defect: Sequence[Path] = ()) -> Path:
    """Copy image files into the layout ``fsad upload`` reads (train/good, eval/good, eval/defect),
    e.g. from an MVTec-layout category. Defect files get their defect-type folder as a name prefix,
    so same-named files of different defect types stay apart."""
    for sub, files, rename in (("train/good", train, False), ("eval/good", eval_good, False),
                               ("eval/defect", eval_defect, True)):
        if files:
            (out / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, out / sub / (f"{f.parent.name}_{f.name}" if rename else f.name))
    return out


def upload_folder(store: Store, product: str, folder: str | Path, upload_id: str | None = None,
                  resume: str | None = None) -> UploadResult:
    """Upload ``folder`` as a new upload of ``product``; refuse (writing nothing) if any image is bad.

    The upload id must be new: an existing upload is never overwritten. ``resume`` names an
    interrupted upload (no manifest yet) of the same folder to finish instead: objects already
    stored with the right content are kept, the rest written, then the manifest, so a retry after
    a storage outage leaves one copy of each object under one upload id.
    """
    validate_name(product, "product name")
    upload_id = _upload_id_to_write(upload_id, resume)
    prefix = upload_prefix(product, upload_id)
    folder = Path(folder)
    wanted, skipped = _plan(folder)
    entries = _checked_entries(folder, wanted, prefix)
    present = _stored_before(store, product, upload_id, {e["key"] for e in entries}, resume)
    _send_images(store, prefix, upload_id, wanted, entries, present)
    manifest = _manifest(product, upload_id, entries)
    store.put_json(manifest_key(product, upload_id), manifest)  # last: it marks the upload complete
    counts = Counter(rel.rsplit("/", 1)[0] for rel, _ in wanted)
    return UploadResult(product, upload_id, store.uri(prefix), dict(sorted(counts.items())), skipped,
                        manifest["content_sha256"], manifest)


def _upload_id_to_write(upload_id: str | None, resume: str | None) -> str:
    """The resumed upload's id, the id given, or a new one; an id that differs from ``resume`` is refused
    so that a resume never writes under a second id."""
    if resume is not None:
        if upload_id is not None and upload_id != resume:
            raise UploadError(f"upload id {upload_id} and resume {resume} differ")
        upload_id = resume
    return validate_name(upload_id, "upload id") if upload_id is not None else new_upload_id()


def _plan(folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(relative key, file) pairs to send and the skipped entries; a folder without training images is
    refused, as its upload could never be trained on."""
    if not folder.is_dir():
        raise UploadError(f"{folder}: not a folder")
    wanted, skipped = _collect(folder)
    if not any(rel.startswith("train/good/") for rel, _ in wanted):
        raise UploadError(f"{folder}: no training images found (expected images in train/good/ or directly "
                          f"in the folder; suffixes: png jpg jpeg bmp tif tiff webp)")
    return wanted, skipped


def _checked_entries(folder: Path, wanted: list[tuple[str, Path]], prefix: str) -> list[dict[str, Any]]:
    """The manifest entry of every file, each read and decoded (one at a time) before anything is
    written, so that a bad set is refused whole with every bad file named."""
    limits = image_limits()
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    for rel, path in wanted:
        try:
            entries.append(_entry(rel, path, prefix, limits))
        except StorageKeyError as exc:
            problems.append(f"{ascii(rel)}: unusable file name ({exc})")
        except ImageReadError as exc:
            problems.append(str(exc))
        except OSError as exc:
            problems.append(f"{rel}: cannot read ({exc.strerror or exc})")
    if problems:
        raise UploadError(f"refused, nothing uploaded; {len(problems)} bad file(s) in {folder}: {_first_few(problems)}")
    try:
        limits.check_set(sum(e["width"] * e["height"] for e in entries), len(entries), str(folder))
    except ImageReadError as exc:
        raise UploadError(f"{exc}; nothing uploaded") from None
    return entries


def _entry(rel: str, path: Path, prefix: str, limits: ImageLimits) -> dict[str, Any]:
    """One file's manifest entry; raises on a key storage refuses, a file over the limits or one that
    does not decode."""
    validate_key(prefix + rel)
    limits.check_bytes(path.stat().st_size, rel)
    facts, _ = describe_image(path.read_bytes(), rel, limits)
    return {"key": rel, **facts.__dict__}


def _stored_before(store: Store, product: str, upload_id: str, keys: set[str],
                   resume: str | None) -> dict[str, int]:
    """relative key -> size of the objects already stored: those of the upload being resumed, and none
    for a new upload, whose id is refused if anything is stored under it (never overwritten)."""
    if resume:
        return _resumable(store, product, upload_id, keys)
    prefix = upload_prefix(product, upload_id)
    if store.list(prefix):
        raise UploadError(f"upload {upload_id} of {product} already exists at {store.uri(prefix)}; not overwriting")
    return {}


def _send_images(store: Store, prefix: str, upload_id: str, wanted: list[tuple[str, Path]],
                 entries: list[dict[str, Any]], present: dict[str, int]) -> None:
    """Write every image not already stored with its content, re-reading each and checking it against
    its entry so that the manifest describes exactly what was written."""
    incomplete = f"upload {upload_id} left incomplete (no manifest); finish it with --resume {upload_id}"
    for entry, (rel, path) in zip(entries, wanted):
        data = path.read_bytes()
        if sha256_hex(data) != entry["sha256"]:
            raise UploadError(f"{rel}: changed while uploading; {incomplete}")
        stored = rel in present and present[rel] == entry["size"]
        if stored and sha256_hex(store.get_bytes(prefix + rel)) == entry["sha256"]:
            continue
        try:
            store.put_bytes(prefix + rel, data, content_type=mimetypes.guess_type(rel)[0])
        except StorageError as exc:
            raise StorageError(f"{exc}; {incomplete}") from None


def _manifest(product: str, upload_id: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a finished upload, stamped with the time it is made."""
    return {
        "format": MANIFEST_FORMAT,
        "product": product,
        "upload_id": upload_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "files": entries,
        "content_sha256": content_sha256(entries),
    }


def _resumable(store: Store, product: str, upload_id: str, keys: set[str]) -> dict[str, int]:
    """relative key -> size of the objects an interrupted upload already holds; refuses a complete
    upload, a missing one, and one holding objects this folder would not write."""
    prefix = upload_prefix(product, upload_id)
    present = {o.key[len(prefix):]: o.size for o in store.list_info(prefix)}
    if not present:
        raise UploadError(f"nothing to resume: upload {upload_id} of {product} does not exist at {store.uri(prefix)}")
    if MANIFEST_NAME in present:
        raise UploadError(f"upload {upload_id} of {product} is complete (it has {MANIFEST_NAME}); not resuming")
    foreign = sorted(set(present) - keys)
    if foreign:
        raise UploadError(f"upload {upload_id} of {product} holds files this folder does not have, so it is not "
                          f"this folder's upload; not resuming: {_first_few(foreign)}")
    return present


def read_manifest(store: Store, product: str, upload_id: str) -> dict[str, Any]:
    """The upload's manifest; ManifestError when it is missing (incomplete upload) or malformed."""
    key = manifest_key(product, upload_id)
    try:
        manifest = store.get_json(key)
    except ObjectNotFound:
        raise ManifestError(f"upload {upload_id} of {product} has no {MANIFEST_NAME}: it is incomplete") from None
    except StorageError as exc:
        raise ManifestError(str(exc)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), list) \
            or not all(isinstance(f, dict) and isinstance(f.get("key"), str) and isinstance(f.get("sha256"), str)
                       for f in manifest["files"]):
        raise ManifestError(f"{store.uri(key)}: not a format-{MANIFEST_FORMAT} fsad manifest")
    listed = Counter(f["key"] for f in manifest["files"])
    if repeated := sorted(k for k, n in listed.items() if n > 1):
        raise ManifestError(f"{store.uri(key)}: lists {repeated[0]} {listed[repeated[0]]} times"
                            + (f" (and {len(repeated) - 1} more files more than once)" if len(repeated) > 1 else "")
                            + ": each file is listed once")
    return manifest


def cli_upload(product: str, folder: str, resume: str | None = None) -> int:
    """``fsad upload --product NAME [--resume UPLOAD_ID] DIR``: upload and print a short summary;
    errors propagate."""
    store = open_store()
    result = upload_folder(store, product, folder, resume=resume)
    parts = ", ".join(f"{n} {split}" for split, n in result.counts.items())
    print(f"uploaded {product} {result.upload_id}: {parts} -> {result.uri}")
    print(f"content_sha256 {result.content_sha256}")
    if result.skipped:
        print(f"skipped {len(result.skipped)}: {_first_few(result.skipped)}", file=sys.stderr)
    return 0


def read_checked(store: Store, product: str, upload_id: str, entry: dict[str, Any]) -> bytes:
    """A manifest entry's bytes, checked against its sha256 once more: what is read is exactly the
    content that was validated and that content_sha256 names."""
    key = upload_prefix(product, upload_id) + entry["key"]
    blob = store.get_bytes(key)
    if sha256_hex(blob) != entry["sha256"]:
        raise ValueError(f"{store.uri(key)} changed since validation (sha256 differs from the manifest)")
    return blob


def training_files(store: Store, product: str, upload_id: str) -> list[tuple[str, bytes]]:
    """(key, bytes) of the upload's training images, in key order, each checked (`read_checked`)."""
    entries = sorted(read_manifest(store, product, upload_id)["files"], key=lambda f: f["key"])
    return [(e["key"], read_checked(store, product, upload_id, e)) for e in entries if e["key"].startswith("train/")]

