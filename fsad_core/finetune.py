"""Contrastive fine-tuning on the k normal images (COFT-AD), on cached prefix outputs.

A pool of augmented views of each normal image and of synthetic negatives is pushed once through
the frozen prefix; training steps then sample batches from that cache and update only the suffix
and the projection head. Batch-norm statistics stay frozen (eval mode): with a handful of images
they would otherwise drift to the batch and destabilise the features we score with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .losses import LossWeights, contrastive_loss
from .network import Network


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 60
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    normals_per_batch: int = 16
    negatives_per_batch: int = 8
    patience: int = 40
    min_improvement: float = 0.01
    loss: LossWeights = field(default_factory=LossWeights)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss"] = self.loss.to_dict()
        return d


@dataclass
class TrainingHistory:
    loss: list[float] = field(default_factory=list)
    terms: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _sample_batch(rng: np.random.Generator, view_source: torch.Tensor, n_negatives_cached: int,
                  config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the normal-view cache (two views per drawn image at least) and the negative cache."""
    sources = view_source.unique().numpy()
    per_image = max(2, config.normals_per_batch // len(sources))
    normal_idx: list[int] = []
    for s in rng.permutation(sources)[:max(1, config.normals_per_batch // per_image)]:
        candidates = np.nonzero(view_source.numpy() == s)[0]
        normal_idx.extend(rng.choice(candidates, size=min(per_image, len(candidates)), replace=False))
    neg_idx = rng.choice(n_negatives_cached, size=min(config.negatives_per_batch, n_negatives_cached),
                         replace=False) if n_negatives_cached else np.zeros(0, int)
    return np.asarray(normal_idx), neg_idx


def finetune(net: Network, normal_cache: torch.Tensor, view_source: torch.Tensor, negative_cache: torch.Tensor,
             config: FinetuneConfig, seed: int, device: torch.device,
             progress: Callable[[int, int, float], None] | None = None) -> TrainingHistory:
    """Train net's suffix and head. normal_cache/negative_cache: prefix outputs (NxCxhxw)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.to(device).eval()
    params = [
        {"params": [p for p in net.suffix_parameters()], "lr": config.lr_backbone},
        {"params": list(net.head.parameters()), "lr": config.lr_head},
    ]
    optimizer = torch.optim.AdamW(params, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.steps))
    use_negatives = config.loss.uses_negatives and negative_cache.shape[0] > 0
    history = TrainingHistory()
    best, since_best = math.inf, 0
    ema: float | None = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    start = time.perf_counter()
    for step in range(config.steps):
        n_idx, g_idx = _sample_batch(rng, view_source, negative_cache.shape[0] if use_negatives else 0, config)
        h = normal_cache[n_idx]
        source = view_source[n_idx]
        if len(g_idx):
            h = torch.cat([h, negative_cache[g_idx]])
            source = torch.cat([source, torch.full((len(g_idx),), -1, dtype=source.dtype)])
        is_normal = source >= 0
        with autocast:
            _, pooled = net.forward_suffix(h.to(device))
            z = net.project(net.embedding(pooled))
        loss, terms = contrastive_loss(z, source.to(device), is_normal.to(device), config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 5.0)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"fine-tuning diverged at step {step} (loss {value})")
        history.loss.append(value)
        history.terms.append(terms)
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if ema < best * (1 - config.min_improvement):
            best, since_best = ema, 0
        else:
            since_best += 1
        if progress is not None:
            progress(step + 1, config.steps, value)
        if since_best >= config.patience:
            history.stopped_early = True
            break
    history.seconds = time.perf_counter() - start
    return history
