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
import io
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fsad_core.detector import MODEL_FILES, Detector
from fsad_core.imageio import ImageLimits, image_header_size, image_limits, read_image

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
        """``image`` column: base64 of PNG/JPEG/... bytes -> ``score``, ``is_anomaly``, ``threshold``,
        ``model_name``, ``model_version``, ``error``, and ``map_png`` (base64 of the overlay on the
        model's colour scale, with ``params={"maps": True}``; "" otherwise).

        A row that cannot be used gets its reason in ``error``, a NaN score and ``is_anomaly`` true
        (a part whose image cannot be judged is not passed); the other rows are scored as usual."""
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"input needs a column {INPUT_COLUMN!r}; got {list(model_input.columns)}")
        with_maps = bool((params or {}).get(MAPS_PARAM, False))
        cells = model_input[INPUT_COLUMN].tolist()
        images, errors = _decoded_rows(cells, image_limits())
        scores = np.full(len(cells), np.nan)
        flags = np.ones(len(cells), dtype=bool)
        pictures = [""] * len(cells)
        if images:
            result = self.detector.score(list(images.values()), with_maps=with_maps)
            rows = list(images)
            scores[rows] = result.scores
            flags[rows] = result.is_anomaly
            if with_maps:
                for row, image, amap in zip(rows, images.values(), result.maps):
                    pictures[row] = _overlay_png(image, amap, self.detector.map_anchor())
        return pd.DataFrame({"score": scores, "is_anomaly": flags, "threshold": self.detector.threshold.value,
                             "model_name": self.identity.name, "model_version": self.identity.version,
                             "error": errors, "map_png": pictures})


def _overlay_png(image: np.ndarray, amap: np.ndarray, anchor: float) -> str:
    from fsad_core.overlay import overlay

    return encode_png(overlay(image, amap, anchor))


def _decoded_rows(cells: list[Any], limits: ImageLimits) -> tuple[dict[int, np.ndarray], list[str]]:
    """row -> image for the usable rows, and each row's error ("" when usable); a request's images
    together stay within the set budget, checked from each header before it is decoded."""
    images: dict[int, np.ndarray] = {}
    errors = [""] * len(cells)
    pixels = 0
    for row, cell in enumerate(cells):
        try:
            data = image_bytes(cell, row, limits)
            width, height = image_header_size(data, f"row {row}", limits)
            if pixels + width * height > limits.max_set_pixels:
                raise ValueError(f"row {row}: refused, the request's images exceed the budget of "
                                 f"{limits.max_set_pixels} decoded pixels (FSAD_MAX_SET_PIXELS); send fewer at once")
            images[row] = read_image(data, name=f"row {row}", limits=limits)
            pixels += width * height
        except ValueError as exc:
            errors[row] = str(exc)
    return images, errors


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
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def load_served_model(data_path: str | Path, identity: ModelIdentity = ModelIdentity()) -> DetectorModel:
    """The model folder as served: on FSAD_DEVICE, behind `DetectorModel.predict`."""
    return DetectorModel(Detector.load(data_path, device=os.environ.get("FSAD_DEVICE", "auto")), identity)


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
