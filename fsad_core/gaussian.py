"""A Gaussian fitted to normal embeddings, scored by Mahalanobis distance.

Few samples in many dimensions (k images x a few dozen views vs 1000-2500 features) make the
sample covariance singular, so it is shrunk towards a scaled identity with the Ledoit-Wolf
coefficient (scikit-learn). The shrunk covariance a*I + b*X'X is inverted through the Woodbury
identity on the n x n Gram matrix, never as a d x d matrix: fitting and storing cost O(n^2 d)
instead of O(d^3), and the model keeps only the n centred samples, not a d x d precision.
The shrinkage coefficient is scikit-learn's Ledoit-Wolf formula rewritten on the Gram matrix
(sklearn's own takes O(n d^2), seconds per level at d = 2560); a test pins it to sklearn's.
"""

from __future__ import annotations

import torch


class Gaussian:
    def __init__(self, mean: torch.Tensor, samples: torch.Tensor, a: float, b: float):
        self.mean = mean.double()
        self.samples = samples.double()  # n x d, centred
        self.a, self.b = float(a), float(b)
        n = self.samples.shape[0]
        gram = self.samples @ self.samples.T
        self._inner = torch.linalg.inv(self.a * torch.eye(n, dtype=torch.float64) + self.b * gram)

    @classmethod
    def fit(cls, x: torch.Tensor) -> Gaussian:
        """x: NxD embeddings (N >= 2)."""
        if x.shape[0] < 2:
            raise ValueError(f"a Gaussian needs at least 2 embeddings, got {x.shape[0]}")
        data = x.double().cpu()
        if not torch.isfinite(data).all():
            raise ValueError("non-finite embeddings")
        mean = data.mean(dim=0)
        centred = data - mean
        n, d = centred.shape
        gram = centred @ centred.T
        shrinkage, mu = ledoit_wolf_from_gram(gram, d)
        return cls(mean, centred, a=shrinkage * mu, b=(1 - shrinkage) / n)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each row of x (NxD) -> N."""
        v = x.double().cpu() - self.mean
        u = v @ self.samples.T
        sq = ((v * v).sum(dim=1) - self.b * torch.einsum("ni,ij,nj->n", u, self._inner, u)) / self.a
        return sq.clamp_min(0).sqrt()

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.samples": self.samples,
                f"{prefix}.ab": torch.tensor([self.a, self.b], dtype=torch.float64)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> Gaussian:
        a, b = state[f"{prefix}.ab"].tolist()
        return cls(state[f"{prefix}.mean"], state[f"{prefix}.samples"], a, b)


def ledoit_wolf_from_gram(gram: torch.Tensor, d: int) -> tuple[float, float]:
    """(shrinkage, mu) of sklearn.covariance.ledoit_wolf_shrinkage(X, assume_centered=True) from
    G = X X' (n x n) and the dimension d, where mu = trace(X'X / n) / d is the identity's scale."""
    n = gram.shape[0]
    diag = torch.diagonal(gram)
    mu = max(float(diag.sum()) / (n * d), 1e-12)
    beta_ = float((diag ** 2).sum())            # sum of (X^2)'(X^2)
    delta_ = float((gram ** 2).sum()) / n ** 2  # ||X'X||_F^2 / n^2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * float(diag.sum()) / n + d * mu ** 2) / d
    beta = min(beta, delta)
    return (0.0 if beta == 0 else beta / delta), mu
