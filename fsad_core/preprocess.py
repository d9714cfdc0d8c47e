"""Turning decoded images into model input: resize policy, intensity, normalisation, tiling.

The resize policy is part of a product's configuration, because parts differ: `resize`
(plain, may change the aspect ratio), `letterbox` (aspect-preserving resize, padded with the
edge colour) and `tile` (the long side is cut into square tiles, each scored separately). So is
the intensity policy: `raw` grey levels, or `standardise`d (every view to one mean and spread), for
parts whose shots differ in exposure or gain; `auto` takes `standardise` for grey images and `raw`
for colour ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .imageio import ImageLimits
from .options import INTENSITY_MODES, INTENSITY_POLICIES, RESIZE_MODES

DEFAULT_RESIZE_MODE = "tile"  # never stretches a part; on a square image it is plain resize
# Mean deviation of an image's channels from their mean, in grey levels, below which it is grey:
# a grey shot stored as RGB (or through a JPEG's colour planes) stays within it, a colour photo not.
GREY_TOLERANCE = 1.0
GREY_BAND_ROWS = 256  # rows `is_grey` converts to float at a time
# The grey-level mean and spread `standardise` gives every view: about those of the photographs
# the ImageNet backbones learned from.
STANDARD_MEAN, STANDARD_SPREAD = 0.45, 0.22
# Tiles of one image at most: what the read limit on the aspect ratio allows, so that an image
# handed over as an array (not read through imageio) cannot cost one tile per pixel either.
MAX_TILES = int(np.ceil(ImageLimits.max_aspect))


@dataclass(frozen=True)
class InputSpec:
    size: int = 224
    mode: str = DEFAULT_RESIZE_MODE
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    intensity: str = "raw"

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.mode!r}: one of {RESIZE_MODES}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity {self.intensity!r}: one of {INTENSITY_MODES}")
        if not 32 <= self.size <= 2048:
            raise ValueError(f"input size {self.size} outside [32, 2048]")


def stretch_warning(shapes: list[tuple[int, ...]], mode: str, tolerance: float = 1.5) -> str | None:
    """A note for the user who chose plain resize for parts it stretches unlike one another.

    Under `resize` every part becomes a square, so parts whose aspect ratios differ by more than
    `tolerance` are distorted differently and their textures stop matching. The default, `tile`,
    keeps the shapes and ranked better where they vary (docs/results.md); plain resize may have been
    chosen for scoring time, so the note asks for a comparison rather than overriding it."""
    if mode != "resize" or not shapes:
        return None
    ratios = [w / h for h, w, *_ in shapes]
    low, high = min(ratios), max(ratios)
    if high / low <= tolerance:
        return None
    return (f"the images' aspect ratios (width / height) range from {low:.2f} to {high:.2f}; plain resize "
            f"stretches them unlike one another. The default resize mode 'tile' keeps their shapes: compare "
            f"the two on a labelled eval set")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def letterbox_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an aspect-preserving fit into size x size."""
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def tile_boxes(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """Square tiles (top, left, side, side) covering the image along its long side, overlapping evenly."""
    side = min(h, w)
    n = int(np.ceil(max(h, w) / side))
    if n > MAX_TILES:
        raise ValueError(f"a {w}x{h} image needs {n} tiles, above the limit of {MAX_TILES} per image "
                         f"(aspect ratio at most {ImageLimits.max_aspect:g} to 1)")
    starts = np.linspace(0, max(h, w) - side, n).round().astype(int) if n > 1 else np.zeros(1, int)
    if h >= w:
        return [(int(s), 0, side, side) for s in starts]
    return [(0, int(s), side, side) for s in starts]


def is_grey(image: np.ndarray) -> bool:
    """Whether an HxWx3 uint8 image carries grey levels only (its three channels agree).

    Taken over bands of rows, so a large part costs a band's float copy, not the whole image's."""
    total = 0.0
    for top in range(0, image.shape[0], GREY_BAND_ROWS):
        x = image[top:top + GREY_BAND_ROWS].astype(np.float32)
        total += float(np.abs(x - x.mean(axis=2, keepdims=True)).sum(dtype=np.float64))
    return total / max(image.size, 1) < GREY_TOLERANCE


def check_intensity_policy(policy: str) -> None:
    if policy not in INTENSITY_POLICIES:
        raise ValueError(f"intensity {policy!r}: one of {INTENSITY_POLICIES}")


def resolve_intensity(policy: str, images: list[np.ndarray]) -> str:
    """The intensity mode a fit uses: `auto` standardises grey products and keeps colour ones raw.

    A grey camera's exposure and gain vary from shot to shot and say little about the part; on the
    grey sets we measured, standardising helped, on the colour one it did not (docs/results.md)."""
    check_intensity_policy(policy)
    if policy != "auto":
        return policy
    return "standardise" if images and all(is_grey(img) for img in images) else "raw"


def standardise_intensity(views: torch.Tensor) -> torch.Tensor:
    """Each view (Nx3xSxS) brought to a fixed grey-level mean and spread (`STANDARD_MEAN`,
    `STANDARD_SPREAD`), so that the exposure and gain of a shot, which vary between normal parts
    of one product, do not read as anomalies; the pattern within the view is kept.

    Applied by `normalise` to every view that enters the network, after augmentation and synthetic
    defects: training views and scored images are treated alike, and no standardised level is
    ever clipped (augmentation clips to [0, 1], which standardised levels may leave)."""
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    spread = views.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (views - mean) / spread * STANDARD_SPREAD + STANDARD_MEAN


def prepare(image: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """Views of one image at model size: Nx3xSxS (N = 1 except in tile mode), in [0, 1].

    Intensity standardisation and normalisation come later (`normalise`), after augmentation and
    synthetic defects."""
    x = to_tensor(image)
    _, h, w = x.shape
    if spec.mode == "resize":
        views = [_resize(x, spec.size, spec.size)]
    elif spec.mode == "letterbox":
        nh, nw, top, left = letterbox_geometry(h, w, spec.size)
        canvas = torch.empty(3, spec.size, spec.size)
        canvas[:] = x.mean(dim=(1, 2))[:, None, None]
        canvas[:, top:top + nh, left:left + nw] = _resize(x, nh, nw)
        views = [canvas]
    else:
        views = [_resize(x[:, top:top + s, left:left + s2], spec.size, spec.size)
                 for top, left, s, s2 in tile_boxes(h, w)]
    return torch.stack(views)


def normalise(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """A batch of views as the network takes it: intensity policy, then the backbone's normalisation."""
    if spec.intensity == "standardise":
        batch = standardise_intensity(batch)
    mean = torch.tensor(spec.mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


def map_to_image(amap: torch.Tensor, h: int, w: int, spec: InputSpec) -> np.ndarray:
    """Anomaly map(s) in model space (NxSxS) back to the original HxW, undoing the resize policy."""
    if spec.mode == "resize":
        return _resize(amap[:1], h, w)[0].numpy()
    if spec.mode == "letterbox":
        nh, nw, top, left = letterbox_geometry(h, w, spec.size)
        return _resize(amap[:1, top:top + nh, left:left + nw], h, w)[0].numpy()
    out = torch.full((h, w), float("-inf"))
    for tile, (top, left, s, s2) in zip(amap, tile_boxes(h, w)):
        region = (slice(top, top + s), slice(left, left + s2))
        out[region] = torch.maximum(out[region], _resize(tile[None], s, s2)[0])
    return out.numpy()
