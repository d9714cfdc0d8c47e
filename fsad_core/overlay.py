"""Anomaly-map overlays as PNG: the image with the map as a heat layer, for people to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float | None = None, vmax: float | None = None,
            alpha: float = 0.45) -> np.ndarray:
    """HxWx3 uint8 blend of the image and a jet-coloured map (scaled to [vmin, vmax])."""
    lo = float(np.min(amap)) if vmin is None else vmin
    hi = float(np.max(amap)) if vmax is None else vmax
    norm = np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1)
    heat = colormaps["jet"](norm)[..., :3] * 255
    return np.clip((1 - alpha) * image + alpha * heat, 0, 255).astype(np.uint8)


def save_overlay(image: np.ndarray, amap: np.ndarray, path: str | Path, vmin: float | None = None,
                 vmax: float | None = None) -> Path:
    Image.fromarray(overlay(image, amap, vmin, vmax)).save(path)
    return Path(path)
