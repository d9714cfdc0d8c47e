
import numpy as np
import pytest

from fsad_core.data import CategoryError, find_categories, load_category
from fsad_core.synthetic import DEFECT_TYPES, make_category


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_category(tmp_path_factory.mktemp("syn") / "washer", kind="object", n_train=6, n_test_good=4,
                         n_test_defect=8, size=64, seed=3)


def test_generated_category_has_layout_labels_and_masks(category):
    cat = load_category(category)
    assert len(cat.train) == 6 and len(cat.test) == 12 and cat.has_masks
    assert {s.defect_type for s in cat.test} == {"good", *DEFECT_TYPES}
    for s in cat.test:
        img = s.image()
        mask = s.mask(img.shape[:2])
        assert mask.any() == (s.label == 1)


def test_defects_differ_from_normal_only_where_masked_region_lies():
    rng = np.random.default_rng(0)
    from fsad_core.synthetic import _object_normal, add_defect
    img = _object_normal(rng, 64)
    for kind in DEFECT_TYPES:
        out, mask = add_defect(np.random.default_rng(1), img, kind)
        assert mask.any() and np.array_equal(out[~mask], img[~mask]), kind


def test_k_shot_sampling_is_deterministic_and_nested(category):
    cat = load_category(category)
    a = [s.path for s in cat.sample_k_shot(4, seed=7)]
    assert a == [s.path for s in cat.sample_k_shot(4, seed=7)]
    assert a[:2] == [s.path for s in cat.sample_k_shot(2, seed=7)]
    assert a != [s.path for s in cat.sample_k_shot(4, seed=8)]
    with pytest.raises(ValueError):
        cat.sample_k_shot(7, seed=0)


def test_missing_mask_for_defect_is_an_error_but_not_for_good(category, tmp_path):
    import shutil
    root = tmp_path / "c"
    shutil.copytree(category, root)
    next((root / "ground_truth").rglob("*.png")).unlink()
    with pytest.raises(CategoryError, match="no mask"):
        load_category(root)
    shutil.rmtree(root / "ground_truth")
    cat = load_category(root)  # no masks at all: image labels only
    assert not cat.has_masks and all(s.mask_path is None for s in cat.test)


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(CategoryError, match="train/good"):
        load_category(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(CategoryError, match="no images"):
        load_category(tmp_path)


def test_find_categories(category):
    assert find_categories(category) == [category]
    assert category in find_categories(category.parent)


EXPECTED = {  # each shared set: train good, test good, test defect (as published with the data)
    "mvtec_ad/bottle": (209, 20, 63),
    "magnetic_tile/magnetic_tile": (762, 190, 392),
    "elpv/poly": (100, 184, 402),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_categories_match_readme_counts(shared_data, name):
    root = shared_data / name
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    cat = load_category(root)
    n_train, n_good, n_defect = EXPECTED[name]
    assert len(cat.train) == n_train
    assert sum(s.label == 0 for s in cat.test) == n_good
    assert sum(s.label == 1 for s in cat.test) == n_defect
    # Every image decodes to RGB uint8, and masks match the image size where they exist.
    for s in cat.sample_k_shot(3, 0) + cat.test[:: max(1, len(cat.test) // 12)]:
        img = s.image()
        assert img.ndim == 3 and img.shape[2] == 3
        assert s.mask(img.shape[:2]).shape == img.shape[:2]


def test_real_data_root_lists_every_category(shared_data):
    found = {str(p.relative_to(shared_data)) for p in find_categories(shared_data)}
    assert set(EXPECTED) <= found
