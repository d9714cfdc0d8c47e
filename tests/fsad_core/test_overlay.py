"""Overlays share one colour scale anchored at the model's decision level, with a colour bar."""

import numpy as np

from fsad_core.overlay import BAR_WIDTH, LABEL_WIDTH, colour_bar, overlay


def _red(pixels: np.ndarray) -> np.ndarray:
    """Pixels whose red stands well above green and blue (jet's top, blended or not)."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (r > g + 40) & (r > b + 40)


def test_a_normal_part_looks_cold_and_only_a_level_past_the_anchor_turns_red():
    grey = np.full((40, 50, 3), 128, np.uint8)
    normal = np.full((40, 50), 0.3)          # well under the anchor everywhere
    broken = normal.copy()
    broken[10:20, 10:20] = 3.0               # past the decision level
    anchor = 1.0
    cold, hot = overlay(grey, normal, anchor)[:, :50], overlay(grey, broken, anchor)[:, :50]
    assert not _red(cold).any()
    assert _red(hot[10:20, 10:20]).all() and not _red(hot[25:, 25:]).any()
    # one scale for all images: the same level is the same colour whatever the rest of the map holds
    np.testing.assert_array_equal(cold[30:, 30:], hot[30:, 30:])
    # per-image scaling would have painted the flat normal map's maximum as hot as the defect
    assert not np.array_equal(overlay(grey, normal, anchor=0.3)[:, :50], cold)


def test_the_colour_bar_sits_beside_the_image_and_marks_the_anchor():
    grey = np.full((64, 30, 3), 90, np.uint8)
    out = overlay(grey, np.zeros((64, 30)), anchor=2.0)
    assert out.shape == (64, 30 + BAR_WIDTH + LABEL_WIDTH, 3)
    bar = colour_bar(64)
    np.testing.assert_array_equal(out[:, 30:], bar)
    assert (bar[(64 - 1) // 2, :BAR_WIDTH] == 255).all()      # the white line at the anchor's level
    assert _red(bar[:3, :BAR_WIDTH]).all() and not _red(bar[-3:, :BAR_WIDTH]).any()  # top hot, bottom cold
