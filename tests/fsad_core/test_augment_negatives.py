import numpy as np
import pytest
import torch

from fsad_core.augment import AugmentConfig, augment_views
from fsad_core.methods import method_config
from fsad_core.negatives import NEGATIVE_KINDS, cutpaste, cutpaste_scar, noise_blob, synthesize, texture_blob
from fsad_core.options import FLIPS


@pytest.fixture
def image():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 64, 64, generator=g)


def test_views_keep_shape_range_and_are_reproducible(image):
    views = augment_views(image, 5, AugmentConfig(), generator_seed=3)
    assert views.shape == (5, 3, 64, 64)
    assert views.min() >= 0 and views.max() <= 1
    assert torch.equal(views, augment_views(image, 5, AugmentConfig(), generator_seed=3))
    assert not torch.equal(views[0], views[1])


def test_augmentation_can_be_switched_off(image):
    none = AugmentConfig(crop_scale=(1.0, 1.0), hflip=False, vflip=False, rotation_deg=0, brightness=0, contrast=0)
    views = augment_views(image, 2, none, generator_seed=0)
    assert torch.allclose(views[0], image, atol=1e-5)


def test_flips_by_name_set_both_flags_and_read_back():
    for name, (hflip, vflip) in FLIPS.items():
        config = method_config("default", augment={"hflip": hflip, "vflip": vflip}).augment  # as --flips NAME
        assert (config.hflip, config.vflip, config.flips) == (hflip, vflip, name)
        assert config.rotation_deg == AugmentConfig().rotation_deg  # nothing else changes


@pytest.mark.parametrize(("field", "value"), [
    ("crop_scale", (0.0, 1.0)), ("crop_scale", (0.9, 0.8)), ("crop_scale", (0.5, 1.2)), ("crop_scale", 0.8),
    ("crop_scale", (0.5, float("nan"))), ("hflip", "no"), ("vflip", 1), ("rotation_deg", -1), ("rotation_deg", 181),
    ("rotation_deg", True), ("brightness", -0.1), ("brightness", 1.0), ("contrast", "low")])
def test_a_bad_augmentation_is_refused_naming_its_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


@pytest.mark.parametrize("fn", [cutpaste, cutpaste_scar, noise_blob, texture_blob])
@pytest.mark.parametrize("seed", range(5))
def test_negative_differs_from_source_only_inside_its_mask(image, fn, seed):
    out, mask = fn(np.random.default_rng(seed), image)
    assert out.shape == image.shape and mask.shape == image.shape[1:] and mask.dtype == torch.bool
    assert out.min() >= 0 and out.max() <= 1
    assert mask.any()
    assert torch.equal(out[:, ~mask], image[:, ~mask])


def test_synthesize_changes_the_image_visibly(image):
    rng = np.random.default_rng(0)
    for _ in range(10):
        out, mask, kind = synthesize(rng, image, NEGATIVE_KINDS)
        assert kind in NEGATIVE_KINDS and (out - image).abs().amax() > 0.05
