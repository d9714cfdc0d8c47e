"""What scores a view against a product's normal images, and the per-part scores made of per-view ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import DetectorConfig
from .features import Features
from .gaussian import Gaussian
from .patch_memory import PatchMemory, smooth_and_upsample


@dataclass(frozen=True, eq=False)
class Scoring:
    """A Gaussian a pooled level with its mean normal distance (so levels count alike), and the
    memory of normal patches."""

    gaussians: list[Gaussian]
    level_scale: torch.Tensor  # float64, one a level
    memory: PatchMemory

    def anomaly_maps(self, feats: Features, config: DetectorConfig) -> torch.Tensor:
        """BxSxS maps at the patch branch's input side: nearest-normal-patch distance, upsampled, smoothed."""
        side = config.patch_side
        return smooth_and_upsample(self.memory.distances(feats.patches), side, config.map_sigma * side / 224)

    def components(self, feats: Features, config: DetectorConfig,
                   maps: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Per-view patch scores (each map's maximum), and Mahalanobis ones with the image branch."""
        maps = self.anomaly_maps(feats, config) if maps is None else maps
        per_view = {"patch": maps.flatten(1).amax(dim=1).numpy()}
        if config.image_branch:
            per_view["mahalanobis"] = self.mahalanobis(feats).numpy()
        return per_view

    def mahalanobis(self, feats: Features) -> torch.Tensor:
        """Per-view Mahalanobis score (float64): each level's distance over its mean normal one, summed."""
        return sum(g.distance(p) / s for g, p, s in zip(self.gaussians, feats.pooled, self.level_scale))


def worst_tile(components: dict[str, np.ndarray], part: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-part scores from per-tile ones: each part's highest, in order of part, since a defect
    in any tile makes the part defective."""
    parts = part.unique()  # sorted
    return {name: np.asarray([scores[(part == p).numpy()].max() for p in parts])
            for name, scores in components.items()}


def joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Component scores of several batches or folds joined into one array each."""
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
