"""Scoring an fsad model exported to ONNX (`fsad export`) with onnxruntime, NumPy and Pillow alone.

This file is shipped beside the graph as `fsad_runtime.py` and imports nothing of fsad or torch, so
a line can decide parts with the exported folder and `pip install onnxruntime numpy pillow`::

    from fsad_runtime import ExportedModel, read_rgb
    model = ExportedModel("export-folder")
    result = model.score(read_rgb("part.png"))  # result.score (0.5 = threshold), result.is_anomaly

The graph (`model.onnx`) takes one prepared view, 1x3xSxS float32 in [0, 1] at the model's side S,
and gives its anomaly map and, for models with the image branch, its Mahalanobis score; intensity
standardisation, normalisation, the patch memory and the Gaussians are inside it. What cannot live
in a fixed-shape graph is here: reducing a large image, cutting the views (plain resize, letterbox
or square tiles along the long side, resized as torch's antialiased bilinear resize does, which
Pillow's float resize matches), a part's score as its worst view's, the fusion of the two scores,
the threshold and the score unit. `model.json` holds the numbers these steps need.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

GRAPH_FILE, SPEC_FILE = "model.onnx", "model.json"
AT_THRESHOLD = 0.5  # the threshold in the score unit


@dataclass(frozen=True)
class Scored:
    """One image's decision: ``score`` in the unit (0.5 + (s - t) / 2|t| of the model's own score s
    and threshold t; above 0.5 is flagged), the model's own score and each score component."""

    score: float
    is_anomaly: bool
    raw_score: float
    components: dict[str, float]


def read_rgb(path: str | Path, work_pixels: int = 2048 * 2048) -> np.ndarray:
    """An image file as fsad reads it: reduced by a whole factor to at most ``work_pixels``, EXIF
    orientation applied, 16-bit levels scaled to 8 bits, alpha composited on black; HxWx3 uint8."""
    img = Image.open(path)
    img.load()
    sixteen_bit = img.mode.startswith("I;16")
    factor = max(1, math.ceil(math.sqrt(img.size[0] * img.size[1] / work_pixels)))
    if factor > 1:
        if img.mode in ("1", "P", "PA") or img.mode.startswith("I;16"):
            img = img.convert({"1": "L", "P": "RGBA" if "transparency" in img.info else "RGB", "PA": "RGBA"}
                              .get(img.mode, "I"))
        img = img.reduce(factor)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        levels = np.asarray(img, dtype=np.float64)
        top = 65535.0 if sixteen_bit or levels.max() > 255 else 255.0
        return np.repeat(np.clip(levels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        return np.clip(rgba[..., :3] * (rgba[..., 3:4] / 255.0) + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def at_work_size(image: np.ndarray, work_pixels: int) -> np.ndarray:
    """An HxWx3 array reduced as `read_rgb` reduces a file (a box filter by a whole factor)."""
    factor = max(1, math.ceil(math.sqrt(image.shape[0] * image.shape[1] / work_pixels)))
    return image if factor == 1 else np.asarray(Image.fromarray(image).reduce(factor))


def resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """3xHxW float32 resized channel by channel (Pillow's float bilinear resize, antialiased)."""
    return np.stack([np.asarray(Image.fromarray(c, mode="F").resize((width, height), Image.BILINEAR)) for c in x])


def tile_boxes(h: int, w: int, max_tiles: int) -> list[tuple[int, int, int]]:
    """Square tiles (top, left, side) covering the image along its long side, overlapping evenly."""
    side = min(h, w)
    n = int(np.ceil(max(h, w) / side))
    if n > max_tiles:
        raise ValueError(f"a {w}x{h} image needs {n} tiles, above the limit of {max_tiles} per image")
    starts = np.linspace(0, max(h, w) - side, n).round().astype(int) if n > 1 else np.zeros(1, int)
    return [(int(s), 0, side) if h >= w else (0, int(s), side) for s in starts]


def prepare(image: np.ndarray, side: int, mode: str, max_tiles: int) -> list[np.ndarray]:
    """The views of an HxWx3 uint8 image, each 1x3xSxS float32 in [0, 1]."""
    x = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)
    _, h, w = x.shape
    if mode == "resize":
        views = [resize(x, side, side)]
    elif mode == "letterbox":
        scale = side / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        top, left = (side - nh) // 2, (side - nw) // 2
        canvas = np.empty((3, side, side), np.float32)
        canvas[:] = x.mean(axis=(1, 2), dtype=np.float32)[:, None, None]
        canvas[:, top:top + nh, left:left + nw] = resize(x, nh, nw)
        views = [canvas]
    else:
        views = [resize(x[:, top:top + s, left:left + s], side, side) for top, left, s in tile_boxes(h, w, max_tiles)]
    return [view[None] for view in views]


class ExportedModel:
    """An exported folder (`model.onnx` and `model.json`) loaded into onnxruntime."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime

        folder = Path(folder)
        self.spec = json.loads((folder / SPEC_FILE).read_text())
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(folder / GRAPH_FILE), options,
                                                    providers=["CPUExecutionProvider"])
        self.threshold = float(self.spec["threshold"]["value"])

    def components(self, image: np.ndarray) -> dict[str, float]:
        """The model's own component scores of an HxWx3 uint8 image: each its worst view's, and the
        combined ones (`fused`, `either`) from the two in the fusion's units."""
        spec = self.spec
        image = at_work_size(image, spec["work_pixels"])
        worst: dict[str, float] = {}
        for view in prepare(image, spec["side"], spec["resize"], spec["max_tiles"]):
            outputs = dict(zip(spec["outputs"], self.session.run(None, {spec["input"]: view})))
            scores = {"patch": float(outputs["map"].max())}
            if "mahalanobis" in outputs:
                scores["mahalanobis"] = float(outputs["mahalanobis"][0])
            worst = {name: max(value, worst.get(name, -math.inf)) for name, value in scores.items()}
        if "mahalanobis" in worst:
            (mm, ms), (pm, ps) = spec["fusion"]["mahalanobis"], spec["fusion"]["patch"]
            z_maha, z_patch = (worst["mahalanobis"] - mm) / ms, (worst["patch"] - pm) / ps
            worst.update(fused=z_maha + z_patch, either=max(z_maha, z_patch))
        return worst

    def score(self, image: np.ndarray) -> Scored:
        """The decision on one HxWx3 uint8 RGB image (`read_rgb` reads one as fsad does)."""
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError("expected a uint8 numpy array HxWx3 (RGB), as read_rgb returns")
        components = self.components(image)
        raw = components[self.spec["score"]]
        scale = abs(self.threshold) if abs(self.threshold) > 1e-12 else 1.0
        return Scored(AT_THRESHOLD + (raw - self.threshold) / (2 * scale), raw > self.threshold, raw, components)
