"""The model folder as an MLflow pyfunc model, loaded by module: no pickle anywhere.

MLflow's classic custom flavour is used: ``log_model(loader_module="flows.pyfunc", data_path=DIR)``
copies the model folder (config.json + safetensors) into the artifact, and loading calls
``_load_pyfunc(path)`` of this module. No ``python_model.pkl`` is written, so loading a registered
model never unpickles anything from the artifact. The pipeline itself never lets an artifact name
its loader: `artifact_problem` refuses any artifact this module did not write, and the model is
loaded with `load_served_model`. Serving it needs the fsad package installed, which the pip
requirements say.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
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
_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pandas", "pillow", "mlflow")


class DetectorModel:
    """What ``mlflow.pyfunc.load_model`` wraps: a DataFrame of images in, scores and flags out."""

    def __init__(self, detector: Detector):
        self.detector = detector

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """``image`` column: base64 of PNG/JPEG/... bytes -> ``score``, ``is_anomaly``, ``error``.

        A row that cannot be used gets its reason in ``error``, a NaN score and ``is_anomaly`` true
        (a part whose image cannot be judged is not passed); the other rows are scored as usual."""
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"input needs a column {INPUT_COLUMN!r}; got {list(model_input.columns)}")
        cells = model_input[INPUT_COLUMN].tolist()
        images, errors = _decoded_rows(cells, image_limits())
        scores = np.full(len(cells), np.nan)
        flags = np.ones(len(cells), dtype=bool)
        if images:
            result = self.detector.score(list(images.values()))
            rows = list(images)
            scores[rows] = result.scores
            flags[rows] = np.asarray(result.is_anomaly, dtype=bool)
        return pd.DataFrame({"score": scores, "is_anomaly": flags, "error": errors})


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


def load_served_model(data_path: str | Path) -> DetectorModel:
    """The model folder as served: on FSAD_DEVICE, behind `DetectorModel.predict`."""
    return DetectorModel(Detector.load(data_path, device=os.environ.get("FSAD_DEVICE", "auto")))


_load_pyfunc = load_served_model  # MLflow's entry point for ``loader_module``


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
                          outputs=Schema([ColSpec("double", "score"), ColSpec("boolean", "is_anomaly"),
                                           ColSpec("string", "error")]))


def requirements() -> list[str]:
    """Pinned runtime requirements (given explicitly: MLflow's inference would load the model in a
    subprocess, which is slow and adds nothing)."""
    import fsad_core

    pins = [f"fsad=={fsad_core.__version__}"]
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc_model(model_dir: Path, example_image: np.ndarray, name: str = "model") -> Any:
    """Log ``model_dir`` as the active run's pyfunc model; returns MLflow's ModelInfo."""
    import mlflow

    if model_dir.name != DATA_DIRNAME:
        raise ValueError(f"model folder must be named {DATA_DIRNAME!r} (its name inside the artifact), "
                         f"got {model_dir.name!r}")
    return mlflow.pyfunc.log_model(
        name=name, loader_module=LOADER_MODULE, data_path=str(model_dir), signature=signature(),
        input_example=pd.DataFrame({INPUT_COLUMN: [encode_png(example_image)]}),
        pip_requirements=requirements())


def artifact_problem(pyfunc_dir: str | Path) -> str | None:
    """Why a downloaded artifact is not one this pipeline wrote, or None when it is: MLmodel names
    this module as its only loader and bundles no code, and every file is one `log_pyfunc_model`
    writes (a planted loader, code folder or pickle is refused before anything is imported)."""
    from mlflow.models import Model

    root = Path(pyfunc_dir)
    try:
        flavors = Model.load(str(root)).flavors
    except Exception as exc:  # a missing or malformed MLmodel is a verdict, not a crash
        return f"MLmodel unreadable ({type(exc).__name__})"
    conf = flavors.get("python_function") or {}
    if set(flavors) != {"python_function"} or conf.get("loader_module") != LOADER_MODULE:
        return f"MLmodel names another loader ({conf.get('loader_module')!r}, flavors {sorted(flavors)}), not {LOADER_MODULE}"
    if conf.get("code"):
        return f"MLmodel bundles code ({conf['code']!r})"
    if conf.get("data") != _DATA_PATH:
        return f"MLmodel's data path is {conf.get('data')!r}, not {_DATA_PATH}"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())
    written = _ARTIFACT_FILES | {f"{_DATA_PATH}/{name}" for name in MODEL_FILES}
    foreign = [f for f in files if f not in written]
    if foreign:
        return f"artifact holds files the pipeline never writes: {', '.join(foreign[:10])}"
    return None


def model_folder(pyfunc_dir: str | Path) -> Path:
    """The detector folder inside a downloaded pyfunc model folder (from its MLmodel file)."""
    from mlflow.models import Model

    root = Path(pyfunc_dir)
    conf = Model.load(str(root)).flavors.get("python_function") or {}
    if conf.get("loader_module") != LOADER_MODULE or not conf.get("data"):
        raise ValueError(f"{root}: not an fsad pyfunc model (loader_module {conf.get('loader_module')!r})")
    return root / conf["data"]
