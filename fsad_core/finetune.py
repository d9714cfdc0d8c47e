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

_MAX_GRAD_NORM = 5.0  # one odd batch of a handful of images must not throw the weights far


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


@dataclass
class _EarlyStop:
    """Patience on an exponential moving average of the loss, so that one lucky batch does not reset it."""

    patience: int
    min_improvement: float  # relative: the average must fall below best * (1 - min_improvement)
    best: float = math.inf
    since_best: int = 0
    average: float | None = None

    def update(self, loss: float) -> bool:
        """Take one step's loss; True once ``patience`` steps have passed without improvement."""
        self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss
        if self.average < self.best * (1 - self.min_improvement):
            self.best, self.since_best = self.average, 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience


def _optimizer(net: Network, config: FinetuneConfig
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the suffix and the head at their own rates (the head starts from scratch, the suffix
    is pretrained), its rates annealed to zero over the planned steps."""
    groups = [
        {"params": list(net.suffix_parameters()), "lr": config.lr_backbone},
        {"params": list(net.head.parameters()), "lr": config.lr_head},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.steps))


def _autocast(device: torch.device) -> torch.autocast:
    """bfloat16 on a GPU for speed (float32's range, so no loss scaling); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _draw_batch(rng: np.random.Generator, normal_cache: torch.Tensor, view_source: torch.Tensor,
                negative_cache: torch.Tensor, config: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached prefix outputs of one batch and the image each view came from (-1: a synthetic negative)."""
    normal_idx, negative_idx = _sample_batch(rng, view_source, negative_cache.shape[0], config)
    features, source = normal_cache[normal_idx], view_source[normal_idx]
    if len(negative_idx):
        features = torch.cat([features, negative_cache[negative_idx]])
        source = torch.cat([source, torch.full((len(negative_idx),), -1, dtype=source.dtype)])
    return features, source


def _batch_loss(net: Network, features: torch.Tensor, source: torch.Tensor, autocast: torch.autocast,
                weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """The contrastive loss of one batch through the trained suffix and head, and its terms."""
    with autocast:
        _, pooled = net.forward_suffix(features)
        z = net.project(net.embedding(pooled))
    return contrastive_loss(z, source, source >= 0, weights)


def _update(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
            loss: torch.Tensor) -> None:
    """One clipped optimiser step and one scheduler step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                   _MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()


def _finite_value(loss: torch.Tensor, step: int) -> float:
    """The loss as a float; a NaN or infinite one stops the run, since every later step would build on it."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"fine-tuning diverged at step {step} (loss {value})")
    return value


def finetune(net: Network, normal_cache: torch.Tensor, view_source: torch.Tensor, negative_cache: torch.Tensor,
             config: FinetuneConfig, seed: int, device: torch.device,
             progress: Callable[[int, int, float], None] | None = None) -> TrainingHistory:
    """Train net's suffix and head. normal_cache/negative_cache: prefix outputs (NxCxhxw)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.to(device).eval()
    optimizer, scheduler = _optimizer(net, config)
    negatives = negative_cache if config.loss.uses_negatives else negative_cache[:0]  # no weight: none drawn
    autocast = _autocast(device)
    early_stop = _EarlyStop(config.patience, config.min_improvement)
    history = TrainingHistory()
    start = time.perf_counter()
    for step in range(config.steps):
        features, source = _draw_batch(rng, normal_cache, view_source, negatives, config)
        loss, terms = _batch_loss(net, features.to(device), source.to(device), autocast, config.loss)
        _update(optimizer, scheduler, loss)
        value = _finite_value(loss, step)
        history.loss.append(value)
        history.terms.append(terms)
        stopping = early_stop.update(value)
        if progress is not None:
            progress(step + 1, config.steps, value)
        if stopping:
            history.stopped_early = True
            break
    history.seconds = time.perf_counter() - start
    return history
