"""The contrastive objective of COFT-AD, with each term weighted and switchable.

A batch holds projections z (L2-normalised) of normal views, tagged with the index of their
source image, and of synthetic negatives. All terms are NT-Xent/SupCon-style: for an anchor,
-log( sum over positives exp(sim/t) / sum over all others exp(sim/t) ).

- instance: the positive is the other view of the same image (adapts features to the product);
- cross:    the positives are the views of the *other* normal images, while the anchor's own
            views stay in the denominator: the term asks that another normal image be as close
            as one's own view, which tightens the normal cluster across instances. It needs
            k >= 2 and works with or without negatives (with them, they are in the denominator);
- negatives: synthetic anomalies are in every denominator; with `negative` > 0 they also anchor
  a term that keeps them apart from the normal cluster, so it cannot absorb them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    instance: float = 1.0
    cross: float = 1.0
    negative: float = 1.0
    temperature: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def uses_negatives(self) -> bool:
        return self.negative > 0


def _supcon(logits: torch.Tensor, positives: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over anchors with at least one positive of -log(sum_pos exp / sum_valid exp)."""
    neg_inf = torch.finfo(logits.dtype).min
    denom = torch.logsumexp(logits.masked_fill(~valid, neg_inf), dim=1)
    numer = torch.logsumexp(logits.masked_fill(~positives, neg_inf), dim=1)
    has_pos = positives.any(dim=1)
    if not has_pos.any():
        return logits.new_zeros(())
    return (denom - numer)[has_pos].mean()


def contrastive_loss(z: torch.Tensor, source: torch.Tensor, is_normal: torch.Tensor,
                     weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """z: NxD projections; source: N source-image ids (normals); is_normal: N bools.

    Returns the weighted loss and each term's value (for the training curves).
    """
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0]
    logits = z @ z.T / weights.temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    normal_pair = is_normal[:, None] & is_normal[None, :] & ~eye
    same = (source[:, None] == source[None, :]) & normal_pair
    valid = ~eye
    if not weights.uses_negatives:  # negatives leave the batch entirely
        valid = valid & is_normal[None, :]
    terms: dict[str, torch.Tensor] = {}
    anchors = is_normal
    if weights.instance > 0:
        terms["instance"] = _supcon(logits[anchors], same[anchors], valid[anchors])
    if weights.cross > 0:
        other = normal_pair & ~same
        terms["cross"] = _supcon(logits[anchors], other[anchors], valid[anchors])
    if weights.negative > 0 and (~is_normal).sum() > 1:
        neg = ~is_normal
        neg_pair = neg[:, None] & neg[None, :] & ~eye
        terms["negative"] = _supcon(logits[neg], neg_pair[neg], valid[neg])
    total = sum((getattr(weights, name) * value for name, value in terms.items()), z.new_zeros(()))
    return total, {name: float(value.detach()) for name, value in terms.items()}
