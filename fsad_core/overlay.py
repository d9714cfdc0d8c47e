"""Anomaly-map overlays as PNG: the image with the map as a heat layer, for people to look at.

Every overlay of a model shares one colour scale, from 0 to twice the map level at which a part
reaches the model's threshold (`Detector.map_anchor`): the same colour is the same distance in
every picture, a normal part looks cold and red appears only past the decision level. A colour
bar beside the image reads the scale in the score unit (`fsad_core.units`): its white mark, 0.5,
is the threshold's level, 1 twice it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from .units import AT_THRESHOLD

BAR_WIDTH = 12    # pixels of the colour bar
LABEL_WIDTH = 64  # pixels beside it for its labels


def _scaled(amap: np.ndarray, anchor: float) -> np.ndarray:
    """Map levels on the shared scale: 0 -> 0, the anchor -> 0.5, twice it and above -> 1."""
    return np.clip(np.asarray(amap, dtype=np.float64) / (2 * max(anchor, 1e-12)), 0, 1)


def overlay(image: np.ndarray, amap: np.ndarray, anchor: float, alpha: float = 0.45) -> np.ndarray:
    """HxWx3 uint8: the image blended with the jet-coloured map on the shared scale, and the colour bar."""
    heat = colormaps["jet"](_scaled(amap, anchor))[..., :3] * 255
    blended = np.clip((1 - alpha) * image + alpha * heat, 0, 255).astype(np.uint8)
    return np.concatenate([blended, colour_bar(image.shape[0])], axis=1)


def colour_bar(height: int) -> np.ndarray:
    """Hx(BAR_WIDTH + LABEL_WIDTH)x3 uint8: the scale from 0 (bottom) to twice the anchor (top), the
    anchor's level marked by a white line; labelled in the score unit, where the threshold is 0.5."""
    levels = np.linspace(1, 0, height)[:, None].repeat(BAR_WIDTH, axis=1)
    bar = (colormaps["jet"](levels)[..., :3] * 255).astype(np.uint8)
    strip = Image.fromarray(np.concatenate([bar, np.zeros((height, LABEL_WIDTH, 3), np.uint8)], axis=1))
    draw = ImageDraw.Draw(strip)
    middle = (height - 1) // 2
    draw.line([(0, middle), (BAR_WIDTH + 3, middle)], fill=(255, 255, 255))
    draw.text((BAR_WIDTH + 5, max(0, middle - 5)), f"{AT_THRESHOLD:g}", fill=(255, 255, 255))
    draw.text((BAR_WIDTH + 5, 0), f"{2 * AT_THRESHOLD:g}", fill=(200, 200, 200))
    return np.asarray(strip)


def thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    """The image (or a map) shrunk so that its longer side is at most ``side``, its aspect kept."""
    scale = side / max(image.shape[:2])
    if scale >= 1:
        return np.asarray(image)
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    if image.ndim == 2:
        return np.asarray(Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize(size, Image.BILINEAR))
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def png_bytes(pixels: np.ndarray) -> bytes:
    """An RGB (or grey) uint8 array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def save_overlay(image: np.ndarray, amap: np.ndarray, path: str | Path, anchor: float) -> Path:
    Image.fromarray(overlay(image, amap, anchor)).save(path)
    return Path(path)
