"""How prepared views become features through the network: its frozen prefix, then its suffix, at
the input side of each branch, give the pooled levels and the patch features the scorers need.

The prefix's outputs are kept (`prefix_outputs`), so fine-tuning, which trains only the suffix,
runs the prefix once; views go through the backbone a few at a time (`views_per_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import get_spec
from .config import DetectorConfig
from .network import Network
from .patch_memory import patch_features
from .preprocess import InputSpec, normalise
from .progress import Progress, report


@dataclass(frozen=True)
class Extractor:
    """The network with what turns prepared views into features: the sides of the two branches,
    the input normalisation and the device."""

    net: Network
    config: DetectorConfig
    spec: InputSpec
    device: torch.device

    def prefixes(self, views: torch.Tensor, image_branch: bool, progress: Progress | None = None) -> _Prefixes:
        return _Prefixes.of(self.net, views, self.config, self.spec, self.device, image_branch, progress)

    def features(self, views: torch.Tensor) -> Features:
        """Patch features of the views, and their pooled levels when the configuration has the image branch."""
        branch = self.config.image_branch
        return self.prefixes(views, branch).features(self.net, self.device, branch)


@dataclass
class _Prefix:
    """Cached outputs of the frozen prefix for a batch of views."""

    maps: dict[int, torch.Tensor]
    pooled: list[torch.Tensor]
    h: torch.Tensor


@dataclass
class Features:
    """What the scorers need of a batch of views: pooled levels and patch features."""

    pooled: list[torch.Tensor]
    patches: torch.Tensor

    def select(self, mask: torch.Tensor) -> Features:
        return Features([p[mask] for p in self.pooled], self.patches[mask])


def resized(views: torch.Tensor, side: int) -> torch.Tensor:
    """A batch of prepared views (Nx3xSxS) at another side; the same tensor when it already fits."""
    if views.shape[-1] == side:
        return views
    return torch.nn.functional.interpolate(views, size=(side, side), mode="bilinear", align_corners=False,
                                           antialias=True)


@dataclass
class _Prefixes:
    """Frozen-prefix outputs of a batch of views for the image branch (at `size`) and for the patch
    branch (at `patch_size`); one and the same when the two sides are equal."""

    image: _Prefix | None  # None: the patch branch alone (`DetectorConfig.image_branch`)
    patch: _Prefix

    @classmethod
    def of(cls, net: Network, views: torch.Tensor, config: DetectorConfig, spec: InputSpec,
           device: torch.device, image_branch: bool = True, progress: Progress | None = None) -> _Prefixes:
        patch = prefix_outputs(net, resized(views, config.patch_side), spec, device, progress)
        if not image_branch:
            return cls(None, patch)
        if config.patch_side == config.size:
            return cls(patch, patch)
        return cls(prefix_outputs(net, resized(views, config.size), spec, device, progress), patch)

    def features(self, net: Network, device: torch.device, pooled_levels: bool = True,
                 progress: Progress | None = None) -> Features:
        """Patch features, and the pooled levels when asked for (which needs the image branch)."""
        if not pooled_levels:
            return _features(net, self.patch, device, pooled_levels=False, progress=progress)
        image = _features(net, self.image, device, progress=progress)
        if self.patch is self.image:
            return image
        return Features(image.pooled, _features(net, self.patch, device, pooled_levels=False,
                                                progress=progress).patches)


def build_network(config: DetectorConfig, backbone: torch.nn.Module) -> Network:
    """The backbone cut where its spec says, pooled as the configuration says."""
    spec = get_spec(config.backbone)
    return Network(backbone, spec.split, spec.patch_blocks, spec.first_level, config.pooling)


def views_per_forward(device: torch.device) -> int:
    """Views one backbone forward takes at once: on a CPU a few views keep the activations in cache
    (faster fits and scoring and a lower peak than large batches, as docs/measurements.md shows);
    a GPU wants them many."""
    return 64 if device.type == "cuda" else 2


@torch.no_grad()
def prefix_outputs(net: Network, views: torch.Tensor, spec: InputSpec, device: torch.device,
                   progress: Progress | None = None) -> _Prefix:
    batch = views_per_forward(device)
    parts = []
    for i in range(0, views.shape[0], batch):
        maps, pooled, h = net.forward_prefix(normalise(views[i:i + batch].to(device), spec))
        parts.append(({j: m.cpu() for j, m in maps.items()}, [p.cpu() for p in pooled], h.cpu()))
        report(progress, "backbone", min(i + batch, views.shape[0]), views.shape[0])
    return _Prefix({j: torch.cat([p[0][j] for p in parts]) for j in parts[0][0]},
                   [torch.cat([p[1][i] for p in parts]) for i in range(len(parts[0][1]))],
                   torch.cat([p[2] for p in parts]))


@torch.no_grad()
def _features(net: Network, pre: _Prefix, device: torch.device, pooled_levels: bool = True,
              progress: Progress | None = None) -> Features:
    """Pooled levels and patch features of cached prefix outputs; without `pooled_levels` the patch
    features alone (and only the blocks they need run). Patch features are made a batch at a time,
    so the upsampled maps of all views never exist at once."""
    batch = views_per_forward(device)
    patch_parts, pooled_parts = [], []
    for i in range(0, pre.h.shape[0], batch):
        maps, pooled = net.forward_suffix(pre.h[i:i + batch].to(device), pooled_levels)
        maps = {**{j: m[i:i + batch] for j, m in pre.maps.items()}, **{j: m.float().cpu() for j, m in maps.items()}}
        patch_parts.append(patch_features([maps[j].float() for j in net.patch_blocks]))
        pooled_parts.append([p.cpu() for p in pooled])
        report(progress, "features", min(i + batch, pre.h.shape[0]), pre.h.shape[0])
    pooled = pre.pooled + [torch.cat([p[i] for p in pooled_parts]) for i in range(len(pooled_parts[0]))]
    if not pooled_levels:
        pooled = []
    return Features([p.double() for p in pooled], torch.cat(patch_parts))
