"""The network the method trains and scores with: a timm EfficientNet-family backbone split in two.

The prefix (stem and the first blocks) stays frozen, so its outputs for a pool of augmented views
can be computed once and cached; fine-tuning then only runs the suffix (later blocks, conv_head)
and a small projection head, which makes a fit take minutes on a CPU. The same forward pass
serves scoring: patch maps come from the `patch_blocks`, and the image-level Gaussians use
spatially pooled outputs of every block from `first_level` on, plus the head.

Pooling keeps the mean, the standard deviation and the maximum over positions (`mean+std+max`, the
detector's default): the mean describes the part, the spread how uniform its surface is, which a
small local defect on an otherwise regular surface changes, and each channel's strongest response
rises with a defect of a few cells even when it barely moves the mean and the spread.
"""

from __future__ import annotations

import torch
from torch import nn

from .options import POOLINGS


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: one of {POOLINGS}")


def pool(x: torch.Tensor, stats: str) -> torch.Tensor:
    """BxCxHxW -> Bx(C, 2C or 3C): spatial mean, then standard deviation, then maximum (`POOLINGS`)."""
    mean = x.mean(dim=(2, 3))
    if stats == "mean":
        return mean
    parts = [mean, x.float().std(dim=(2, 3), unbiased=False).to(mean.dtype)]
    if stats == "mean+std+max":
        parts.append(x.amax(dim=(2, 3)))
    return torch.cat(parts, dim=1)


class Network(nn.Module):
    def __init__(self, backbone: nn.Module, split: int, patch_blocks: tuple[int, ...], first_level: int,
                 pooling: str, proj_dim: int = 128):
        super().__init__()
        for attr in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"):
            if not hasattr(backbone, attr):
                raise ValueError(f"backbone {type(backbone).__name__} is not EfficientNet-like (no .{attr})")
        n_blocks = len(backbone.blocks)
        if not 1 <= split < n_blocks:
            raise ValueError(f"split must be in [1, {n_blocks - 1}]")
        if not all(0 <= b < n_blocks for b in patch_blocks) or not 0 <= first_level < n_blocks:
            raise ValueError(f"patch_blocks {patch_blocks} and first_level {first_level} must be in "
                             f"[0, {n_blocks - 1}]")
        check_pooling(pooling)
        self.backbone = backbone
        self.split = split
        self.patch_blocks = tuple(patch_blocks)
        self.first_level = first_level
        self.pooling = pooling
        self.head = nn.Sequential(nn.Linear(backbone.num_features, 512), nn.ReLU(inplace=True),
                                  nn.Linear(512, proj_dim))
        for p in self.prefix_parameters():
            p.requires_grad_(False)
        # Channels-last: oneDNN's depthwise convolutions, most of an EfficientNet, run their
        # backward several times faster in it on a CPU (fine-tuning is most of a fit).
        self.to(memory_format=torch.channels_last)

    def prefix_parameters(self):
        b = self.backbone
        yield from b.conv_stem.parameters()
        yield from b.bn1.parameters()
        for block in b.blocks[:self.split]:
            yield from block.parameters()

    def suffix_parameters(self):
        b = self.backbone
        for block in b.blocks[self.split:]:
            yield from block.parameters()
        yield from b.conv_head.parameters()
        yield from b.bn2.parameters()

    def _blocks(self, h: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, dict[int, torch.Tensor],
                                                                        list[torch.Tensor]]:
        maps: dict[int, torch.Tensor] = {}
        pooled: list[torch.Tensor] = []
        for i in range(start, stop):
            h = self.backbone.blocks[i](h)
            if i in self.patch_blocks:
                maps[i] = h
            if i >= self.first_level:
                pooled.append(pool(h, self.pooling))
        return h, maps, pooled

    def forward_prefix(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(patch maps of prefix blocks, pooled prefix levels, the output the suffix continues from)."""
        b = self.backbone
        h, maps, pooled = self._blocks(b.bn1(b.conv_stem(x)), 0, self.split)
        return maps, pooled, h

    def forward_suffix(self, h: torch.Tensor, pooled_levels: bool = True
                       ) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
        """(patch maps of suffix blocks, pooled levels of suffix blocks then the head's). Without
        `pooled_levels` it stops after the last patch block and returns the maps alone: a patch
        branch at its own input side needs nothing of the later blocks."""
        b = self.backbone
        if not pooled_levels:
            _, maps, _ = self._blocks(h, self.split, max(self.patch_blocks) + 1)
            return maps, []
        h, maps, pooled = self._blocks(h, self.split, len(b.blocks))
        h = b.bn2(b.conv_head(h))
        pooled.append(pool(h, self.pooling))
        return maps, pooled

    def embedding(self, pooled_suffix: list[torch.Tensor]) -> torch.Tensor:
        """The head's mean-pooled features (the first num_features columns of the last level)."""
        return pooled_suffix[-1][:, :self.backbone.num_features]

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(embedding)
