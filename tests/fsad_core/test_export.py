"""The ONNX export: the graph and the NumPy/Pillow runtime beside it decide as the torch path does,
and an export that would not is never written."""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from fsad_core import onnx_runtime
from fsad_core.data import load_category
from fsad_core.detector import Detector
from fsad_core.export import TOLERANCE, ExportedDetector, ExportError, check_images, compare, export_onnx
from fsad_core.finetune import FinetuneConfig
from fsad_core.imageio import read_image
from fsad_core.methods import method_config
from fsad_core.preprocess import InputSpec, prepare
from fsad_core.synthetic import make_category

SMALL = dict(pool_views=16, negatives=8, calibration_negatives=8, memory_views=2)


@pytest.fixture(scope="module")
def washer(tmp_path_factory):
    root = make_category(tmp_path_factory.mktemp("d") / "washer", kind="object", n_train=4, n_test_good=4,
                         n_test_defect=6, size=112, seed=3)
    return load_category(root)


def _fit(washer, method, **changes):
    config = replace(method_config(method, seed=0), **SMALL, **changes)
    images = [s.image() for s in washer.sample_k_shot(3, 0)]
    return Detector.fit(images, config, device="cpu")[0], images


@pytest.fixture(scope="module")
def both_branches(washer):
    """Fine-tuned, fused score, the patch branch at another side than the image branch (the graph
    then resizes inside), tiles on wide images."""
    return _fit(washer, "default", size=64, patch_size=96,
                finetune=FinetuneConfig(steps=4, normals_per_batch=8, negatives_per_batch=4))


@pytest.fixture(scope="module")
def patch_only(washer):
    return _fit(washer, "fast", size=96, resize="letterbox")


@pytest.fixture(scope="module")
def exported(both_branches, tmp_path_factory):
    detector, images = both_branches
    out = tmp_path_factory.mktemp("x") / "export"
    return out, export_onnx(detector, out, images, {"folder": "washer-model"})


def _wide(image: np.ndarray) -> np.ndarray:
    """A wide copy of a part (three tiles)."""
    return np.concatenate([image, image[:, ::-1], image], axis=1)


def test_an_export_holds_the_graph_its_spec_and_the_runtime_and_passed_its_check(exported):
    out, check = exported
    assert sorted(p.name for p in out.iterdir()) == ["fsad_runtime.py", "model.json", "model.onnx"]
    spec = json.loads((out / "model.json").read_text())
    assert spec["check"]["max_unit_difference"] == check.max_unit_difference <= TOLERANCE
    assert check.decisions_identical and check.images == 6 and spec["model"] == {"folder": "washer-model"}
    assert 0 < check.flagged_by_torch < check.images  # the check met both decisions
    assert (out / "fsad_runtime.py").read_text() == open(onnx_runtime.__file__).read()


def test_the_exported_model_decides_new_parts_as_torch_does(exported, both_branches, washer):
    detector, _ = both_branches
    test = [s.image() for s in washer.test]
    test += [_wide(test[0]), _wide(test[-1])[:, :200]]
    check = compare(detector, onnx_runtime.ExportedModel(exported[0]), test)
    assert check.passed and check.max_unit_difference < TOLERANCE / 2, check
    torch_result, onnx_result = detector.score(test), ExportedDetector(exported[0]).score(test)
    assert (torch_result.is_anomaly == onnx_result.is_anomaly).all()
    assert np.abs(torch_result.components["mahalanobis"] - onnx_result.components["mahalanobis"]).max() < 1e-3


def test_a_patch_only_model_exports_without_the_image_branch(patch_only, washer, tmp_path):
    detector, images = patch_only
    check = export_onnx(detector, tmp_path / "fast", [_wide(images[0])[:, :150], *images], {})
    spec = json.loads((tmp_path / "fast" / "model.json").read_text())
    assert check.passed and spec["outputs"] == ["map"] and spec["resize"] == "letterbox"
    result = ExportedDetector(tmp_path / "fast").score([s.image() for s in washer.test])
    assert set(result.components) == {"patch"}


def test_an_export_that_disagrees_with_torch_is_refused_and_nothing_is_written(both_branches, tmp_path, monkeypatch):
    detector, images = both_branches
    from fsad_core import export

    real_spec = export._spec

    def shifted_fusion(detector, source):  # the runtime would standardise the patch score wrongly
        spec = real_spec(detector, source)
        spec["fusion"]["patch"][0] += 1.0
        return spec

    monkeypatch.setattr(export, "_spec", shifted_fusion)
    with pytest.raises(ExportError, match="disagrees with torch"):
        export_onnx(detector, tmp_path / "bad", images, {})
    assert list(tmp_path.iterdir()) == []


def test_an_export_never_writes_into_a_folder_that_holds_files(both_branches, tmp_path):
    detector, images = both_branches
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_onnx(detector, tmp_path, images, {})
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_check_meets_both_decisions_with_a_defect_made_on_each_image(washer):
    images = [s.image() for s in washer.train[:2]]
    checked = check_images(images)
    assert len(checked) == 4 and all(c.dtype == np.uint8 and c.shape == i.shape for c, i in zip(checked[2:], images))
    assert all(np.abs(c.astype(int) - i).max() > 10 for c, i in zip(checked[2:], images))


@pytest.mark.parametrize("mode", ["resize", "letterbox", "tile"])
@pytest.mark.parametrize("shape", [(90, 90), (70, 200), (300, 120), (40, 41)])
def test_the_runtime_prepares_views_as_torch_does(mode, shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = np.concatenate(onnx_runtime.prepare(image, 96, mode, 16))
    theirs = prepare(image, InputSpec(96, mode)).numpy()
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-4


def _saved(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_the_runtime_reads_files_as_fsad_does(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    big = np.random.default_rng(2).integers(0, 256, (2100, 2100), dtype=np.uint8)
    turned = Image.fromarray(rgb)
    exif = turned.getexif()
    exif[0x0112] = 6  # rotated: the orientation tag must be applied
    cases = {"rgb.png": _saved(Image.fromarray(rgb)), "grey.png": _saved(Image.fromarray(rgb[..., 0])),
             "rgba.png": _saved(Image.fromarray(np.dstack([rgb, rgb[..., :1]]))),
             "palette.png": _saved(Image.fromarray(rgb).convert("P")),
             "grey16.png": _saved(Image.fromarray(rgb[..., 0].astype(np.uint16) * 200)),
             "big.png": _saved(Image.fromarray(big))}
    buf = io.BytesIO()
    turned.save(buf, format="JPEG", exif=exif)
    cases["turned.jpg"] = buf.getvalue()
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        ours, theirs = onnx_runtime.read_rgb(tmp_path / name), read_image(tmp_path / name)
        assert ours.shape == theirs.shape and (ours == theirs).all(), name


def test_the_runtime_refuses_what_is_not_an_rgb_uint8_image(exported):
    model = onnx_runtime.ExportedModel(exported[0])
    with pytest.raises(ValueError, match="uint8 numpy array HxWx3"):
        model.score(np.zeros((64, 64, 3), np.float32))
