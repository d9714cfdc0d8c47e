"""The model folder as an MLflow pyfunc model, loaded by module: no pickle anywhere.

MLflow's classic custom flavour is used: ``log_model(loader_module="flows.pyfunc", data_path=DIR)``
copies the model folder (config.json + safetensors) into the artifact, and loading calls
``_load_pyfunc(path)`` of this module. No ``python_model.pkl`` is written, so loading a registered
model never unpickles anything from the artifact. The artifact carries its own code (``fsad_core``
and this module, through ``code_paths``) and pins only third-party requirements, so ``mlflow models
serve`` runs it where fsad is not installed. The pipeline itself never runs an artifact's code:
`artifact_problem` refuses any artifact this module did not write, bundled code included unless it
is byte for byte this installation's, and the pipeline loads the model with `load_served_model`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import logging
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fsad_core.budget import MemoryBudget
from fsad_core.decision import decided, undecided
from fsad_core.detector import MODEL_FILES, Detector
from fsad_core.devices import configured_device
from fsad_core.imageio import (
    DECODED_BYTES_PER_PIXEL,
    ImageLimits,
    PixelBudget,
    image_limits,
    read_header,
    read_image,
    work_factor,
)

LOADER_MODULE = "flows.pyfunc"
DATA_DIRNAME = "detector"  # the model folder's name inside the artifact's data/ folder
INPUT_COLUMN = "image"
_DATA_PATH = f"data/{DATA_DIRNAME}"
_ARTIFACT_FILES = {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "registered_model_meta",
                   "input_example.json", "serving_input_example.json"}  # what MLflow writes beside them
CODE_DIRNAME = "code"  # where MLflow puts ``code_paths`` inside the artifact
SERVED_PACKAGES = ("fsad_core", "flows")  # the packages whose files the artifact carries
_SERVED_FLOWS_FILES = ("__init__.py", "pyfunc.py")  # of ``flows``, only the loader: no Prefect in serving
MAPS_PARAM = "maps"  # request parameter: answer with each image's overlay as base64 PNG
MAP_SIDE = 1024  # the longest side of an overlay in an answer
SERVE_MEMORY_ENV = "FSAD_SERVE_MEMORY_MB"
DEFAULT_SERVE_MEMORY_MB = 1536  # what the requests of a served model may take above its idle size
MEMORY_WAIT_S = 40.0  # how long a request waits for its share before it is refused (MLflow's timeout is 60 s)
# The memory of one row beyond the decoder's (`DECODED_BYTES_PER_PIXEL` of the header's pixels),
# a pixel of its working image: its float copies while read and scored; its map while kept; and
# an overlay's working copies (at most `MAP_SIDE` a side). tests/reliability/test_serve_memory.py holds them.
WORK_BYTES_PER_PIXEL = 64
MAP_BYTES_PER_PIXEL = 8
OVERLAY_BYTES = MAP_SIDE * MAP_SIDE * 96
INFERENCE_BYTES = 384 * 2**20  # one model pass over a batch, held back from the rows' budget
_INFERENCE = threading.Lock()
_BUDGET_LOCK = threading.Lock()
_BUDGET: dict[int, MemoryBudget] = {}  # the process's budget, under the megabytes it was made for
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelIdentity:
    """The registered model an answer comes from ("" where it cannot be known)."""

    name: str = ""
    version: str = ""


class DetectorModel:
    """What ``mlflow.pyfunc.load_model`` wraps: a DataFrame of images in, decisions out."""

    def __init__(self, detector: Detector, identity: ModelIdentity = ModelIdentity()):
        self.detector = detector
        self.identity = identity

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """``image`` column: base64 of PNG/JPEG/... bytes -> ``score`` and ``threshold`` (0.5) in the score
        unit (`fsad_core.units`), ``is_anomaly``,
        ``model_name``, ``model_version``, ``error``, and ``map_png`` (base64 of the overlay on the
        model's colour scale, at most `MAP_SIDE` pixels a side, with ``params={"maps": True}``; ""
        otherwise).

        A row that cannot be used gets its reason in ``error``, no score (None: ``null`` in the
        served JSON, which admits no NaN) and ``is_anomaly`` true (a part whose image cannot be
        judged is not passed); the other rows are scored as usual.
        The rows' memory is reckoned from their headers and held against the process's budget
        (`serving_budget`) before anything is decoded: rows that cannot fit are refused, and a
        request that finds the budget taken waits its turn, or is refused once `MEMORY_WAIT_S` pass."""
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"input needs a column {INPUT_COLUMN!r}; got {list(model_input.columns)}")
        with_maps = bool((params or {}).get(MAPS_PARAM, False))
        cells = model_input[INPUT_COLUMN].tolist()
        budget = serving_budget()
        admitted, errors = _admitted_rows(cells, image_limits(), budget.total, with_maps)
        threshold = self.detector.threshold
        pictures = [""] * len(cells)
        with budget.share(_request_cost(admitted.values(), with_maps), MEMORY_WAIT_S) as granted:
            images = _decoded(admitted, errors) if granted else _refused_busy(admitted, errors)
            scores: Any = []
            if images:
                with _INFERENCE:  # one model pass at a time: its activations are not in the rows' reckoning
                    result = self.detector.score(list(images.values()), with_maps=with_maps)
                scores = result.raw_scores
                if with_maps:
                    for row, image, amap in zip(images, images.values(), result.maps):
                        pictures[row] = _overlay_png(image, amap, self.detector.map_anchor())
        by_row = dict(zip(images, decided([f"row {row}" for row in images], scores, threshold)))
        decisions = [by_row.get(row) or undecided(f"row {row}", errors[row]) for row in range(len(cells))]
        return pd.DataFrame({"score": pd.Series([d.score for d in decisions], dtype=object),
                             "is_anomaly": [d.is_anomaly for d in decisions],
                             "threshold": [d.threshold for d in decisions],
                             "model_name": self.identity.name, "model_version": self.identity.version,
                             "error": [d.error for d in decisions], "map_png": pictures})


@dataclass(frozen=True)
class _Row:
    """A request row admitted from its header: its bytes and the memory it will take."""

    data: bytes
    while_scored: int  # bytes while it is decoded, reduced and scored (one row at a time)
    kept: int  # bytes it holds until the answer goes (its working image, map and overlay)


def serving_budget() -> MemoryBudget:
    """The memory the requests of this process may hold together above its idle size, less the
    model pass's own (`FSAD_SERVE_MEMORY_MB`, default `DEFAULT_SERVE_MEMORY_MB`; with ``--workers
    N`` each process has its own, so give each the N-th part)."""
    with _BUDGET_LOCK:
        megabytes = _serve_memory_mb()
        if _BUDGET.get(megabytes) is None:
            _BUDGET.clear()
            _BUDGET[megabytes] = MemoryBudget(megabytes * 2**20 - INFERENCE_BYTES)
        return _BUDGET[megabytes]


def _serve_memory_mb() -> int:
    text = os.environ.get(SERVE_MEMORY_ENV) or str(DEFAULT_SERVE_MEMORY_MB)
    try:
        megabytes = int(text)
    except ValueError:
        raise ValueError(f"{SERVE_MEMORY_ENV}={text!r}: not a whole number of megabytes") from None
    if megabytes * 2**20 <= 2 * INFERENCE_BYTES:
        raise ValueError(f"{SERVE_MEMORY_ENV}={text!r}: at least {2 * INFERENCE_BYTES // 2**20 + 1} MB")
    return megabytes


def _row_memory(width: int, height: int, with_maps: bool) -> tuple[int, int]:
    """(bytes while scored, bytes kept) of an image of this header size (`_Row`)."""
    factor = work_factor(width, height)
    work = math.ceil(width / factor) * math.ceil(height / factor)
    while_scored = DECODED_BYTES_PER_PIXEL * width * height + WORK_BYTES_PER_PIXEL * work
    kept = 3 * work + ((MAP_BYTES_PER_PIXEL * work + OVERLAY_BYTES) if with_maps else 0)
    return while_scored, kept


def _request_cost(rows: Any, with_maps: bool) -> int:
    rows = list(rows)
    return max((r.while_scored for r in rows), default=0) + sum(r.kept for r in rows)


def _admitted_rows(cells: list[Any], limits: ImageLimits, memory: int,
                   with_maps: bool) -> tuple[dict[int, _Row], list[str]]:
    """row -> its bytes and memory for the rows that can be scored, and each row's error ("" when
    admitted); from the headers alone, in order, while the request's images stay within the set
    budget of decoded pixels and its memory within ``memory``."""
    admitted: dict[int, _Row] = {}
    errors = [""] * len(cells)
    pixels = PixelBudget(limits, "the request up to {label}", advice="send fewer at once")
    for row, cell in enumerate(cells):
        try:
            header = read_header(image_bytes(cell, row, limits), f"row {row}", limits)
            pixels.check(header)
            candidate = _Row(header.source, *_row_memory(header.width, header.height, with_maps))
            if _request_cost([*admitted.values(), candidate], with_maps) > memory:
                raise ValueError(f"row {row}: refused, the request's images need more memory than the server's "
                                 f"budget ({SERVE_MEMORY_ENV}); send fewer at once")
            admitted[row] = candidate
            pixels.add(header)
        except ValueError as exc:
            errors[row] = str(exc)
    return admitted, errors


def _decoded(admitted: dict[int, _Row], errors: list[str]) -> dict[int, np.ndarray]:
    """row -> image for the admitted rows that decode; the others get their reason."""
    images: dict[int, np.ndarray] = {}
    for row, entry in admitted.items():
        try:
            images[row] = read_image(entry.data, name=f"row {row}")
        except ValueError as exc:
            errors[row] = str(exc)
    return images


def _refused_busy(admitted: dict[int, _Row], errors: list[str]) -> dict[int, np.ndarray]:
    for row in admitted:
        errors[row] = (f"row {row}: refused, the server's memory budget stayed taken by other requests for "
                       f"{MEMORY_WAIT_S:g} s; try again")
    return {}


def _overlay_png(image: np.ndarray, amap: np.ndarray, anchor: float) -> str:
    """The overlay as base64 PNG, the image and its map first reduced to at most `MAP_SIDE` a side."""
    from fsad_core.overlay import overlay

    factor = math.ceil(max(image.shape[:2]) / MAP_SIDE)
    if factor > 1:
        image = np.asarray(Image.fromarray(image).reduce(factor))
        amap = np.asarray(Image.fromarray(np.asarray(amap, dtype=np.float32), mode="F").reduce(factor))
    return encode_png(overlay(image, amap, anchor))


def image_bytes(value: Any, row: int, limits: ImageLimits) -> bytes:
    """One input cell's image bytes: base64 of them (raw bytes from Python callers).

    Never a path: a served model must not open files on the server for its callers."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"row {row}: expected base64 image bytes, got {type(value).__name__}")
    if len(value) > _base64_chars(limits.max_file_bytes):
        raise ValueError(f"row {row}: refused, {len(value)} base64 characters exceed the per-file limit of "
                         f"{limits.max_file_bytes} bytes (FSAD_MAX_FILE_BYTES)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"row {row}: not base64 image bytes") from None


def _base64_chars(n_bytes: int) -> int:
    return 4 * ((n_bytes + 2) // 3)


def encode_png(image: np.ndarray) -> str:
    """Base64 of an RGB array as PNG: the wire format of the ``image`` column."""
    from fsad_core.overlay import png_bytes

    return base64.b64encode(png_bytes(image)).decode("ascii")


def load_served_model(data_path: str | Path, identity: ModelIdentity = ModelIdentity()) -> DetectorModel:
    """The model folder as served: on FSAD_DEVICE, behind `DetectorModel.predict`."""
    return DetectorModel(Detector.load(data_path, device=configured_device()), identity)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> DetectorModel:
    """MLflow's entry point for ``loader_module`` (``mlflow models serve``, ``pyfunc.load_model``):
    the registered name comes with the artifact, the version from the registry, asked once."""
    from mlflow.models import Model

    name = (model_config or {}).get("model_name", "")
    run_id = Model.load(str(Path(data_path).parent.parent)).run_id
    return load_served_model(data_path, ModelIdentity(name, registered_version(name, run_id)))


def registered_version(name: str, run_id: str | None) -> str:
    """The newest version of ``name`` registered from ``run_id``; "" (and a warning) when the
    registry cannot say, so that a model served off-line still answers."""
    if not name or not run_id:
        return ""
    try:
        from mlflow import MlflowClient

        found = MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except Exception as exc:  # registry unreachable: the answers say "" rather than the server failing
        log.warning("model version of %s unknown (registry: %s: %s)", name, type(exc).__name__, exc)
        return ""
    return str(max(int(v.version) for v in found)) if found else ""


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec("double", "score"), ColSpec("boolean", "is_anomaly"), ColSpec("double", "threshold"),
               ColSpec("string", "model_name"), ColSpec("string", "model_version"), ColSpec("string", "error"),
               ColSpec("string", "map_png")]
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]), outputs=Schema(outputs),
                          params=ParamSchema([ParamSpec(MAPS_PARAM, "boolean", False)]))


def served_code() -> dict[str, bytes]:
    """The code the artifact carries, path under ``code/`` -> bytes: every module of ``fsad_core``
    and, of ``flows``, this loader; read from this installation."""
    root = Path(__file__).resolve().parent.parent
    files = {f"fsad_core/{p.name}": p.read_bytes() for p in sorted((root / "fsad_core").glob("*.py"))}
    files.update({f"flows/{name}": (root / "flows" / name).read_bytes() for name in _SERVED_FLOWS_FILES})
    return files


def requirements(code: dict[str, bytes] | None = None) -> list[str]:
    """Pins of the third-party distributions the served code imports, read from its source so that
    the list cannot fall behind the code (given explicitly: MLflow's inference would load the model
    in a subprocess, which is slow and adds nothing)."""
    providers = metadata.packages_distributions()
    pins: set[str] = set()
    for module in sorted(_third_party_imports(code if code is not None else served_code())):
        if module not in providers:
            raise RuntimeError(f"the served code imports {module!r}, which no installed distribution provides")
        pins |= {f"{dist}=={metadata.version(dist).split('+')[0]}" for dist in providers[module]}  # no +cpu
    return sorted(pins, key=str.lower)


def _third_party_imports(code: dict[str, bytes]) -> set[str]:
    """Top-level names of the modules ``code`` imports, less the standard library and itself."""
    names: set[str] = set()
    for source in code.values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(SERVED_PACKAGES)


def log_pyfunc_model(model_dir: Path, example_image: np.ndarray, model_name: str = "", name: str = "model") -> Any:
    """Log ``model_dir`` as the active run's pyfunc model, with its code and the registered model
    name its answers carry; returns MLflow's ModelInfo."""
    import mlflow

    if model_dir.name != DATA_DIRNAME:
        raise ValueError(f"model folder must be named {DATA_DIRNAME!r} (its name inside the artifact), "
                         f"got {model_dir.name!r}")
    code = served_code()
    with tempfile.TemporaryDirectory(prefix="fsad-code-") as staging:
        for rel, data in code.items():
            (Path(staging) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(staging) / rel).write_bytes(data)
        return mlflow.pyfunc.log_model(
            name=name, loader_module=LOADER_MODULE, data_path=str(model_dir), signature=signature(),
            code_paths=[str(Path(staging) / package) for package in SERVED_PACKAGES],
            model_config={"model_name": model_name} if model_name else None,
            input_example=pd.DataFrame({INPUT_COLUMN: [encode_png(example_image)]}),
            pip_requirements=requirements(code))


def artifact_problem(pyfunc_dir: str | Path, own_code: bool = True) -> str | None:
    """Why a downloaded artifact is not one this pipeline wrote, or None when it is: MLmodel names
    this module as its only loader, its bundled code holds only the files `log_pyfunc_model`
    bundles and, with ``own_code``, byte for byte this installation's (what promotion requires, as
    that code is what ``mlflow models serve`` runs), and every other file is one it writes. A
    planted loader, foreign code or a pickle is refused before anything is imported; the pipeline
    itself never imports bundled code, so a model logged by another fsad version still scores."""
    from mlflow.models import Model

    root = Path(pyfunc_dir)
    try:
        flavors = Model.load(str(root)).flavors
    except Exception as exc:  # a missing or malformed MLmodel is a verdict, not a crash
        return f"MLmodel unreadable ({type(exc).__name__})"
    conf = flavors.get("python_function") or {}
    if set(flavors) != {"python_function"} or conf.get("loader_module") != LOADER_MODULE:
        return (f"MLmodel names another loader ({conf.get('loader_module')!r}, flavors {sorted(flavors)}), "
                f"not {LOADER_MODULE}")
    if conf.get("code") not in (None, CODE_DIRNAME):
        return f"MLmodel bundles code at {conf['code']!r}, not {CODE_DIRNAME}"
    if conf.get("data") != _DATA_PATH:
        return f"MLmodel's data path is {conf.get('data')!r}, not {_DATA_PATH}"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())
    code = {f"{CODE_DIRNAME}/{rel}": data for rel, data in served_code().items()} if conf.get("code") else {}
    written = _ARTIFACT_FILES | {f"{_DATA_PATH}/{name}" for name in MODEL_FILES} | set(code)
    foreign = [f for f in files if f not in written]
    if foreign:
        return f"artifact holds files the pipeline never writes: {', '.join(foreign[:10])}"
    if own_code and (altered := [rel for rel, data in code.items()
                                 if not (root / rel).is_file() or (root / rel).read_bytes() != data]):
        return f"bundled code is not this fsad's own: {', '.join(altered[:10])}"
    return None


def model_file_digests(folder: str | Path) -> dict[str, str]:
    """name -> sha256 of each model file in a model folder: what verification compares byte for byte."""
    return {name: hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest() for name in MODEL_FILES
            if (Path(folder) / name).is_file()}


def model_folder(pyfunc_dir: str | Path) -> Path:
    """The detector folder inside a downloaded pyfunc model folder (from its MLmodel file)."""
    from mlflow.models import Model

    root = Path(pyfunc_dir)
    conf = Model.load(str(root)).flavors.get("python_function") or {}
    if conf.get("loader_module") != LOADER_MODULE or not conf.get("data"):
        raise ValueError(f"{root}: not an fsad pyfunc model (loader_module {conf.get('loader_module')!r})")
    return root / conf["data"]
