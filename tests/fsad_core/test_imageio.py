import io
import re

import numpy as np
import pytest
from PIL import Image

from fsad_core.imageio import (
    ImageLimits,
    ImageReadError,
    LimitSettingError,
    PixelBudget,
    array_at_work_size,
    image_header_size,
    image_limits,
    read_header,
    read_image,
    read_mask,
    work_factor,
)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_rgb_grey_rgba_palette_16bit_cmyk_all_become_rgb_uint8(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    cases = {
        "rgb.png": Image.fromarray(rgb),
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((40, 60), 255, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "grey16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "rgb.jpg": Image.fromarray(rgb),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = read_image(tmp_path / name)
        assert out.shape == (40, 60, 3) and out.dtype == np.uint8, name
    grey16 = read_image(tmp_path / "grey16.png")
    assert np.abs(grey16[..., 0].astype(int) - rgb[..., 0]).max() <= 1


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((40, 80, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (80, 40, 3)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"<html><body>not an image</body></html>", "not a recognised image"),
])
def test_bad_files_raise_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as err:
        read_image(path)
    assert "bad.png" in str(err.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_raises(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match=f"^cut.{fmt.lower()}: corrupt or truncated image"):
        read_image(path, name=path.name)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(path, optimize=True)  # tiny file, 900 Mpixel
    with pytest.raises(ImageReadError, match="too many pixels|exceeds the limit"):
        read_image(path)
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_image(_png(np.zeros((100, 100), np.uint8)), name="small.png", limits=ImageLimits(max_pixels=5000))


def test_mask_reads_as_bool(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:4] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").sum() == 4


@pytest.mark.parametrize("width, height, reason", [
    (1, 2000, "the shorter side is below the minimum of 32 px"),
    (2000, 20, "the shorter side is below the minimum of 32 px"),
    (32 * 17, 32, "aspect ratio above the limit of 16 to 1"),
])
def test_thin_or_elongated_images_are_refused_from_the_header(tmp_path, width, height, reason):
    """One tile per pixel of length is what a 1 x N image would cost: refused before decoding."""
    path = tmp_path / "thin.png"
    Image.new("L", (width, height)).save(path)
    for read in (read_image, image_header_size):
        with pytest.raises(ImageReadError, match=f"thin.png: refused, {width}x{height}: {reason}"):
            read(path)


def test_the_longest_allowed_image_is_read():
    assert read_image(_png(np.full((32, 32 * 16), 90, np.uint8)), name="long.png").shape == (32, 512, 3)


def test_a_file_over_the_byte_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(np.random.default_rng(2).integers(0, 255, (64, 64), dtype=np.uint8)))
    limits = ImageLimits(max_file_bytes=path.stat().st_size - 1)
    for source in (path, path.read_bytes()):
        reason = (f"big.png: refused, {path.stat().st_size} bytes exceeds the per-file limit of "
                  f"{limits.max_file_bytes} \\(FSAD_MAX_FILE_BYTES\\)")
        with pytest.raises(ImageReadError, match=reason):
            read_image(source, name="big.png", limits=limits)
    assert read_image(path, limits=ImageLimits(max_file_bytes=path.stat().st_size)).shape == (64, 64, 3)


def test_a_set_over_the_pixel_budget_is_refused_naming_the_setting():
    with pytest.raises(ImageReadError, match="upload U: refused, its 3 images hold 3000 decoded pixels, above the "
                                             "budget of 2999 \\(FSAD_MAX_SET_PIXELS\\)"):
        ImageLimits(max_set_pixels=2999).check_set(3000, 3, "upload U")
    ImageLimits(max_set_pixels=3000).check_set(3000, 3, "upload U")


def test_a_pixel_budget_admits_headers_until_the_next_would_overrun_it_and_names_the_set(tmp_path):
    paths = []
    for i, side in enumerate((40, 40, 50)):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (side, side)).save(paths[-1])
    budget = PixelBudget(ImageLimits(max_set_pixels=2 * 3200), "batch up to {label}", share=2, advice="fewer")
    first = budget.admit(read_header(paths[0]))
    assert (first.width, first.height, budget.held, budget.count) == (40, 40, 1600, 1)
    assert budget.fits(read_header(paths[1])) and not budget.fits(read_header(paths[2]))
    with pytest.raises(ImageReadError, match=f"batch up to {paths[2]}: refused, its 2 images hold 4100 decoded "
                                             "pixels, above the budget of 3200 \\(FSAD_MAX_SET_PIXELS\\); fewer"):
        budget.admit(read_header(paths[2]))
    assert budget.held == 1600  # a refused image is not counted
    assert first.decode().shape == (40, 40, 3)


def test_limits_come_from_the_environment_and_a_bad_value_is_named():
    assert image_limits({}) == ImageLimits()
    assert image_limits({"FSAD_MAX_PIXELS": "4500", "FSAD_MAX_FILE_BYTES": "1000", "FSAD_MAX_SET_PIXELS": "9"}) == \
        ImageLimits(max_pixels=4500, max_file_bytes=1000, max_set_pixels=9)
    for variable in ("FSAD_MAX_PIXELS", "FSAD_MAX_FILE_BYTES", "FSAD_MAX_SET_PIXELS"):
        with pytest.raises(LimitSettingError, match=f"^{variable}='lots': not a whole number$"):
            image_limits({variable: "lots"})
        with pytest.raises(LimitSettingError, match=f"^{variable}='0': must be at least 1$"):
            image_limits({variable: "0"})


def _blocks(height: int, width: int, block: int) -> np.ndarray:
    """RGB whose every block x block square is of one colour: a whole-factor reduction of it by
    `block` is exact, whatever the mode it is reduced in."""
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (height // block, width // block, 3), dtype=np.uint8)
    return small.repeat(block, axis=0).repeat(block, axis=1)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "P+transparency", "I;16", "1"])
def test_an_image_above_the_working_size_is_reduced_by_a_whole_factor_in_every_mode(mode, monkeypatch):
    rgb = _blocks(128, 192, 2)
    image = {"RGB": Image.fromarray(rgb), "L": Image.fromarray(rgb[..., 0]),
             "RGBA": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),
             "P": Image.fromarray(rgb).quantize(16), "P+transparency": Image.fromarray(rgb).quantize(16),
             "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
             "1": Image.fromarray(rgb[..., 0] > 127)}[mode]
    buf = io.BytesIO()
    image.save(buf, format="PNG", **({"transparency": 0} if mode == "P+transparency" else {}))
    full = read_image(buf.getvalue())
    monkeypatch.setattr("fsad_core.imageio.WORK_PIXELS", 64 * 96)  # a quarter of its pixels: reduced by 2
    out = read_image(buf.getvalue())
    assert full.shape == (128, 192, 3) and out.shape == (64, 96, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - full[::2, ::2]).max() <= 1  # the colours of the blocks, not of indices


def test_an_array_is_reduced_as_its_file_would_be_and_a_small_one_is_kept(monkeypatch):
    monkeypatch.setattr("fsad_core.imageio.WORK_PIXELS", 40 * 60)
    rgb = np.random.default_rng(4).integers(0, 256, (121, 181, 3), dtype=np.uint8)  # reduced by 4, edges partial
    assert work_factor(181, 121) == 4
    assert np.array_equal(array_at_work_size(rgb), read_image(_png(rgb)))
    assert array_at_work_size(rgb).shape == (31, 46, 3)
    small = rgb[:40, :60]
    assert array_at_work_size(small) is small


def test_an_array_handed_to_the_library_is_rgb_uint8_or_refused_in_one_line():
    from fsad_core.imageio import checked_array

    rgb = np.zeros((40, 50, 3), np.uint8)
    assert checked_array(rgb, 0) is rgb
    with pytest.warns(UserWarning, match="image 1: grey 40x50, scored with its level in all three channels"):
        grey = checked_array(np.full((40, 50), 7, np.uint8), 1)
    assert grey.shape == (40, 50, 3) and (grey == 7).all()
    for bad, words in ((rgb.astype(np.float32) / 255, "dtype float32; expected a uint8 numpy array HxWx3"),
                       (np.zeros((40, 50, 4), np.uint8), "drop the alpha channel"),
                       (np.zeros((2, 40, 50, 3), np.uint8), "shape (2, 40, 50, 3)"),
                       ([[1, 2], [3, 4]], "image 2: a list; expected")):
        with pytest.raises(ValueError, match=re.escape(words)):
            checked_array(bad, 2)
