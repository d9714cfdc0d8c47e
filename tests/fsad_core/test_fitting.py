"""The fit's stages on their own: the view pool, the held-out folds, the calibration of the fusion and threshold."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fsad_core.calibration import calibrate_unsupervised
from fsad_core.data import load_category
from fsad_core.fitting import DEFECT_VIEWS, MAX_FOLDS, ViewPool, calibrate, defect_views, held_out_folds, view_pool
from fsad_core.fusion import FUSION_LOO, fused_spread_floor
from fsad_core.methods import method_config
from fsad_core.preprocess import InputSpec, prepare
from fsad_core.synthetic import make_category

SMALL = dict(size=96, patch_size=None, pool_views=16, negatives=8, calibration_negatives=8, memory_views=2)


@pytest.fixture(scope="module")
def washer(tmp_path_factory):
    root = make_category(tmp_path_factory.mktemp("d") / "washer", kind="object", n_train=2, size=96, seed=11)
    return load_category(root)


def test_the_view_pool_spreads_the_views_over_the_tiles_each_tile_first_as_itself(washer):
    config = replace(method_config("pretrained"), **SMALL)
    wide = np.concatenate([washer.train[0].image()] * 2, axis=1)  # two tiles
    images = [washer.train[1].image(), wide]
    spec = InputSpec(config.work_side, config.resize)
    pool = view_pool(images, config, spec)
    assert (pool.n_images, pool.n_tiles, pool.per_tile) == (2, 3, 8)  # 16 views over 3 tiles, at least 8 each
    assert pool.views.shape[0] == 24 and pool.image_of_view.tolist() == [0] * 8 + [1] * 16
    assert pool.view_in_tile.tolist() == list(range(8)) * 3
    tiles = [t for img in images for t in prepare(img, spec)]
    assert all(torch.equal(pool.views[i * 8], tile) for i, tile in enumerate(tiles))
    assert not torch.equal(pool.views[1], pool.views[0])  # then augmented


def _pool(n_images: int, tiles_per_image: int = 1, per_tile: int = 4) -> ViewPool:
    n_tiles = n_images * tiles_per_image
    image_of_view = torch.arange(n_images).repeat_interleave(tiles_per_image * per_tile)
    return ViewPool(torch.zeros(n_tiles * per_tile, 3, 8, 8), image_of_view, torch.arange(per_tile).repeat(n_tiles),
                    per_tile, n_images, n_tiles)


@pytest.mark.parametrize("n_images, tiles", [(3, 1), (3, 2), (MAX_FOLDS + 3, 1)])
def test_each_part_is_held_out_once_whole_and_scored_by_a_fold_that_never_saw_it(n_images, tiles):
    pool = _pool(n_images, tiles)
    folds = held_out_folds(pool)
    assert len(folds.folds) == min(n_images, MAX_FOLDS)
    held_parts = [folds.part_of_view[f.held_out].tolist() for f in folds.folds]
    assert sorted(p for parts in held_parts for p in set(parts)) == list(range(n_images))  # each once
    for fold, parts in zip(folds.folds, held_parts):
        assert (pool.view_in_tile[fold.held_out] == 0).all()  # its tiles as they are, every one of them
        assert fold.held_out.sum() == len(parts) == tiles * len(set(parts))
        seen = set(pool.image_of_view[fold.fit_views].tolist())
        assert not seen & set(parts) and seen | set(parts) == set(range(n_images))
        assert torch.equal(fold.anomalies_from, ~fold.fit_views)  # anomalies from the held-out images only
    assert folds.rule.startswith("leave-one-out" if n_images <= MAX_FOLDS else f"{MAX_FOLDS}-fold")


def test_with_one_image_half_its_views_fit_and_the_other_half_is_held_out():
    pool = _pool(1, tiles_per_image=2, per_tile=8)
    [fold] = held_out_folds(pool).folds
    assert pool.view_in_tile[fold.fit_views].unique().tolist() == [0, 1, 2, 3]
    assert torch.equal(fold.held_out, ~fold.fit_views) and torch.equal(fold.anomalies_from, ~fold.fit_views)
    assert held_out_folds(pool).rule == "held-out augmented views of the single normal image"



def test_calibration_puts_the_fused_threshold_in_units_of_the_held_out_spreads():
    rng = np.random.default_rng(0)
    normal = {"mahalanobis": rng.normal(10, 1, 6), "patch": rng.normal(1, 0.1, 6)}
    synthetic = {"mahalanobis": rng.normal(30, 1, 8), "patch": rng.normal(3, 0.1, 8)}
    config = replace(method_config("default"), **SMALL)
    calibration = calibrate(normal, synthetic, config, n_images=6, normal_rule="rule of the folds")
    threshold = calibration.threshold
    assert calibration.fusion_rule == FUSION_LOO and threshold.details["normal_rule"] == "rule of the folds"
    assert threshold.details["min_spread"] == fused_spread_floor(normal, calibration.fusion) > 0
    expected = calibrate_unsupervised(calibration.normal_scores["fused"], calibration.synthetic_scores["fused"],
                                      config.target_false_alarm_rate, min_spread=threshold.details["min_spread"])
    assert threshold.value == expected.value
    patch_only = calibrate({"patch": normal["patch"]}, None, replace(config, score="patch"), 6, "rule")
    assert patch_only.fusion == {} and patch_only.fusion_rule is None
    assert patch_only.threshold.details["min_spread"] == 0
    assert patch_only.synthetic_scores["patch"].size == 0



def _extractor(config):
    from fsad_core.backbone import create_backbone
    from fsad_core.features import Extractor, build_network

    net = build_network(config, create_backbone(config.backbone, config.weights)).eval()
    return Extractor(net, config, config.input_spec(config.work_side), torch.device("cpu"))


@pytest.mark.parametrize("defect_first", [True, False])
def test_of_a_tiled_defect_the_tile_farthest_from_the_normal_tiles_is_the_negative(washer, defect_first):
    """A defect is local: the other tiles of a tiled part are normal and must not be pushed away."""
    config = replace(method_config("default"), **SMALL, intensity="raw")
    extractor = _extractor(config)
    pool = view_pool([s.image() for s in washer.train], config, extractor.spec)
    normal = washer.train[0].image()
    defect = next(s for s in washer.test if s.label).image()
    wide = np.concatenate([defect, normal] if defect_first else [normal, defect], axis=1)
    views = defect_views(extractor, pool, [wide])
    assert views.shape[0] == DEFECT_VIEWS
    assert torch.equal(views[0], prepare(defect, extractor.spec)[0])
    assert not torch.equal(views[1], views[0])  # then augmented copies


def test_confirmed_defects_are_negatives_of_the_fine_tuning_only(washer):
    from fsad_core.detector import Detector

    images = [s.image() for s in washer.train]
    defects = [s.image() for s in washer.test if s.label][:2]
    probe = [s.image() for s in washer.test]
    for method, changes in (("default", True), ("pretrained", False)):
        config = replace(method_config(method), **SMALL)
        plain, _ = Detector.fit(images, config, device="cpu")
        taught, _ = Detector.fit(images, config, device="cpu", defects=defects)
        assert taught.meta["defects"] == (2 if changes else 0) and plain.meta["defects"] == 0
        differ = not np.allclose(plain.score(probe).raw_scores, taught.score(probe).raw_scores)
        assert differ is changes, method
