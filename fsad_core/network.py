"""The network the method trains and scores with: a timm EfficientNet-family backbone split in two.

The prefix (stem and the first blocks) stays frozen, so its outputs for a pool of augmented views
can be computed once and cached; fine-tuning then only runs the suffix (later blocks, conv_head)
and a small projection head, which makes a fit take minutes on a CPU. The same split serves
scoring: patch features come from one prefix stage and one suffix stage, and the image-level
Gaussian uses pooled outputs of the suffix.
"""

from __future__ import annotations

import torch
from torch import nn


class Network(nn.Module):
    def __init__(self, backbone: nn.Module, split: int = 4, patch_blocks: tuple[int, int] = (2, 4),
                 proj_dim: int = 128):
        super().__init__()
        for attr in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"):
            if not hasattr(backbone, attr):
                raise ValueError(f"backbone {type(backbone).__name__} is not EfficientNet-like (no .{attr})")
        n_blocks = len(backbone.blocks)
        if not 1 <= split < n_blocks:
            raise ValueError(f"split must be in [1, {n_blocks - 1}]")
        if not (patch_blocks[0] < split <= patch_blocks[1] < n_blocks):
            raise ValueError(f"patch_blocks {patch_blocks} must straddle split {split}")
        self.backbone = backbone
        self.split = split
        self.patch_blocks = patch_blocks
        embed_dim = backbone.num_features
        self.head = nn.Sequential(nn.Linear(embed_dim, 512), nn.ReLU(inplace=True), nn.Linear(512, proj_dim))
        for p in self.prefix_parameters():
            p.requires_grad_(False)

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

    def forward_prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the early patch map, the prefix output that the suffix continues from)."""
        b = self.backbone
        x = b.bn1(b.conv_stem(x))
        early = x
        for i, block in enumerate(b.blocks[:self.split]):
            x = block(x)
            if i == self.patch_blocks[0]:
                early = x
        return early, x

    def forward_suffix(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (the late patch map, pooled embeddings per level: each suffix block, then the head)."""
        b = self.backbone
        pooled: list[torch.Tensor] = []
        late = h
        for i, block in enumerate(b.blocks[self.split:], start=self.split):
            h = block(h)
            pooled.append(h.mean(dim=(2, 3)))
            if i == self.patch_blocks[1]:
                late = h
        h = b.bn2(b.conv_head(h))
        pooled.append(h.mean(dim=(2, 3)))
        return late, pooled

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(embedding)
