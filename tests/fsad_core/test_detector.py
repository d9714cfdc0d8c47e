"""A tiny end-to-end fit and score on generated data, and the model artifact round trip."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from fsad_core.benchmark import method_label
from fsad_core.calibration import calibrate_unsupervised
from fsad_core.config import DetectorConfig
from fsad_core.data import load_category
from fsad_core.detector import Detector
from fsad_core.finetune import FinetuneConfig
from fsad_core.fusion import FUSION_LOO, FUSION_SYNTHETIC_GAP, fused_spread_floor, fusion_scales, with_combined
from fsad_core.methods import list_methods, method_config
from fsad_core.metrics import image_auroc, pixel_auroc
from fsad_core.provenance import cpu_description, library_versions
from fsad_core.synthetic import make_category

SMALL = dict(size=96, patch_size=None, pool_views=16, negatives=8, calibration_negatives=8, memory_views=2)


@pytest.fixture(scope="module")
def washer(tmp_path_factory):
    root = make_category(tmp_path_factory.mktemp("d") / "washer", kind="object", n_train=4, n_test_good=6,
                         n_test_defect=8, size=96, seed=11, defect_types=("spot", "contamination", "crack"))
    return load_category(root)


@pytest.fixture(scope="module")
def fitted(washer):
    config = replace(method_config("default", seed=0), **SMALL,
                     finetune=FinetuneConfig(steps=8, normals_per_batch=8, negatives_per_batch=4))
    images = [s.image() for s in washer.sample_k_shot(3, 0)]
    return Detector.fit(images, config, device="cpu")


def test_fit_reports_history_and_calibrated_threshold(fitted):
    detector, report = fitted
    assert report.history is not None and 1 <= len(report.history.loss) <= 8
    assert all(np.isfinite(report.history.loss))
    t = detector.threshold
    # never flags every normal
    assert np.isfinite(t.value) and t.value > max(report.normal_scores[detector.config.score])
    assert report.normal_rule.startswith("leave-one-out")


def test_separates_obvious_defects_and_localises_them(fitted, washer):
    detector, _ = fitted
    images = [s.image() for s in washer.test]
    result = detector.score(images, with_maps=True)
    labels = np.array([s.label for s in washer.test])
    assert image_auroc(labels, result.scores) >= 0.9
    masks = [s.mask(img.shape[:2]) for s, img in zip(washer.test, images)]
    assert all(m.shape == img.shape[:2] for m, img in zip(result.maps, images))
    assert pixel_auroc(masks, result.maps) >= 0.85


def test_artifact_round_trip_gives_identical_scores_without_pickle(fitted, washer, tmp_path):
    detector, _ = fitted
    folder = detector.save(tmp_path / "model")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "network.safetensors", "scoring.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 1 and config["detector"]["backbone"] == "tf_efficientnet_lite0"
    assert config["threshold"]["rule"] and config["normalisation"]["mean"] == [0.5, 0.5, 0.5]
    assert config["library"] == library_versions() and config["library"]["timm"]
    (folder / "planted.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # never read
    again = Detector.load(folder, device="cpu")
    images = [s.image() for s in washer.test[:4]]
    a, b = detector.score(images), again.score(images)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert again.threshold == detector.threshold
    # The washer is a colour product: `auto` kept its grey levels raw, and the model says so.
    assert detector.config.intensity == "raw" and config["detector"]["intensity"] == "raw"
    # A model saved before the intensity policy existed was fitted on raw grey levels, and one saved
    # before the patch branch had its own side on a single side, whatever today's defaults are (and one
    # saved before the coreset candidate cap chose from all patches).
    del config["detector"]["intensity"], config["detector"]["patch_size"], config["detector"]["coreset_candidates"]
    (folder / "config.json").write_text(json.dumps(config))
    old = Detector.load(folder, device="cpu")
    assert old.config.intensity == "raw" and old.config.patch_side == old.config.size == SMALL["size"]
    assert old.config.coreset_candidates == 0
    np.testing.assert_allclose(old.score(images).scores, a.scores, rtol=1e-5)


def test_a_model_saved_with_the_cut_of_its_backbone_loads_when_it_is_the_backbones(fitted, washer, tmp_path):
    # Models saved when the cut was a detector setting carry it; the backbone's spec holds it now.
    detector, _ = fitted
    folder = detector.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["detector"].update(split=4, patch_blocks=[2, 4], first_level=4, negative_kinds=["scar", "patch"])
    (folder / "config.json").write_text(json.dumps(config))
    images = [s.image() for s in washer.test[:2]]
    np.testing.assert_allclose(Detector.load(folder, device="cpu").score(images).scores,
                               detector.score(images).scores, rtol=1e-5)
    config["detector"]["patch_blocks"] = [1, 3]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"patch_blocks=\[1, 3\], this fsad only at \(2, 4\): retrain it"):
        Detector.load(folder, device="cpu")
    del config["threshold"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the model has no threshold"):
        Detector.load(folder, device="cpu")


def test_model_keeps_the_pooling_it_was_fitted_with(washer, tmp_path):
    """A model saved under an earlier default (mean+std) must score with its own pooling, or its
    Gaussians would not match the embeddings: a registered champion outlives a change of default."""
    assert DetectorConfig().pooling == "mean+std+max"
    config = replace(method_config("pretrained", seed=0), **{**SMALL, "calibration_negatives": 0}, pooling="mean+std")
    detector, _ = Detector.fit([s.image() for s in washer.sample_k_shot(2, 0)], config, device="cpu")
    again = Detector.load(detector.save(tmp_path / "model"), device="cpu")
    assert again.config.pooling == "mean+std"
    images = [s.image() for s in washer.test[:3]]
    np.testing.assert_allclose(detector.score(images).scores, again.score(images).scores, rtol=1e-5)


def test_a_candidate_cap_fits_the_same_size_of_memory_and_the_model_keeps_it(washer, tmp_path):
    config = replace(method_config("pretrained", seed=0), **{**SMALL, "calibration_negatives": 0}, memory_max=200,
                     coreset_candidates=300)
    images = [s.image() for s in washer.sample_k_shot(2, 0)]
    detector, _ = Detector.fit(images, config, device="cpu")
    uncapped, _ = Detector.fit(images, replace(config, coreset_candidates=0), device="cpu")
    # 200, chosen from 300 of 2 x 2 x 144 patches
    assert detector.scoring.memory.bank.shape == uncapped.scoring.memory.bank.shape
    assert not torch.equal(detector.scoring.memory.bank, uncapped.scoring.memory.bank)
    again = Detector.load(detector.save(tmp_path / "model"), device="cpu")
    assert again.config.coreset_candidates == 300


def test_a_grey_product_is_standardised_a_darker_shot_scores_as_the_original_and_the_model_keeps_it(
        washer, tmp_path):
    """`auto` standardises a grey product, so an exposure change of the whole shot is no anomaly;
    the policy is part of the model, so a loaded model prepares images as it was fitted."""
    def grey(img: np.ndarray) -> np.ndarray:
        return np.repeat(img.mean(axis=2, keepdims=True).round().astype(np.uint8), 3, axis=2)

    config = replace(method_config("pretrained", seed=0), **{**SMALL, "calibration_negatives": 0})
    assert config.intensity == "auto"
    detector, _ = Detector.fit([grey(s.image()) for s in washer.sample_k_shot(2, 0)], config, device="cpu")
    assert detector.config.intensity == "standardise"
    again = Detector.load(detector.save(tmp_path / "model"), device="cpu")
    assert again.config.intensity == "standardise"
    images = [grey(s.image()) for s in washer.test[:3]]
    darker = [np.round(img * 0.7 + 10).astype(np.uint8) for img in images]
    scores = detector.score(images).scores
    np.testing.assert_allclose(again.score(images).scores, scores, rtol=1e-5)
    raw, _ = Detector.fit([grey(s.image()) for s in washer.sample_k_shot(2, 0)], replace(config, intensity="raw"),
                          device="cpu")

    def change(model: Detector) -> float:
        """The largest relative change of a score when the shots are darker."""
        before = model.score(images).scores
        return float(np.max(np.abs(model.score(darker).scores - before) / before))

    assert change(detector) < 0.05 and change(raw) > 0.12  # measured: 0.027 and 0.161


def test_fit_is_deterministic_under_a_seed(washer):
    config = replace(method_config("full", seed=1), **{**SMALL, "calibration_negatives": 0},
                     finetune=FinetuneConfig(steps=3, normals_per_batch=4, negatives_per_batch=2))
    images = [s.image() for s in washer.sample_k_shot(2, 1)]
    a, ra = Detector.fit(images, config, device="cpu")
    b, rb = Detector.fit(images, config, device="cpu")
    assert ra.history.loss == rb.history.loss
    probe = [washer.test[-1].image()]
    assert a.score(probe).scores[0] == pytest.approx(b.score(probe).scores[0], rel=1e-6)


def test_single_image_fit_uses_held_out_views(washer):
    config = replace(method_config("pretrained"), **SMALL)
    detector, report = Detector.fit([washer.train[0].image()], config, device="cpu")
    assert report.normal_rule.startswith("held-out augmented views")
    assert np.isfinite(detector.threshold.value)
    assert detector.meta["fusion_rule"] == FUSION_SYNTHETIC_GAP
    # In those units the normal views sit near 0 and the median synthetic anomaly near 1 per component.
    assert np.median(report.synthetic_scores["fused"]) == pytest.approx(2.0, abs=0.6)


def test_patch_branch_at_its_own_input_side(washer, tmp_path):
    # The default patch branch sees more of the part than the image branch (measured: docs/results.md).
    assert DetectorConfig().patch_side == 320 > DetectorConfig().size
    # Image branch at 64 px, patch branch at 96 px: maps at the patch side, at image size after scoring.
    config = replace(method_config("pretrained"), **{**SMALL, "size": 64, "patch_size": 96})
    images = [s.image() for s in washer.sample_k_shot(2, 0)]
    detector, _ = Detector.fit(images, config, device="cpu")
    test = [s.image() for s in washer.test]
    result = detector.score(test, with_maps=True)
    assert all(m.shape == img.shape[:2] for m, img in zip(result.maps, test))
    assert image_auroc([s.label for s in washer.test], result.scores) >= 0.9
    same = Detector.fit(images, replace(config, patch_size=None), device="cpu")[0]
    assert detector.scoring.memory.bank.shape[0] > same.scoring.memory.bank.shape[0]  # (96/64)^2 more patches
    again = Detector.load(detector.save(tmp_path / "model"), device="cpu")
    np.testing.assert_allclose(again.score(test).scores, result.scores, rtol=1e-5)


def test_tiled_parts_are_left_out_whole_and_score_as_their_worst_tile(washer):
    # Parts twice as wide as high: two tiles each. Calibration leaves a part out with all its tiles
    # and scores it as its worst tile, as scoring does: one normal score per part, not per tile.
    def wide(left: np.ndarray) -> np.ndarray:
        return np.concatenate([left, washer.train[-1].image()[:, ::-1]], axis=1)

    config = replace(method_config("pretrained"), **SMALL)
    assert config.resize == "tile"  # the default: nothing stretched
    parts = [wide(s.image()) for s in washer.sample_k_shot(3, 0)]
    detector, report = Detector.fit(parts, config, device="cpu")
    assert detector.meta == {"k": 3, "tiles": 6, "defects": 0, "fitted_on": cpu_description(), "colour": True,
                             "fusion_rule": FUSION_LOO}
    assert report.normal_rule.startswith("leave-one-out") and len(report.normal_scores["fused"]) == 3
    test = [wide(s.image()) for s in washer.test]  # a defect, if any, in the left-hand tile
    result = detector.score(test, with_maps=True)
    assert image_auroc([s.label for s in washer.test], result.scores) >= 0.9
    assert all(m.shape == img.shape[:2] for m, img in zip(result.maps, test))
    single, single_report = Detector.fit(parts[:1], config, device="cpu")
    assert single.meta["tiles"] == 2 and single_report.normal_rule.startswith("held-out augmented views")


def test_a_held_out_image_is_scored_by_a_memory_without_its_patches(washer):
    # Two alike parts and one negative: left out, the negative is far from every patch the other
    # two give; had its own coreset stayed in the memory, its original view would score about 0.
    images = [s.image() for s in washer.sample_k_shot(2, 0)]
    images.append(255 - images[0])
    _, report = Detector.fit(images, replace(method_config("pretrained"), **SMALL), device="cpu")
    patch = report.normal_scores["patch"]
    assert patch[2] > 3 * max(patch[:2])


def test_beyond_max_folds_images_share_folds_and_each_is_still_scored_once(washer, monkeypatch):
    # k = 4 with at most 2 folds stands for k = 16 with 8: every image gets one held-out score.
    monkeypatch.setattr("fsad_core.fitting.MAX_FOLDS", 2)
    config = replace(method_config("pretrained"), **SMALL)
    detector, report = Detector.fit([s.image() for s in washer.sample_k_shot(4, 0)], config, device="cpu")
    assert report.normal_rule == "2-fold held-out scores of the k normal images"
    assert len(report.normal_scores["fused"]) == 4 and detector.meta["k"] == 4
    assert len(report.synthetic_scores["fused"]) == SMALL["calibration_negatives"]  # 4 from each fold
    assert detector.threshold.value > max(report.normal_scores[detector.config.score])


def test_fusion_scales_single_image_use_the_synthetic_gap():
    normal = {"mahalanobis": np.array([10.0, 11, 12]), "patch": np.array([1.0, 1.1, 1.2])}
    synthetic = {"mahalanobis": np.array([50.0, 60, 70]), "patch": np.array([2.0, 2.1, 2.2])}
    scales, rule = fusion_scales(normal, synthetic, single_image=True)
    assert rule == FUSION_SYNTHETIC_GAP
    assert scales["mahalanobis"] == pytest.approx((11.0, 49.0)) and scales["patch"] == pytest.approx((1.1, 1.0))
    # k >= 2, no synthetic anomalies, or a component they do not raise: z-scores of the normal scores.
    for args in ((synthetic, False), (None, True), ({**synthetic, "patch": np.array([1.0, 1.0, 1.0])}, True)):
        scales, rule = fusion_scales(normal, *args)
        assert rule == FUSION_LOO and scales["mahalanobis"] == pytest.approx((11.0, 1.0))


@pytest.mark.parametrize("k, rho", [(2, 0.5), (3, 0.5), (4, 0.0), (4, 0.5), (8, 0.0)])
def test_the_fused_bound_flags_the_target_share_of_new_normals_on_average(k, rho):
    # Leave-one-out component scores of k normal images, correlated by rho; the fused score puts
    # each component in units of its own leave-one-out spread, so the fused leave-one-out scores
    # vary by sqrt(2 + 2 r), r their sample correlation (at k = 2 it is +1 or -1). A bound on them
    # alone flags 17 % of new normal images at k = 2 and 2-3 % at k = 4 against a 1 % target.
    rng = np.random.default_rng(7)
    shares = []
    for _ in range(2000):
        x = rng.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]], size=k)
        normal = {"mahalanobis": x[:, 0], "patch": x[:, 1]}
        scales, _ = fusion_scales(normal, None, single_image=False)
        (mm, ms), (pm, ps) = scales["mahalanobis"], scales["patch"]
        fused = (x[:, 0] - mm) / ms + (x[:, 1] - pm) / ps
        t = calibrate_unsupervised(fused, min_spread=fused_spread_floor(normal, scales))
        # A new normal image's fused score is Gaussian given the scales.
        mean, var = -(mm / ms + pm / ps), 1 / ms ** 2 + 1 / ps ** 2 + 2 * rho / (ms * ps)
        shares.append(stats.norm.sf((t.value - mean) / math.sqrt(var)))
    assert np.mean(shares) == pytest.approx(0.01, abs=0.004)


def test_methods_registry_has_the_ablation():
    assert {"pretrained", "instance", "instance+cross", "full", "default"} <= set(list_methods())
    assert method_config("pretrained").finetune is None
    assert method_config("instance").finetune.loss.cross == 0
    with pytest.raises(ValueError, match="unknown method"):
        method_config("nope")


def test_augmentation_overrides_change_the_methods_own_and_label_each_field():
    config = method_config("full", seed=3, augment={"hflip": False, "rotation_deg": 0.0})
    assert config.augment == replace(method_config("full").augment, hflip=False, rotation_deg=0.0)
    assert config.seed == 3 and config.finetune == method_config("full").finetune
    assert method_config("full", augment=None) == method_config("full")
    assert (method_label("full", map_sigma=2.0, augment={"hflip": False, "rotation_deg": 0.0}, size=None)
            == "full[map_sigma=2.0][hflip=False][rotation_deg=0.0]")


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        DetectorConfig(score="median")
    with pytest.raises(ValueError):
        DetectorConfig(resize="stretch")
    with pytest.raises(ValueError, match="intensity"):
        DetectorConfig(intensity="equalise")
    with pytest.raises(ValueError):
        DetectorConfig(patch_size=8)
    with pytest.raises(ValueError, match="target_false_alarm_rate"):
        DetectorConfig(target_false_alarm_rate=1.0)
    with pytest.raises(ValueError, match="coreset_candidates"):
        DetectorConfig(coreset_candidates=5000)  # below memory_max: the cap would choose nothing
    with pytest.raises(ValueError, match="coreset_candidates"):
        DetectorConfig(memory_max=50000)  # above the default cap: say so rather than keep fewer patches
    for sigma in (-1.0, 64.0, float("nan"), "4"):
        with pytest.raises(ValueError, match="map_sigma"):
            DetectorConfig(map_sigma=sigma)
    for not_a_count in (None, "all", 40000.0, True):  # `all` is the command line's word for 0
        with pytest.raises(ValueError, match="coreset_candidates"):
            DetectorConfig(coreset_candidates=not_a_count)


def test_the_patch_score_alone_takes_one_backbone_pass_and_keeps_no_gaussians(washer, tmp_path):
    config = replace(method_config("pretrained"), **{**SMALL, "size": 64, "patch_size": 96}, score="patch")
    assert not config.image_branch
    detector, report = Detector.fit([s.image() for s in washer.sample_k_shot(3, 0)], config, device="cpu")
    assert detector.scoring.gaussians == [] and detector.fusion == {} and set(report.normal_scores) == {"patch"}
    test = [s.image() for s in washer.test]
    sides: list[int] = []
    forward_prefix = detector.net.forward_prefix
    detector.net.forward_prefix = lambda x: sides.append(x.shape[-1]) or forward_prefix(x)
    result = detector.score(test, with_maps=True)
    assert set(sides) == {96}  # the patch branch's side only: no pass at the image branch's 64
    assert set(result.components) == {"patch"} and np.array_equal(result.raw_scores, result.components["patch"])
    assert detector.map_anchor() == detector.threshold.value and detector.map_anchor(0.7) == 0.7  # maps decide
    with pytest.raises(ValueError, match="no images to score"):
        detector.score([])
    assert image_auroc([s.label for s in washer.test], result.scores) >= 0.9
    again = Detector.load(detector.save(tmp_path / "model"), device="cpu")
    np.testing.assert_allclose(again.score(test).scores, result.scores, rtol=1e-5)


def test_either_is_the_larger_of_the_standardised_components_and_fused_their_sum(fitted, washer):
    detector, _ = fitted
    result = detector.score([s.image() for s in washer.test])
    (mm, ms), (pm, ps) = detector.fusion["mahalanobis"], detector.fusion["patch"]
    z_maha, z_patch = (result.components["mahalanobis"] - mm) / ms, (result.components["patch"] - pm) / ps
    np.testing.assert_allclose(result.components["either"], np.maximum(z_maha, z_patch))
    np.testing.assert_allclose(result.components["fused"], z_maha + z_patch)
    # the overlays' anchor: the patch level whose standardised value is the threshold (given or the model's)
    assert (detector.map_anchor() - pm) / ps == pytest.approx(detector.threshold.value)
    assert (detector.map_anchor(2.5) - pm) / ps == pytest.approx(2.5)
    normal = {"mahalanobis": np.array([1.0, 2.0, 3.0]), "patch": np.array([1.0, 1.5, 2.0])}
    units = {"mahalanobis": (2.0, 1.0), "patch": (1.5, 1.0)}
    assert fused_spread_floor(normal, units, "either") == pytest.approx(1.0)  # the wider one's spread
    assert fused_spread_floor(normal, units) == pytest.approx(math.sqrt(1.0 + 0.25))



def test_combined_scores_are_the_sum_and_the_larger_of_the_standardised_components():
    fusion = {"mahalanobis": (10.0, 2.0), "patch": (1.0, 0.5)}
    scores = with_combined({"mahalanobis": np.array([10.0, 14.0]), "patch": np.array([2.0, 1.0], np.float32)}, fusion)
    assert scores["fused"].tolist() == [2.0, 2.0] and scores["either"].tolist() == [2.0, 2.0]
    assert all(v.dtype == np.float64 for v in scores.values())
    assert set(with_combined({"patch": np.array([1.0])}, {})) == {"patch"}  # one component: nothing to combine



def test_a_detector_at_another_threshold_decides_by_it_and_leaves_the_original_as_it_was(fitted, washer):
    detector, _ = fitted
    images = [s.image() for s in washer.test[:4]]
    scores = detector.score(images).raw_scores
    lower = replace(detector.threshold, value=float(scores.min()) - 1.0)
    strict = detector.with_threshold(lower)
    assert strict.score(images).is_anomaly.all() and strict.threshold is lower
    assert detector.threshold.value != lower.value
    np.testing.assert_array_equal(strict.score(images).raw_scores, scores)


def test_a_score_carries_the_threshold_and_a_grey_copy_of_a_colour_part_is_named(fitted, washer):
    detector, _ = fitted
    image = washer.test[0].image()
    result = detector.score([image])
    assert (result.threshold, result.raw_threshold) == (0.5, detector.threshold.value) and detector.meta["colour"]
    grey = np.repeat(image.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    with pytest.warns(UserWarning, match="image\\(s\\) 1: grey, but the model was fitted on colour images"):
        detector.score([image, grey])
    with pytest.raises(ValueError, match="image 0: dtype float64"):
        detector.score([image / 255.0])
