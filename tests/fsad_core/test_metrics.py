import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from fsad_core.metrics import (
    aupro,
    defect_type_aurocs,
    image_auroc,
    miss_rate_at_false_alarm_rate,
    pixel_auroc,
    rates_at_threshold,
    summarize,
)


def _random_masks_maps(rng, shapes, signal=1.0):
    masks, maps = [], []
    for h, w in shapes:
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            mask[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
        masks.append(mask)
        maps.append((rng.normal(size=(h, w)) + signal * mask).astype(np.float32))
    return masks, maps


def _brute_force_aupro(masks, maps, max_fpr):
    """One threshold at a time, straight from the definition."""
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    normal = np.concatenate([~m.ravel() for m in masks])
    regions = []
    for mask, amap in zip(masks, maps):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[lab == i] for i in range(1, n + 1)]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        fpr.append(np.mean(scores[normal] >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    grid_x = fpr[fpr <= max_fpr]
    grid_y = pro[fpr <= max_fpr]
    i = np.searchsorted(fpr, max_fpr, side="right")
    if grid_x[-1] < max_fpr:
        y_cut = pro[i - 1] + (pro[i] - pro[i - 1]) * (max_fpr - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        grid_x, grid_y = np.append(grid_x, max_fpr), np.append(grid_y, y_cut)
    return np.trapezoid(grid_y, grid_x) / max_fpr


def test_image_auroc_matches_sklearn_and_hand_cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert image_auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None


def test_defect_type_aurocs_take_each_type_against_all_normals():
    rng = np.random.default_rng(3)
    types = np.array(["good"] * 30 + ["crack"] * 20 + ["stain"] * 10, dtype=object)
    y = (types != "good").astype(int)
    s = rng.normal(size=60) + 2.0 * (types == "crack")  # stains score like normal images
    got = defect_type_aurocs(y, list(types), s)
    assert set(got) == {"crack", "stain"}
    for name in got:
        keep = types != ("stain" if name == "crack" else "crack")
        assert got[name] == pytest.approx(roc_auc_score(y[keep], s[keep]))
    assert got["crack"] > 0.85 > 0.75 > got["stain"]
    assert defect_type_aurocs([1, 1], ["crack", "stain"], [0.2, 0.3]) == {}
    with pytest.raises(ValueError, match="defect types"):
        defect_type_aurocs([0, 1], ["good"], [0.2, 0.3])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores_raise(bad):
    with pytest.raises(ValueError, match="non-finite"):
        image_auroc([0, 1, 1], [0.1, bad, 0.3])
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    amap = np.zeros((4, 4))
    amap[1, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        pixel_auroc([mask], [amap])
    with pytest.raises(ValueError, match="non-finite"):
        aupro([mask], [amap])


def test_pixel_auroc_matches_sklearn_on_mixed_sizes():
    rng = np.random.default_rng(1)
    masks, maps = _random_masks_maps(rng, [(20, 30), (25, 25), (16, 40)])
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(masks, maps) == pytest.approx(expected)
    assert pixel_auroc([np.zeros((5, 5), bool)], [rng.normal(size=(5, 5))]) is None
    with pytest.raises(ValueError, match="same HxW"):
        pixel_auroc([np.zeros((5, 5), bool)], [np.zeros((5, 6))])


def test_pixel_subsampling_is_deterministic_and_close():
    rng = np.random.default_rng(2)
    masks, maps = _random_masks_maps(rng, [(60, 60)] * 4)
    full = pixel_auroc(masks, maps)
    sub = pixel_auroc(masks, maps, max_pixels=4000)
    assert sub == pixel_auroc(masks, maps, max_pixels=4000)
    assert sub == pytest.approx(full, abs=0.03)
    assert aupro(masks, maps, max_pixels=4000) == pytest.approx(aupro(masks, maps), abs=0.03)


def test_aupro_matches_brute_force():
    rng = np.random.default_rng(3)
    masks, maps = _random_masks_maps(rng, [(12, 14), (10, 10), (9, 16)], signal=1.5)
    masks.append(np.zeros((8, 8), bool))  # a defect image with an empty mask adds no region
    maps.append(rng.normal(size=(8, 8)))
    maps = [np.round(m, 1) for m in maps]  # ties
    for max_fpr in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, max_fpr) == pytest.approx(_brute_force_aupro(masks, maps, max_fpr))


def test_aupro_hand_cases():
    mask = np.zeros((40, 40), bool)
    mask[5:25, 5:25] = True  # large region
    mask[30:32, 30:32] = True  # small region
    assert aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert aupro([mask], [np.ones((40, 40))]) == pytest.approx(0.15)  # PRO = FPR line: 0.3**2 / 2 / 0.3
    many = np.zeros((120, 120), bool)
    many[2::8, 2::8] = many[3::8, 3::8] = True  # 225 two-pixel regions: a random map's PRO ~ FPR
    assert aupro([many], [np.random.default_rng(4).random(many.shape)]) == pytest.approx(0.15, abs=0.02)
    # only the large region is found; the small one scores below all normal pixels
    amap = np.full((40, 40), 0.5)
    amap[5:25, 5:25] = 1.0
    amap[30:32, 30:32] = 0.0
    assert aupro([mask], [amap]) == pytest.approx(0.5)
    assert aupro([np.zeros((4, 4), bool)], [np.ones((4, 4))]) is None


def test_rates_at_threshold_is_strict():
    r = rates_at_threshold([0, 0, 1, 1, 1], [0.1, 0.5, 0.5, 0.9, 0.2], threshold=0.5)
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 0, 2, 2)  # 0.5 is not > 0.5
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(0.5)
    assert r["false_alarm_rate"] == 0.0 and r["miss_rate"] == pytest.approx(2 / 3)
    assert rates_at_threshold([0, 0], [0.1, 0.2], 1.0)["miss_rate"] is None


def test_summarize():
    assert summarize([1.0, None, 3.0]) == pytest.approx((2.0, np.sqrt(2.0)))
    assert summarize([0.7, None]) == (0.7, 0.0)
    assert summarize([None]) == (None, None)


def test_best_miss_rate_is_that_of_the_lowest_threshold_within_the_false_alarm_rate():
    labels = [0] * 10 + [1] * 4
    scores = list(range(10)) + [9.5, 8.5, 5.0, 1.0]
    assert miss_rate_at_false_alarm_rate(labels, scores, 0.1) == 0.5  # flags > 8: one normal of ten
    assert miss_rate_at_false_alarm_rate(labels, scores, 0.05) == 0.75  # no normal may be flagged: > 9
    assert miss_rate_at_false_alarm_rate(labels, scores, 0.3) == 0.5  # > 6: 8.5 and 9.5 caught, 5 and 1 not
    assert miss_rate_at_false_alarm_rate([0, 0], [0.1, 0.2], 0.1) is None
