import io

import numpy as np
import pytest
from PIL import Image

from fsad_core.imageio import ImageReadError, read_image, read_mask


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_rgb_grey_rgba_palette_16bit_cmyk_all_become_rgb_uint8(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cases = {
        "rgb.png": Image.fromarray(rgb),
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "grey16.png": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "rgb.jpg": Image.fromarray(rgb),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = read_image(tmp_path / name)
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
    grey16 = read_image(tmp_path / "grey16.png")
    assert np.abs(grey16[..., 0].astype(int) - rgb[..., 0]).max() <= 1


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (40, 10, 3)


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
    with pytest.raises(ImageReadError, match="cut"):
        read_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(path, optimize=True)  # tiny file, 900 Mpixel
    with pytest.raises(ImageReadError, match="too many pixels|exceeds the limit"):
        read_image(path)
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_image(_png(np.zeros((100, 100), np.uint8)), name="small.png", max_pixels=5000)


def test_mask_reads_as_bool(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:4] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").sum() == 4
