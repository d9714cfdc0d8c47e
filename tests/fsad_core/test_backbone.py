import pytest
import torch
from skimage import data as skdata

from fsad_core.backbone import (
    WeightsError,
    create_backbone,
    get_spec,
    list_backbones,
    verify_sha256_prefix,
    weights_path,
)
from fsad_core.preprocess import InputSpec, normalise, prepare


def _top5(model: torch.nn.Module, image) -> list[int]:
    spec = InputSpec(224, "resize", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        logits = model.eval()(normalise(prepare(image, spec), spec))
    return logits.topk(5).indices[0].tolist()


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0")


def test_imagenet_weights_recognise_cat_and_coffee(lite0):
    cat = _top5(lite0, skdata.chelsea())
    coffee = _top5(lite0, skdata.coffee())
    assert cat[0] in range(281, 286), cat
    assert {967, 968, 504} & set(coffee), coffee


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_larger_lites_load_strictly_and_see_a_cat(name):
    assert _top5(create_backbone(name), skdata.chelsea())[0] in range(281, 286)


def test_registry_lists_bundled_backbones():
    assert {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"} <= set(list_backbones())
    assert get_spec("tf_efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown backbone"):
        get_spec("no_such_model_xyz")


def test_sha256_prefix_is_checked(tmp_path):
    path = weights_path(get_spec("tf_efficientnet_lite0"))
    verify_sha256_prefix(path, "57934424")
    forged = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    forged.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        verify_sha256_prefix(forged, "57934424")


def test_local_checkpoint_loads_strictly_and_mismatch_is_refused(tmp_path, lite0):
    ckpt = tmp_path / "lite0.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in lite0.state_dict().items()}, str(ckpt))
    again = create_backbone("tf_efficientnet_lite0", weights=ckpt)
    for (k, a), b in zip(lite0.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone("tf_efficientnet_lite1", weights=ckpt)

