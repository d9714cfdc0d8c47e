import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

from fsad_core.gaussian import Gaussian
from fsad_core.patch_memory import PatchMemory, greedy_coreset, group_coresets, smooth_and_upsample


def test_mahalanobis_matches_scipy_with_ledoit_wolf_precision():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6))
    q = rng.normal(size=(5, 6))
    g = Gaussian.fit(torch.from_numpy(x))
    lw = LedoitWolf().fit(x)
    ref = [mahalanobis(v, lw.location_, lw.get_precision()) for v in q]
    np.testing.assert_allclose(g.distance(torch.from_numpy(q)).numpy(), ref, rtol=1e-8)


def test_shrinkage_from_gram_equals_sklearn():
    from sklearn.covariance import ledoit_wolf_shrinkage

    from fsad_core.gaussian import ledoit_wolf_from_gram
    rng = np.random.default_rng(1)
    for n, d in ((5, 40), (30, 6), (64, 300)):
        x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d)
        x -= x.mean(axis=0)
        ours, _ = ledoit_wolf_from_gram(torch.from_numpy(x @ x.T), d)
        assert ours == pytest.approx(ledoit_wolf_shrinkage(x, assume_centered=True), rel=1e-9)


def test_gaussian_handles_fewer_samples_than_dimensions():
    x = torch.randn(4, 100, dtype=torch.float64)
    d = Gaussian.fit(x).distance(torch.randn(3, 100, dtype=torch.float64))
    assert torch.isfinite(d).all()


def test_patch_memory_distance_is_zero_on_memorised_patches_and_positive_elsewhere():
    feats = torch.randn(2, 8, 5, 5)
    mem = PatchMemory.fit(feats, max_size=1000)
    assert mem.distances(feats).abs().max() < 1e-2  # the matmul form: ~1e-3 error at zero
    assert (mem.distances(feats + 3.0) > 1).all()


def test_nearest_patch_distance_is_the_exact_one_over_every_chunk_of_queries():
    g = torch.Generator().manual_seed(0)
    bank, feats = torch.randn(700, 16, generator=g), torch.randn(3, 16, 12, 12, generator=g)  # 432 queries
    queries = feats.permute(0, 2, 3, 1).reshape(-1, 16).double()
    exact = torch.cdist(queries, bank.double(), compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
    found = PatchMemory(bank).distances(feats, chunk=100)
    assert found.shape == (3, 12, 12)
    assert torch.allclose(found.flatten().double(), exact, atol=1e-4)


def test_candidate_cap_draws_the_coreset_from_a_seeded_subsample():
    feats = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(0))  # 400 patches
    rows = feats.permute(0, 2, 3, 1).reshape(-1, 8)
    full = PatchMemory.fit(feats, max_size=50).bank
    capped = PatchMemory.fit(feats, max_size=50, max_candidates=120).bank
    assert capped.shape == (50, 8)
    assert (capped[:, None] == rows[None]).all(dim=2).any(dim=1).all()  # every kept patch is one of the features
    assert torch.equal(capped, PatchMemory.fit(feats, max_size=50, max_candidates=120).bank)  # seeded
    assert not torch.equal(capped, full)
    assert not torch.equal(capped, PatchMemory.fit(feats, max_size=50, seed=1, max_candidates=120).bank)
    # a cap at or above the number of patches changes nothing
    assert torch.equal(PatchMemory.fit(feats, max_size=50, max_candidates=400).bank, full)


def test_each_group_keeps_a_coreset_of_its_own_patches_in_proportion():
    gen = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(3, 8, 10, 10, generator=gen), torch.randn(1, 8, 10, 10, generator=gen) + 5])
    groups = torch.tensor([0, 0, 1, 2])  # 200, 100 and 100 patches
    banks = group_coresets(feats, groups, max_size=40, max_candidates=80)
    assert {g: b.shape[0] for g, b in banks.items()} == {0: 20, 1: 10, 2: 10}
    for g, bank in banks.items():
        rows = feats[groups == g].permute(0, 2, 3, 1).reshape(-1, 8)
        assert (bank[:, None] == rows[None]).all(dim=2).any(dim=1).all()  # drawn from the group alone
    # one group: the coreset over all patches
    assert torch.equal(group_coresets(feats, torch.zeros(4), 40, 0, 80)[0], PatchMemory.fit(feats, 40, 0, 80).bank)


def test_coreset_covers_far_points():
    x = torch.cat([torch.zeros(100, 2), torch.tensor([[50.0, 50.0]])])
    idx = greedy_coreset(x, 2)
    assert 100 in idx.tolist()


def test_coreset_is_farthest_point_selection_by_exact_distances():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    idx = greedy_coreset(x, 25, seed=1).tolist()
    reference = [idx[0]]
    dist = torch.cdist(x, x[reference]).squeeze(1)
    for _ in range(24):
        reference.append(int(dist.argmax()))
        dist = torch.minimum(dist, torch.cdist(x, x[reference[-1:]]).squeeze(1))
    assert idx == reference


def test_map_upsampling_keeps_peak_location():
    dist = torch.zeros(1, 8, 8)
    dist[0, 2, 5] = 1
    up = smooth_and_upsample(dist, 64, sigma=2)
    y, x = divmod(int(up[0].argmax()), 64)
    assert abs(y - 20) <= 6 and abs(x - 44) <= 6
