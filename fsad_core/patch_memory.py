"""A memory bank of normal patch features; anomaly maps by nearest-neighbour distance.

As in PatchCore: mid-level features aggregated over a 3x3 neighbourhood, brought to one
resolution and concatenated; the bank is reduced by greedy k-centre coreset selection when it
grows past a cap, which keeps the coverage of rare normal patches better than random sampling.
The greedy selection costs (candidates x cap) distance updates; with many images or tiles an
optional candidate cap first draws a seeded random subsample, trading a little coverage for time.

A detector's memory is the union of one coreset per normal image (`group_coresets`), each with its
share of the cap: a model without some images is then the same union without theirs, so the
held-out scores that calibrate the threshold need no coreset of their own, and the selection costs
a k-th of one coreset over all images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .progress import Progress, report


def patch_features(stage_maps: list[torch.Tensor]) -> torch.Tensor:
    """Stage maps (each BxCxHixWi) -> BxCxHxW at the first map's resolution, locally averaged."""
    target = stage_maps[0].shape[-2:]
    parts = []
    for fmap in stage_maps:
        fmap = F.avg_pool2d(fmap.float(), kernel_size=3, stride=1, padding=1)
        if fmap.shape[-2:] != target:
            fmap = F.interpolate(fmap, size=target, mode="bilinear", align_corners=False)
        parts.append(fmap)
    return torch.cat(parts, dim=1)


def greedy_coreset(x: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 128) -> torch.Tensor:
    """Indices of n rows of x chosen by greedy k-centre on a random projection."""
    if n >= x.shape[0]:
        return torch.arange(x.shape[0])
    g = torch.Generator().manual_seed(seed)
    if x.shape[1] > proj_dim:
        proj = torch.randn(x.shape[1], proj_dim, generator=g) / proj_dim ** 0.5
        x = x @ proj
    # Squared distances from one matrix-vector product a step (|a|^2 + |b|^2 - 2ab): the loop runs
    # n times over all rows, so its cost per step is what decides whether k = 8..16 fits in minutes.
    x = x.float().contiguous()
    sq = (x * x).sum(dim=1)
    chosen = [int(torch.randint(x.shape[0], (1,), generator=g))]
    dist = sq + sq[chosen[0]] - 2 * (x @ x[chosen[0]])
    for _ in range(n - 1):
        i = int(torch.argmax(dist))
        chosen.append(i)
        torch.minimum(dist, sq + sq[i] - 2 * torch.mv(x, x[i]), out=dist)
    return torch.tensor(chosen)


class PatchMemory:
    def __init__(self, bank: torch.Tensor):
        self.bank = bank.float()
        self._bank_sq = (self.bank * self.bank).sum(dim=1)

    @classmethod
    def fit(cls, features: torch.Tensor, max_size: int, seed: int = 0,
            max_candidates: int | None = None) -> PatchMemory:
        """features: BxCxHxW patch features of normal images. With `max_candidates`, the coreset is
        chosen from a seeded random subsample of at most that many patches (None: from all)."""
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()
        if max_candidates is not None and flat.shape[0] > max(max_candidates, max_size):
            keep = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:max_candidates]
            flat = flat[keep]
        idx = greedy_coreset(flat, max_size, seed)
        return cls(flat[idx].contiguous())

    @classmethod
    def union(cls, banks: list[torch.Tensor]) -> PatchMemory:
        return cls(torch.cat(banks))

    def distances(self, features: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """BxCxHxW -> BxHxW distance of each patch to its nearest normal patch.

        The nearest squared distance is taken as |b|^2 - 2qb before |q|^2 is added and the root
        drawn, so the root and the norms of the queries are computed once a patch, not once a pair;
        chunks of a few hundred queries keep the distance block in cache."""
        b, c, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, c).float()
        out = torch.empty(flat.shape[0], device=flat.device)
        for start in range(0, flat.shape[0], chunk):
            queries = flat[start:start + chunk]
            nearest = torch.addmm(self._bank_sq, queries, self.bank.T, alpha=-2).amin(dim=1)
            out[start:start + chunk] = (nearest + (queries * queries).sum(dim=1)).clamp_min_(0).sqrt_()
        return out.view(b, h, w)


def group_coresets(features: torch.Tensor, groups: torch.Tensor, max_size: int, seed: int = 0,
                   max_candidates: int | None = None, progress: Progress | None = None) -> dict[int, torch.Tensor]:
    """One coreset bank per group of views (BxCxHxW features, `groups` B ids), each keeping its share
    of `max_size` (and of `max_candidates`) in proportion to its patches."""
    ids = groups.unique().tolist()
    total = len(groups)
    banks = {}
    for g in ids:
        mine = groups == g
        share = int(mine.sum()) / total
        cap = max(1, round(max_size * share))
        candidates = None if max_candidates is None else max(cap, round(max_candidates * share))
        banks[int(g)] = PatchMemory.fit(features[mine], cap, seed, candidates).bank
        report(progress, "memory", len(banks), len(ids))
    return banks


def smooth_and_upsample(dist: torch.Tensor, size: int, sigma: float = 4.0) -> torch.Tensor:
    """BxHxW patch distances -> BxSxS map, bilinear upsampling then Gaussian blur (sigma in pixels)."""
    up = F.interpolate(dist[:, None], size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        radius = int(round(3 * sigma))
        xs = torch.arange(-radius, radius + 1, dtype=up.dtype)
        kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
        kernel = kernel / kernel.sum()
        up = F.conv2d(F.pad(up, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        up = F.conv2d(F.pad(up, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return up[:, 0]
