"""Synthesized anomalies made from normal images: CutPaste, CutPaste-scar, noise/texture blobs.

Each function takes a 3xHxW float image in [0, 1] and returns (anomalous image, bool HxW mask);
the result differs from the source only inside the mask. They stand in for the defects we do
not have, both as contrastive negatives and as calibration anomalies.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

NEGATIVE_KINDS = ("cutpaste", "scar", "noise_blob", "texture_blob")


def _rect_paste(rng: np.random.Generator, img: torch.Tensor, ph: int, pw: int, angle: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, w = img.shape
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = img[:, sy:sy + ph, sx:sx + pw].clone()
    jitter = torch.tensor(rng.uniform(0.85, 1.15, size=(3, 1, 1)), dtype=img.dtype)
    patch = (patch * jitter).clamp(0, 1)
    # Rotate the patch and its support mask together (affine grid), then paste at a new place.
    side = int(math.ceil(math.hypot(ph, pw)))
    side = min(side, h, w)
    canvas = torch.zeros(4, side, side, dtype=img.dtype)
    oy, ox = (side - min(ph, side)) // 2, (side - min(pw, side)) // 2
    canvas[:3, oy:oy + min(ph, side), ox:ox + min(pw, side)] = patch[:, :side, :side]
    canvas[3, oy:oy + min(ph, side), ox:ox + min(pw, side)] = 1
    if angle:
        theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0]],
                             dtype=img.dtype)[None]
        grid = F.affine_grid(theta, [1, 4, side, side], align_corners=False)
        canvas = F.grid_sample(canvas[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    ty, tx = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    out = img.clone()
    alpha = canvas[3:4]
    mask = torch.zeros(h, w, dtype=torch.bool)
    region = out[:, ty:ty + side, tx:tx + side]
    blended = region * (1 - alpha) + canvas[:3] * alpha
    support = alpha[0] > 0.01
    region[:, support] = blended[:, support]
    mask[ty:ty + side, tx:tx + side] = support
    return out, mask


def cutpaste(rng: np.random.Generator, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A rectangle (2-15% of the area, aspect 0.3-3.3) cut and pasted elsewhere, colour-jittered."""
    _, h, w = img.shape
    area = rng.uniform(0.02, 0.15) * h * w
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    ph = int(min(h - 1, max(2, round(math.sqrt(area * aspect)))))
    pw = int(min(w - 1, max(2, round(math.sqrt(area / aspect)))))
    return _rect_paste(rng, img, ph, pw, angle=0.0)


def cutpaste_scar(rng: np.random.Generator, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A thin long strip (width 2-16 px at 256, length 10-25 px) rotated by up to 45 degrees."""
    _, h, w = img.shape
    scale = min(h, w) / 256
    pw = max(2, int(rng.uniform(2, 16) * scale))
    ph = max(4, int(rng.uniform(10, 25) * scale * 2))
    return _rect_paste(rng, img, ph, pw, angle=float(rng.uniform(-math.pi / 4, math.pi / 4)))


def blob_mask(rng: np.random.Generator, h: int, w: int, coverage: tuple[float, float] = (0.005, 0.06)
              ) -> torch.Tensor:
    """A random smooth blob (thresholded low-frequency noise), like Perlin masks in DRAEM."""
    gh, gw = max(2, h // 32), max(2, w // 32)
    for _ in range(20):
        noise = torch.tensor(rng.normal(size=(1, 1, gh, gw)), dtype=torch.float32)
        field = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
        target = rng.uniform(*coverage)
        thr = torch.quantile(field.flatten(), 1 - target)
        mask = field > thr
        if mask.any():
            return _keep_largest_window(mask, rng)
    raise RuntimeError("could not draw a blob mask")


def _keep_largest_window(mask: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Restrict the blob to one window around a random blob pixel, so it is one compact defect."""
    h, w = mask.shape
    ys, xs = torch.nonzero(mask, as_tuple=True)
    i = int(rng.integers(len(ys)))
    r = max(4, int(min(h, w) * rng.uniform(0.06, 0.18)))
    y0, y1 = max(0, int(ys[i]) - r), min(h, int(ys[i]) + r)
    x0, x1 = max(0, int(xs[i]) - r), min(w, int(xs[i]) + r)
    window = torch.zeros_like(mask)
    window[y0:y1, x0:x1] = True
    return mask & window


def noise_blob(rng: np.random.Generator, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured noise (brighter or darker, smooth or grainy) blended inside a blob mask."""
    _, h, w = img.shape
    mask = blob_mask(rng, h, w)
    sigma_px = rng.choice([1, 4, 16])
    noise = torch.tensor(rng.normal(size=(1, 1, max(2, h // sigma_px), max(2, w // sigma_px))), dtype=img.dtype)
    noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)[0]
    level = float(rng.uniform(-0.5, 0.5))
    stain = (img.mean(0, keepdim=True) + level + 0.15 * noise).clamp(0, 1).expand_as(img)
    beta = float(rng.uniform(0.5, 1.0))
    out = img.clone()
    out[:, mask] = (1 - beta) * img[:, mask] + beta * stain[:, mask]
    return out, mask


def texture_blob(rng: np.random.Generator, img: torch.Tensor, source: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreign texture inside a blob: a rescaled, rotated region of `source` (another normal image or
    a texture), or of the image itself, so the defect has realistic image statistics."""
    _, h, w = img.shape
    mask = blob_mask(rng, h, w)
    src = source if source is not None else img
    zoom = float(rng.uniform(0.25, 0.6))
    k = int(rng.integers(1, 4))
    tex = torch.rot90(src, k, dims=(1, 2))
    th, tw = max(8, int(tex.shape[1] * zoom)), max(8, int(tex.shape[2] * zoom))
    sy, sx = rng.integers(0, tex.shape[1] - th + 1), rng.integers(0, tex.shape[2] - tw + 1)
    tex = F.interpolate(tex[None, :, sy:sy + th, sx:sx + tw], size=(h, w), mode="bilinear", align_corners=False)[0]
    tex = (tex * float(rng.uniform(0.6, 1.4))).clamp(0, 1)
    beta = float(rng.uniform(0.6, 1.0))
    out = img.clone()
    out[:, mask] = (1 - beta) * img[:, mask] + beta * tex[:, mask]
    return out, mask


def synthesize(rng: np.random.Generator, img: torch.Tensor, kinds: tuple[str, ...] = NEGATIVE_KINDS,
               source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One synthetic anomaly of a randomly chosen kind; returns (image, mask, kind). Retries until
    the image really changed (a paste of similar content can be invisible)."""
    for _ in range(10):
        kind = str(rng.choice(kinds))
        if kind == "cutpaste":
            out, mask = cutpaste(rng, img)
        elif kind == "scar":
            out, mask = cutpaste_scar(rng, img)
        elif kind == "noise_blob":
            out, mask = noise_blob(rng, img)
        elif kind == "texture_blob":
            out, mask = texture_blob(rng, img, source)
        else:
            raise ValueError(f"unknown negative kind {kind!r}; one of {NEGATIVE_KINDS}")
        if mask.any() and (out - img).abs().amax() > 0.05:
            return out, mask, kind
    return out, mask, kind
