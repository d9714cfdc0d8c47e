"""`finetune` on its own: the batches it draws, when it stops early, and that it refuses to go on
once the loss is no longer a number."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsad_core.backbone import create_backbone
from fsad_core.config import DetectorConfig
from fsad_core.features import build_network
from fsad_core.finetune import FinetuneConfig, _EarlyStop, _sample_batch, finetune
from fsad_core.network import Network


@pytest.fixture(scope="module")
def caches() -> tuple[Network, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A real network and the prefix outputs of 3 images x 4 views and of 4 negatives (64 px)."""
    torch.manual_seed(0)
    config = DetectorConfig()
    net = build_network(config, create_backbone(config.backbone, pretrained=False)).eval()
    with torch.no_grad():
        normal = net.forward_prefix(torch.rand(12, 3, 64, 64))[2]
        negative = net.forward_prefix(torch.rand(4, 3, 64, 64))[2]
    return net, normal, torch.arange(3).repeat_interleave(4), negative


def test_a_batch_draws_at_least_two_views_of_each_image_it_takes_and_no_view_twice() -> None:
    view_source = torch.arange(5).repeat_interleave(6)  # 5 images x 6 views
    config = FinetuneConfig(normals_per_batch=8, negatives_per_batch=3)
    for seed in range(20):
        normal_idx, negative_idx = _sample_batch(np.random.default_rng(seed), view_source, 10, config)
        images, counts = np.unique(view_source[normal_idx].numpy(), return_counts=True)
        assert len(set(normal_idx.tolist())) == len(normal_idx) and (counts >= 2).all() and len(images) >= 2
        assert len(negative_idx) == 3 and len(set(negative_idx.tolist())) == 3 and negative_idx.max() < 10
    assert len(_sample_batch(np.random.default_rng(0), view_source, 0, config)[1]) == 0  # no negatives cached


def test_it_stops_after_patience_steps_without_improvement(caches) -> None:
    net, normal, source, negative = caches
    config = FinetuneConfig(steps=50, normals_per_batch=6, negatives_per_batch=2, patience=3, min_improvement=0.99)
    history = finetune(net, normal, source, negative, config, seed=0, device=torch.device("cpu"))
    assert history.stopped_early and len(history.loss) == 1 + config.patience  # the first step sets the best
    assert all(np.isfinite(history.loss)) and len(history.terms) == len(history.loss)


def test_one_lucky_batch_does_not_reset_the_patience() -> None:
    early_stop = _EarlyStop(patience=3, min_improvement=0.1)
    assert [early_stop.update(loss) for loss in (1.0, 1.0, 0.5, 1.0)] == [False, False, False, True]
    steady = _EarlyStop(patience=3, min_improvement=0.1)
    assert not any(steady.update(loss) for loss in (1.0, 0.5, 0.25, 0.125, 0.0625))


def test_it_runs_every_step_while_it_improves_and_is_repeatable(caches) -> None:
    net, normal, source, negative = caches
    state = {k: v.clone() for k, v in net.state_dict().items()}
    config = FinetuneConfig(steps=4, normals_per_batch=6, negatives_per_batch=2, patience=40, min_improvement=0.0)
    first = finetune(net, normal, source, negative, config, seed=1, device=torch.device("cpu"))
    net.load_state_dict(state)
    again = finetune(net, normal, source, negative, config, seed=1, device=torch.device("cpu"))
    assert len(first.loss) == 4 and not first.stopped_early and first.loss == again.loss


def test_a_loss_that_is_not_a_number_stops_it_with_the_step(caches) -> None:
    net, normal, source, negative = caches
    config = FinetuneConfig(steps=5, normals_per_batch=6, negatives_per_batch=2)
    with pytest.raises(FloatingPointError, match="fine-tuning diverged at step 0"):
        finetune(net, torch.full_like(normal, float("nan")), source, negative, config, seed=0,
                 device=torch.device("cpu"))
