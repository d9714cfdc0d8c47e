"""A Gaussian fitted to normal embeddings, scored by Mahalanobis distance.

Few samples in many dimensions (k images x a few views vs 1000+ features) make the sample
covariance singular, so it is shrunk towards a scaled identity (Ledoit-Wolf, scikit-learn).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf


class Gaussian:
    def __init__(self, mean: torch.Tensor, precision: torch.Tensor):
        self.mean = mean.double()
        self.precision = precision.double()

    @classmethod
    def fit(cls, x: torch.Tensor) -> "Gaussian":
        """x: NxD embeddings (N >= 2)."""
        if x.shape[0] < 2:
            raise ValueError(f"a Gaussian needs at least 2 embeddings, got {x.shape[0]}")
        data = x.double().cpu().numpy()
        if not np.isfinite(data).all():
            raise ValueError("non-finite embeddings")
        lw = LedoitWolf(assume_centered=False).fit(data)
        return cls(torch.from_numpy(lw.location_), torch.from_numpy(lw.get_precision()))

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each row of x (NxD) -> N."""
        d = x.double().cpu() - self.mean
        sq = torch.einsum("nd,de,ne->n", d, self.precision, d).clamp_min(0)
        return sq.sqrt()

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.precision": self.precision}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> "Gaussian":
        return cls(state[f"{prefix}.mean"], state[f"{prefix}.precision"])
