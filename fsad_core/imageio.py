"""Reading images safely: any common format and bit depth in, RGB uint8 out, or a clear error.

Bad files (zero bytes, truncated, not an image, decompression bombs) raise ImageReadError naming
the file; the pixel limit is checked from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = int(os.environ.get("FSAD_MAX_PIXELS", 64_000_000))


class ImageReadError(ValueError):
    """A file that cannot be used as an image; the message names the file and the reason."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _open(source: str | Path | bytes, label: str, max_pixels: int) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageReadError(f"{label}: empty file (0 bytes)")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        if not stream.is_file():
            raise ImageReadError(f"{label}: no such file")
        if stream.stat().st_size == 0:
            raise ImageReadError(f"{label}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream)
    except UnidentifiedImageError:
        raise ImageReadError(f"{label}: not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"{label}: refused, too many pixels ({exc})") from None
    except OSError as exc:
        raise ImageReadError(f"{label}: cannot open ({exc})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageReadError(f"{label}: refused, {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return img


def read_image(source: str | Path | bytes, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to an HxWx3 uint8 RGB array: EXIF orientation applied; grey, palette, CMYK, RGBA,
    16-bit and float images converted (16-bit by scaling, alpha composited on black)."""
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    img = _open(source, label, max_pixels)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb_array(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{label}: corrupt or truncated image ({exc})") from None


def to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        arr = np.asarray(img, dtype=np.float32)
        rgb = arr[..., :3] * (arr[..., 3:4] / 255.0)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask as a bool HxW array (any non-zero pixel is defect)."""
    img = _open(path, str(path), max_pixels)
    try:
        img.load()
        arr = np.asarray(img.convert("L"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: corrupt or truncated mask ({exc})") from None
    return arr > 0


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header only."""
    return _open(path, str(path), max_pixels).size
