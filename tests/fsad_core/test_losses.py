import math

import torch

from fsad_core.losses import LossWeights, contrastive_loss


def _batch():
    source = torch.tensor([0, 0, 1, 1, -1, -1])
    return source, source >= 0


def test_perfect_clusters_give_low_loss_and_mixed_give_high():
    source, normal = _batch()
    good = torch.tensor([[1.0, 0], [1, 0], [1, 0.01], [1, 0.01], [-1, 0], [-1, 0]])
    bad = torch.tensor([[1.0, 0], [-1, 0], [1, 0], [-1, 0], [1, 0], [1, 0]])
    w = LossWeights(instance=0, cross=1, negative=1, temperature=0.1)
    low, _ = contrastive_loss(good, source, normal, w)
    high, _ = contrastive_loss(bad, source, normal, w)
    assert low < 0.8 < high


def test_terms_are_switchable_and_reported():
    source, normal = _batch()
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    _, terms = contrastive_loss(z, source, normal, LossWeights(1, 1, 1))
    assert set(terms) == {"instance", "cross", "negative"}
    _, terms = contrastive_loss(z, source, normal, LossWeights(1, 0, 0))
    assert set(terms) == {"instance"}


def test_instance_term_matches_nt_xent_by_hand():
    # Two images, two views each, no negatives: NT-Xent anchor loss = -log(e^{s+}/sum_{j!=i} e^{s_ij}).
    z = torch.nn.functional.normalize(torch.randn(4, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    source = torch.tensor([0, 0, 1, 1])
    t = 0.5
    loss, _ = contrastive_loss(z, source, source >= 0, LossWeights(1, 0, 0, temperature=t))
    sim = z @ z.T / t
    expected = 0.0
    for i in range(4):
        pos = i ^ 1
        others = [j for j in range(4) if j != i]
        expected += -(sim[i, pos] - torch.logsumexp(sim[i, others], 0))
    assert math.isclose(float(loss), float(expected / 4), rel_tol=1e-5)


def test_gradient_flows():
    source, normal = _batch()
    z = torch.randn(6, 4, requires_grad=True)
    loss, _ = contrastive_loss(z, source, normal, LossWeights())
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_cross_term_works_without_negatives_and_pulls_images_together():
    # No negatives: the cross term must still be defined (own views in the denominator) and lower
    # when two images' views coincide than when each image sits apart from the other.
    source = torch.tensor([0, 0, 1, 1])
    w = LossWeights(instance=0, cross=1, negative=0, temperature=0.1)
    together = torch.tensor([[1.0, 0], [1, 0], [1, 0], [1, 0]])
    apart = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    low, terms = contrastive_loss(together, source, source >= 0, w)
    high, _ = contrastive_loss(apart, source, source >= 0, w)
    assert "cross" in terms and float(low) > 0
    assert math.isclose(float(low), math.log(3 / 2), rel_tol=1e-5)  # -log(2 e^10 / 3 e^10)
    assert float(high) > float(low) + 5


def test_cross_term_is_zero_with_one_image():
    # k = 1 has no other image: the term has no anchor with a positive and contributes nothing.
    source = torch.tensor([0, 0, 0, -1])
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    _, terms = contrastive_loss(z, source, source >= 0, LossWeights(instance=0, cross=1, negative=0))
    assert terms["cross"] == 0.0
