"""The model folder as an MLflow pyfunc model, loaded by module: no pickle anywhere.

MLflow's classic custom flavour is used: ``log_model(loader_module="flows.pyfunc", data_path=DIR)``
copies the model folder (config.json + safetensors) into the artifact, and loading calls
``_load_pyfunc(path)`` of this module. No ``python_model.pkl`` is written, so loading a registered
model never unpickles anything from the artifact (DESIGN.md "Model artifact"). Serving it needs
the fsad package installed, which the pip requirements say.
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

from fsad_core.detector import Detector
from fsad_core.imageio import read_image

LOADER_MODULE = "flows.pyfunc"
DATA_DIRNAME = "detector"  # the model folder's name inside the artifact's data/ folder
INPUT_COLUMN = "image"
_MAX_PATH_CHARS = 4096
_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pandas", "pillow", "mlflow")


class DetectorModel:
    """What ``mlflow.pyfunc.load_model`` wraps: a DataFrame of images in, scores and flags out."""

    def __init__(self, detector: Detector):
        self.detector = detector

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """``image`` column: base64 PNG/JPEG bytes, raw bytes or a file path -> ``score``, ``is_anomaly``."""
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"input needs a column {INPUT_COLUMN!r}; got {list(model_input.columns)}")
        images = [decode_image(v, i) for i, v in enumerate(model_input[INPUT_COLUMN].tolist())]
        result = self.detector.score(images)
        return pd.DataFrame({"score": result.scores.astype(np.float64),
                             "is_anomaly": np.asarray(result.is_anomaly, dtype=bool)})


def decode_image(value: Any, row: int = 0) -> np.ndarray:
    """One input cell as an RGB array: bytes, a path to an existing file, or base64 of the bytes."""
    if isinstance(value, (bytes, bytearray)):
        return read_image(bytes(value), name=f"row {row}")
    if not isinstance(value, str):
        raise ValueError(f"row {row}: expected base64 image bytes or a file path, got {type(value).__name__}")
    if len(value) < _MAX_PATH_CHARS and os.path.isfile(value):
        return read_image(value)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"row {row}: neither an existing file path nor base64 image bytes") from None
    return read_image(data, name=f"row {row}")


def encode_png(image: np.ndarray) -> str:
    """Base64 of an RGB array as PNG: the wire format of the ``image`` column."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _load_pyfunc(data_path: str) -> DetectorModel:
    """MLflow's entry point for ``loader_module``: the model folder -> a predictable model."""
    return DetectorModel(Detector.load(data_path, device=os.environ.get("FSAD_DEVICE", "auto")))


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
                          outputs=Schema([ColSpec("double", "score"), ColSpec("boolean", "is_anomaly")]))


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


def model_folder(pyfunc_dir: str | Path) -> Path:
    """The detector folder inside a downloaded pyfunc model folder (from its MLmodel file)."""
    from mlflow.models import Model

    root = Path(pyfunc_dir)
    conf = Model.load(str(root)).flavors.get("python_function") or {}
    if conf.get("loader_module") != LOADER_MODULE or not conf.get("data"):
        raise ValueError(f"{root}: not an fsad pyfunc model (loader_module {conf.get('loader_module')!r})")
    return root / conf["data"]
