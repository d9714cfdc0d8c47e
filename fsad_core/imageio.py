"""Reading images safely: any common format and bit depth in, RGB uint8 out, or a clear error.

Bad files (zero bytes, too many bytes, truncated, not an image, decompression bombs, shapes the
model cannot use) raise ImageReadError naming the file and the limit; every limit is checked
before a pixel is decoded (bytes from the file's size, pixels and shape from the header).

An image of more than `WORK_PIXELS` is reduced once decoded, by the smallest whole factor that
brings it within (a box filter, on the decoded bytes): the model sees a few hundred pixels a tile,
so nothing it uses is lost, and no copy of an image, float or otherwise, is ever made at full size
beyond the decoder's own.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
WORK_PIXELS = 2048 * 2048  # the most pixels an image keeps once read
DECODED_BYTES_PER_PIXEL = 8  # the decoder's image and one conversion of it, at most, a pixel of the header
# Modes whose pixels cannot be averaged as they are, and the mode each is reduced in.
_REDUCE_AS = {"1": "L", "P": "RGB", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I"}


class ImageReadError(ValueError):
    """A file that cannot be used as an image; the message names the file and the reason."""


class LimitSettingError(ValueError):
    """An input-limit environment variable that is not a usable number; the message names it."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image and one image set may cost before anything is decoded.

    The shape limits bound the work per image: tiling cuts the long side into squares of the short
    side, so the aspect ratio bounds the tiles; the byte and pixel limits bound the memory."""

    max_pixels: int = 64_000_000  # one image, from its header (FSAD_MAX_PIXELS)
    max_file_bytes: int = 128 * 1024 * 1024  # one file, before it is read (FSAD_MAX_FILE_BYTES)
    max_set_pixels: int = 200_000_000  # all images of one upload or training set (FSAD_MAX_SET_PIXELS)
    min_side: int = 32
    max_aspect: float = 16.0  # long side / short side

    def check_pixels(self, width: int, height: int, label: str) -> None:
        if width * height > self.max_pixels:
            raise ImageReadError(f"{label}: refused, {width}x{height} = {width * height} pixels exceeds the limit "
                                 f"of {self.max_pixels}")

    def check_shape(self, width: int, height: int, label: str) -> None:
        """ImageReadError unless the header's size is within the pixel and shape limits."""
        self.check_pixels(width, height, label)
        if min(width, height) < self.min_side:
            raise ImageReadError(f"{label}: refused, {width}x{height}: the shorter side is below the minimum of "
                                 f"{self.min_side} px")
        if max(width, height) > self.max_aspect * min(width, height):
            raise ImageReadError(f"{label}: refused, {width}x{height}: aspect ratio above the limit of "
                                 f"{self.max_aspect:g} to 1")

    def check_bytes(self, size: int, label: str) -> None:
        if size == 0:
            raise ImageReadError(f"{label}: empty file (0 bytes)")
        if size > self.max_file_bytes:
            raise ImageReadError(f"{label}: refused, {size} bytes exceeds the per-file limit of "
                                 f"{self.max_file_bytes} (FSAD_MAX_FILE_BYTES)")

    def check_set(self, pixels: int, count: int, what: str, budget: int | None = None) -> None:
        """ImageReadError when a set's decoded pixels exceed the budget (they are held at once):
        ``budget``, a share of the set budget, or the whole."""
        budget = self.max_set_pixels if budget is None else budget
        if pixels > budget:
            raise ImageReadError(f"{what}: refused, its {count} images hold {pixels} decoded pixels, above the "
                                 f"budget of {budget} (FSAD_MAX_SET_PIXELS)")


_ENV_LIMITS = {"FSAD_MAX_PIXELS": "max_pixels", "FSAD_MAX_FILE_BYTES": "max_file_bytes",
               "FSAD_MAX_SET_PIXELS": "max_set_pixels"}


def image_limits(env: Mapping[str, str] | None = None) -> ImageLimits:
    """The limits with the environment's settings applied; LimitSettingError names a bad one."""
    env = os.environ if env is None else env
    values: dict[str, int] = {}
    for variable, field_name in _ENV_LIMITS.items():
        text = env.get(variable)
        if not text:
            continue
        try:
            values[field_name] = int(text)
        except ValueError:
            raise LimitSettingError(f"{variable}={text!r}: not a whole number") from None
        if values[field_name] < 1:
            raise LimitSettingError(f"{variable}={text!r}: must be at least 1")
    return ImageLimits(**values)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _open(source: str | Path | bytes, label: str, limits: ImageLimits) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        limits.check_bytes(len(source), label)
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        if not stream.is_file():
            raise ImageReadError(f"{label}: no such file")
        limits.check_bytes(stream.stat().st_size, label)
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
    return img


def _label(source: str | Path | bytes, name: str | None) -> str:
    return name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")


@dataclass(frozen=True)
class Header:
    """An image known from its header, checked against the limits: what decoding it will hold."""

    source: str | Path | bytes
    label: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode(self, limits: ImageLimits | None = None) -> np.ndarray:
        return read_image(self.source, self.label, limits)


def read_header(source: str | Path | bytes, name: str | None = None, limits: ImageLimits | None = None) -> Header:
    """The image's header, its file size and shape checked; nothing decoded."""
    label, limits = _label(source, name), limits or image_limits()
    with _open(source, label, limits) as img:
        limits.check_shape(*img.size, label)
        return Header(source, label, *img.size)


def image_header_size(source: str | Path | bytes, name: str | None = None,
                      limits: ImageLimits | None = None) -> tuple[int, int]:
    """(width, height) from the header only, checked against the limits: what decoding would hold."""
    header = read_header(source, name, limits)
    return header.width, header.height


class PixelBudget:
    """The decoded pixels of images held at once, each admitted from its header before it is
    decoded: every reader of several images holds them against one of these."""

    def __init__(self, limits: ImageLimits, what: str, share: int = 1, advice: str = ""):
        self.limits, self.what, self.advice = limits, what, advice  # ``what`` may name the image: {label}
        self.total = limits.max_set_pixels // share  # a reader holding ``share`` sets at once
        self.held = self.count = 0

    def fits(self, header: Header) -> bool:
        return self.held + header.pixels <= self.total

    def check(self, header: Header) -> None:
        """ImageReadError naming the set (and what to do) when the image would overrun the budget."""
        try:
            self.limits.check_set(self.held + header.pixels, self.count + 1, self.what.format(label=header.label),
                                  self.total)
        except ImageReadError as exc:
            raise ImageReadError(f"{exc}; {self.advice}" if self.advice else str(exc)) from None

    def add(self, header: Header) -> Header:
        self.held += header.pixels
        self.count += 1
        return header

    def admit(self, header: Header) -> Header:
        """The header, checked and counted."""
        self.check(header)
        return self.add(header)


def check_set_files(paths: list[Path], what: str, limits: ImageLimits | None = None) -> None:
    """The set budget checked from the files' headers, before any of them is decoded."""
    limits = limits or image_limits()
    sizes = [image_header_size(path, limits=limits) for path in paths]
    limits.check_set(sum(w * h for w, h in sizes), len(sizes), what)


def read_image(source: str | Path | bytes, name: str | None = None,
               limits: ImageLimits | None = None) -> np.ndarray:
    """Decode to an HxWx3 uint8 RGB array: EXIF orientation applied; grey, palette, CMYK, RGBA,
    16-bit and float images converted (16-bit by scaling, alpha composited on black)."""
    label, limits = _label(source, name), limits or image_limits()
    img = _open(source, label, limits)
    limits.check_shape(*img.size, label)
    try:
        img.load()
        sixteen_bit = img.mode.startswith("I;16")
        img = ImageOps.exif_transpose(at_work_size(img))
        return to_rgb_array(img, sixteen_bit)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{label}: corrupt or truncated image ({exc})") from None


def work_factor(width: int, height: int) -> int:
    """The whole factor an image of this size is reduced by when read (1: kept as it is)."""
    return max(1, math.ceil(math.sqrt(width * height / WORK_PIXELS)))


def at_work_size(img: Image.Image) -> Image.Image:
    """A decoded image reduced by its `work_factor`; the image itself when within `WORK_PIXELS`."""
    factor = work_factor(*img.size)
    if factor == 1:
        return img
    if img.mode in _REDUCE_AS:
        img = img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else _REDUCE_AS[img.mode])
    return img.reduce(factor)


EXPECTED_ARRAY = "a uint8 numpy array HxWx3 (RGB) or HxW (grey), as read_image returns"


def checked_array(image: object, index: int) -> np.ndarray:
    """An image handed to the library as HxWx3 uint8: a grey HxW (or HxWx1) one gets three equal
    channels, with a warning; anything else is refused in one line naming the expected form,
    rather than scored wrong (a float image in [0, 1] would read as black) or failing deep in torch."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image {index}: a {type(image).__name__}; expected {EXPECTED_ARRAY}")
    if image.dtype != np.uint8:
        hint = " (from floats in [0, 1]: (image * 255).round().astype(np.uint8))" if image.dtype.kind == "f" else ""
        raise ValueError(f"image {index}: dtype {image.dtype}; expected {EXPECTED_ARRAY}{hint}")
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        warnings.warn(f"image {index}: grey {image.shape[0]}x{image.shape[1]}, scored with its level in all three "
                      f"channels", stacklevel=3)
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    hint = " (drop the alpha channel: image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else ""
    raise ValueError(f"image {index}: shape {image.shape}; expected {EXPECTED_ARRAY}{hint}")


def array_at_work_size(image: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 array reduced as `read_image` reduces what it reads (for arrays handed to the
    library directly: they are scored as the same file read from disk would be)."""
    if work_factor(image.shape[1], image.shape[0]) == 1:
        return image
    return np.asarray(at_work_size(Image.fromarray(image)))


def to_rgb_array(img: Image.Image, sixteen_bit: bool | None = None) -> np.ndarray:
    """HxWx3 uint8 of a decoded image; ``sixteen_bit`` says the file held 16-bit levels (default:
    from the image's mode), which scale to 8 bits whatever their range."""
    sixteen_bit = img.mode.startswith("I;16") if sixteen_bit is None else sixteen_bit
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if sixteen_bit or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        arr = np.asarray(img, dtype=np.float32)
        rgb = arr[..., :3] * (arr[..., 3:4] / 255.0)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: str | Path, limits: ImageLimits | None = None) -> np.ndarray:
    """A ground-truth mask as a bool HxW array (any non-zero pixel is defect)."""
    limits = limits or image_limits()
    img = _open(path, str(path), limits)
    limits.check_pixels(*img.size, str(path))  # a mask's shape is its image's, checked there
    try:
        img.load()
        arr = np.asarray(img.convert("L"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: corrupt or truncated mask ({exc})") from None
    return arr > 0
