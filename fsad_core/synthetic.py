"""Generated industrial-looking categories in MVTec layout, with ground-truth masks.

Used by the demo and the tests so that neither needs real data. Textures come from
scikit-image's bundled CC0 images (brick, gravel, grass); objects are drawn procedurally
(a machined washer on a plain background). Defects are scratches, spots, cracks and pasted
foreign material; each is recorded in a 0/255 mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

KINDS = ("texture", "object")
TEXTURES = ("brick", "gravel", "grass")
DEFECT_TYPES = ("scratch", "spot", "crack", "contamination")


def _texture_source(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    img = img.astype(np.float32)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    return img / 255.0


def _texture_normal(rng: np.random.Generator, source: np.ndarray, size: int) -> np.ndarray:
    h, w = source.shape
    crop = min(h, w) // 2
    y, x = rng.integers(0, h - crop), rng.integers(0, w - crop)
    patch = source[y:y + crop, x:x + crop]
    img = np.asarray(Image.fromarray((patch * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
                     dtype=np.float32) / 255.0
    gain = rng.uniform(0.95, 1.05)
    return np.clip(img * gain + rng.normal(0, 0.01, img.shape), 0, 1)


def _object_normal(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = size / 2 + rng.normal(0, size * 0.01)
    cx = size / 2 + rng.normal(0, size * 0.01)
    r = np.hypot(yy - cy, xx - cx)
    outer, inner = size * 0.38, size * 0.15
    img = np.full((size, size), 0.18, np.float32)
    ring = (r < outer) & (r > inner)
    img[ring] = 0.62 + 0.08 * np.cos(r[ring] / size * 60)  # machined grooves
    img[(r <= inner)] = 0.08
    img = ndimage.gaussian_filter(img, 0.8)
    shade = 1 + 0.08 * ((xx - cx) / size)
    return np.clip(img * shade + rng.normal(0, 0.012, img.shape), 0, 1)


def _blob_mask(rng: np.random.Generator, size: int, radius: float, center: tuple[float, float]) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), radius / 2)
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy - center[0], xx - center[1]) / radius
    return (dist + 0.6 * noise / (noise.std() + 1e-8) * 0.3) < 1.0


def _line_mask(rng: np.random.Generator, size: int, center: tuple[float, float], length: float,
               width: float, wiggle: float) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    t = np.linspace(-0.5, 0.5, 200) * length
    offs = np.cumsum(rng.normal(0, wiggle, t.size))
    ys = center[0] + t * np.sin(angle) + offs * np.cos(angle)
    xs = center[1] + t * np.cos(angle) - offs * np.sin(angle)
    mask = np.zeros((size, size), bool)
    ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    mask[ys[ok].astype(int), xs[ok].astype(int)] = True
    return ndimage.binary_dilation(mask, iterations=max(1, int(width)))


def add_defect(rng: np.random.Generator, img: np.ndarray, kind: str, region: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Put one defect of `kind` into a grey image in [0, 1]; returns (image, bool mask)."""
    size = img.shape[0]
    if region is not None and region.any():
        ys, xs = np.nonzero(region)
        i = rng.integers(len(ys))
        center = (float(ys[i]), float(xs[i]))
    else:
        center = (rng.uniform(0.25, 0.75) * size, rng.uniform(0.25, 0.75) * size)
    out = img.copy()
    if kind == "scratch":
        mask = _line_mask(rng, size, center, size * rng.uniform(0.2, 0.4), size / 128, 0.3)
        out[mask] = np.clip(out[mask] + rng.choice([-1, 1]) * 0.45, 0, 1)
    elif kind == "crack":
        mask = _line_mask(rng, size, center, size * rng.uniform(0.15, 0.3), size / 160, 1.5)
        out[mask] = out[mask] * 0.2
    elif kind == "spot":
        mask = _blob_mask(rng, size, size * rng.uniform(0.04, 0.08), center)
        out[mask] = np.clip(out[mask] * 0.35 + rng.uniform(0, 0.1), 0, 1)
    elif kind == "contamination":
        mask = _blob_mask(rng, size, size * rng.uniform(0.05, 0.09), center)
        stain = ndimage.gaussian_filter(rng.uniform(0, 1, img.shape), 1.5)
        stain = (stain - stain.min()) / (np.ptp(stain) + 1e-8)
        out[mask] = 0.5 * out[mask] + 0.5 * (0.85 * stain[mask] + 0.1)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; one of {DEFECT_TYPES}")
    return out, mask


def _save_grey_as_rgb(img: np.ndarray, path: Path, tint: tuple[float, float, float]) -> None:
    rgb = np.clip(img[..., None] * np.asarray(tint, np.float32)[None, None], 0, 1)
    Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(path)


def make_category(root: str | Path, kind: str = "texture", texture: str = "gravel", n_train: int = 8,
                  n_test_good: int = 8, n_test_defect: int = 8, size: int = 128, seed: int = 0,
                  defect_types: tuple[str, ...] = DEFECT_TYPES) -> Path:
    """Write a category in MVTec layout under `root` and return its path."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    source = _texture_source(texture) if kind == "texture" else None
    tint = (1.0, 0.93, 0.82) if kind == "texture" else (0.9, 0.95, 1.0)

    def normal() -> np.ndarray:
        return _texture_normal(rng, source, size) if source is not None else _object_normal(rng, size)

    def part_region(img: np.ndarray) -> np.ndarray | None:
        return None if source is not None else img > 0.45

    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    (root / "test" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        _save_grey_as_rgb(normal(), root / "train" / "good" / f"{i:03d}.png", tint)
    for i in range(n_test_good):
        _save_grey_as_rgb(normal(), root / "test" / "good" / f"{i:03d}.png", tint)
    for i in range(n_test_defect):
        kind_i = defect_types[i % len(defect_types)]
        img = normal()
        img, mask = add_defect(rng, img, kind_i, part_region(img))
        (root / "test" / kind_i).mkdir(exist_ok=True)
        (root / "ground_truth" / kind_i).mkdir(parents=True, exist_ok=True)
        _save_grey_as_rgb(img, root / "test" / kind_i / f"{i:03d}.png", tint)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / kind_i / f"{i:03d}_mask.png")
    return root
