"""Resize policies: shapes, geometry, tiles that cover the part, maps brought back to the image."""

import numpy as np
import pytest
import torch

from fsad_core.preprocess import (
    GREY_TOLERANCE,
    MAX_TILES,
    STANDARD_MEAN,
    STANDARD_SPREAD,
    InputSpec,
    is_grey,
    letterbox_geometry,
    map_to_image,
    normalise,
    prepare,
    resolve_intensity,
    standardise_intensity,
    stretch_warning,
    tile_boxes,
)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["resize", "letterbox", "tile"])
def test_views_are_square_at_model_size_and_in_range(mode):
    views = prepare(_image(60, 150), InputSpec(64, mode))
    assert views.shape[1:] == (3, 64, 64)
    assert views.shape[0] == (3 if mode == "tile" else 1)
    assert 0.0 <= float(views.min()) and float(views.max()) <= 1.0


def test_tiles_are_squares_of_the_short_side_that_cover_the_image():
    for h, w in ((60, 150), (150, 60), (100, 100), (37, 200)):
        boxes = tile_boxes(h, w)
        covered = np.zeros((h, w), bool)
        for top, left, side_h, side_w in boxes:
            assert side_h == side_w == min(h, w)
            assert 0 <= top and top + side_h <= h and 0 <= left and left + side_w <= w
            covered[top:top + side_h, left:left + side_w] = True
        assert covered.all()
        assert len(boxes) == int(np.ceil(max(h, w) / min(h, w)))


def test_tile_mode_on_a_square_image_is_the_plain_resize():
    image = _image(90, 90)
    torch.testing.assert_close(prepare(image, InputSpec(64, "tile")), prepare(image, InputSpec(64, "resize")),
                               rtol=0, atol=0)


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_the_mean_colour():
    image = np.zeros((50, 100, 3), np.uint8)
    image[..., 0] = 200
    nh, nw, top, left = letterbox_geometry(50, 100, 64)
    assert (nh, nw, top, left) == (32, 64, 16, 0)
    view = prepare(image, InputSpec(64, "letterbox"))[0]
    torch.testing.assert_close(view[0], torch.full((64, 64), 200 / 255))  # pad = mean = the part's colour
    assert float(view[1].abs().max()) == 0.0


@pytest.mark.parametrize("mode", ["resize", "letterbox", "tile"])
def test_maps_come_back_at_the_image_size(mode):
    h, w = 60, 150
    spec = InputSpec(64, mode)
    n = prepare(_image(h, w), spec).shape[0]
    out = map_to_image(torch.full((n, 64, 64), 2.5), h, w, spec)
    assert out.shape == (h, w)
    np.testing.assert_allclose(out, 2.5, rtol=1e-6)


def test_a_tile_map_lands_where_its_tile_was():
    h, w = 40, 120  # three tiles of 40 x 40, no overlap
    spec = InputSpec(32, "tile")
    maps = torch.zeros(3, 32, 32)
    maps[2] = 1.0  # only the right-hand tile is anomalous
    out = map_to_image(maps, h, w, spec)
    assert out[:, :80].max() == 0.0 and out[:, 80:].min() == pytest.approx(1.0)


def test_plain_resize_of_parts_of_mixed_shapes_gets_a_note():
    mixed = [(300, 100, 3), (300, 500, 3)]  # width / height 0.33 and 1.67
    note = stretch_warning(mixed, "resize")
    assert note is not None and "0.33" in note and "1.67" in note and "'tile'" in note
    assert stretch_warning(mixed, "tile") is None  # tiles do not stretch
    assert stretch_warning([(300, 300, 3), (320, 300, 1)], "resize") is None  # alike enough
    assert stretch_warning([], "resize") is None


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_standardised_views_have_the_standard_grey_levels_and_ignore_exposure(mode):
    image = _image(60, 150)
    spec = InputSpec(64, mode, intensity="standardise")
    views = standardise_intensity(prepare(image, spec))
    assert views.shape[0] == (3 if mode == "tile" else 1)
    for view in views:  # each view on its own, as every view that enters the network
        assert float(view.mean()) == pytest.approx(STANDARD_MEAN, abs=1e-5)
        assert float(view.std()) == pytest.approx(STANDARD_SPREAD, abs=1e-5)
    # The same part shot darker and with less gain: an affine change of grey levels that the
    # standardisation undoes (up to the uint8 rounding of the darker shot).
    darker = np.round(image.astype(np.float64) * 0.6 + 20).astype(np.uint8)
    torch.testing.assert_close(standardise_intensity(prepare(darker, spec)), views, atol=0.02, rtol=0)
    raw = prepare(image, InputSpec(64, mode))
    assert not torch.allclose(prepare(darker, InputSpec(64, mode)), raw, atol=0.02)
    # prepare keeps [0, 1] whatever the policy; normalise applies the policy, then the backbone's statistics
    torch.testing.assert_close(prepare(image, spec), raw)
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    torch.testing.assert_close(normalise(raw, spec), normalise(views, InputSpec(64, mode)))
    assert not torch.allclose(normalise(raw, spec), normalise(raw, InputSpec(64, mode)))


def test_a_blank_image_standardises_to_the_standard_mean_and_an_unknown_policy_is_refused():
    blank = prepare(np.full((40, 40, 3), 200, np.uint8), InputSpec(32))
    torch.testing.assert_close(standardise_intensity(blank), torch.full((1, 3, 32, 32), STANDARD_MEAN),
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="intensity"):
        InputSpec(32, intensity="equalise")


def test_auto_intensity_standardises_grey_products_and_keeps_colour_ones_raw():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (40, 50, 1), dtype=np.uint8), 3, axis=2)
    # A grey shot through a JPEG's colour planes: channels off by a level here and there.
    nearly = np.clip(grey.astype(int) + rng.integers(-1, 2, grey.shape), 0, 255).astype(np.uint8)
    tinted = np.round(grey * np.array([1.0, 0.93, 0.82])).astype(np.uint8)
    assert is_grey(grey) and is_grey(nearly) and not is_grey(tinted)
    assert resolve_intensity("auto", [grey, nearly]) == "standardise"
    assert resolve_intensity("auto", [grey, tinted]) == "raw"
    assert resolve_intensity("raw", [grey]) == "raw" and resolve_intensity("standardise", [tinted]) == "standardise"
    with pytest.raises(ValueError, match="intensity"):
        resolve_intensity("equalise", [grey])


def test_is_grey_reads_a_tall_image_band_by_band_and_sees_colour_in_its_last_band():
    rng = np.random.default_rng(1)
    tall = np.repeat(rng.integers(0, 256, (600, 30, 1), dtype=np.uint8), 3, axis=2)  # three bands
    tinted_at_the_bottom = tall.copy()
    tinted_at_the_bottom[520:, :, 0] //= 2
    x = tinted_at_the_bottom.astype(np.float64)
    assert np.abs(x - x.mean(axis=2, keepdims=True)).mean() > GREY_TOLERANCE  # the whole-image reading
    assert is_grey(tall) and not is_grey(tinted_at_the_bottom)


def test_tiles_per_image_are_bounded():
    """An array handed over directly (not read through imageio) cannot cost one tile per pixel either."""
    assert len(tile_boxes(64, 64 * MAX_TILES)) == MAX_TILES
    with pytest.raises(ValueError, match=f"a 2000x1 image needs 2000 tiles, above the limit of {MAX_TILES}"):
        tile_boxes(1, 2000)
