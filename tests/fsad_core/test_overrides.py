import pytest

from fsad_core.config import DetectorConfig
from fsad_core.finetune import FinetuneConfig
from fsad_core.losses import LossWeights
from fsad_core.overrides import OverrideError, apply_overrides


def test_nested_objects_change_their_configurations_field_by_field():
    config = apply_overrides(DetectorConfig(), {"finetune": {"loss": {"temperature": 0.1}, "steps": 5},
                                                "augment": {"crop_scale": [0.8, 1]}, "patch_size": None}, "here")
    assert config.finetune == FinetuneConfig(steps=5, loss=LossWeights(temperature=0.1))
    assert config.augment.crop_scale == (0.8, 1.0) and config.patch_size is None
    assert apply_overrides(DetectorConfig(), {}, "here") == DetectorConfig()


@pytest.mark.parametrize("overrides, message", [
    ({"finetune": {"loss": {"negativ": 1}}}, "here: unknown setting finetune.loss.negativ"),
    ({"finetune": None, "size": None}, "here: size: cannot be null"),
    ({"memory_views": True}, "here: memory_views: a whole number, got True"),
    ({"augment": {"crop_scale": ["a", 1]}}, "here: augment.crop_scale: a list of finite numbers"),
    ({"coreset_candidates": 5}, "here: coreset_candidates 5: 0 (all patches) or a whole number of at least"),
])
def test_a_refusal_names_where_the_settings_came_from_and_the_setting(overrides, message):
    with pytest.raises(OverrideError) as error:
        apply_overrides(DetectorConfig(), overrides, "here")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_fine_tuning_settings_of_a_method_without_fine_tuning_are_checked_and_not_applied():
    assert apply_overrides(DetectorConfig(finetune=None), {"finetune": {"steps": 5}}, "here").finetune is None
    with pytest.raises(OverrideError, match="finetune.steps: from 1 to 100000"):
        apply_overrides(DetectorConfig(finetune=None), {"finetune": {"steps": 0}}, "here")
