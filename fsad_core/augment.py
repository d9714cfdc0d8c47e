"""Augmentations that keep a normal part normal: crops, flips, small rotations, colour jitter.

Configurable per product (e.g. no flips for text-bearing parts, no rotation for oriented parts).
Built from torchvision.transforms.v2 on float tensors in [0, 1], before normalisation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torchvision.transforms import v2

from .options import FLIPS


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.75, 1.0)
    hflip: bool = True
    vflip: bool = False
    rotation_deg: float = 10.0
    brightness: float = 0.15
    contrast: float = 0.15

    def __post_init__(self) -> None:
        # Checked here so that a bad per-product setting fails before any fit, with the field's name.
        scale = self.crop_scale
        if not (isinstance(scale, tuple) and len(scale) == 2 and all(map(_is_number, scale))
                and 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"crop_scale {scale!r}: two numbers 0 < low <= high <= 1 (shares of the image kept)")
        for name in ("hflip", "vflip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} {getattr(self, name)!r}: true or false")
        if not (_is_number(self.rotation_deg) and 0 <= self.rotation_deg <= 180):
            raise ValueError(f"rotation_deg {self.rotation_deg!r}: degrees from 0 (none) to 180")
        for name in ("brightness", "contrast"):
            if not (_is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1):
                raise ValueError(f"{name} {getattr(self, name)!r}: a jitter from 0 (none) to below 1")

    @property
    def flips(self) -> str:
        """The flip setting by name (a key of FLIPS)."""
        return next(name for name, pair in FLIPS.items() if pair == (self.hflip, self.vflip))

    def to_dict(self) -> dict:
        return asdict(self)


def build_augmenter(config: AugmentConfig, size: int) -> v2.Compose:
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=config.crop_scale, ratio=(0.9, 1.1), antialias=True),
    ]
    if config.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if config.vflip:
        ops.append(v2.RandomVerticalFlip())
    if config.rotation_deg > 0:
        ops.append(v2.RandomRotation(config.rotation_deg, interpolation=v2.InterpolationMode.BILINEAR,
                                     fill=0.5))
    if config.brightness > 0 or config.contrast > 0:
        ops.append(v2.ColorJitter(brightness=config.brightness, contrast=config.contrast))
    return v2.Compose(ops)


def augment_views(image: torch.Tensor, n: int, config: AugmentConfig, generator_seed: int) -> torch.Tensor:
    """n augmented views (nx3xSxS, values in [0, 1]) of one 3xSxS image, reproducible by seed."""
    size = image.shape[-1]
    augmenter = build_augmenter(config, size)
    state = torch.random.get_rng_state()
    torch.manual_seed(generator_seed)
    try:
        views = torch.stack([augmenter(image).clamp(0, 1) for _ in range(n)])
    finally:
        torch.random.set_rng_state(state)
    return views
