"""The pipeline's training configuration from FSAD_TRAIN_OVERRIDES: what it takes and what it refuses."""

import json

import pytest

from flows.settings import SettingsError, load_settings, training_config
from fsad_core.methods import method_config


def test_augment_overrides_change_the_methods_own_augmentations():
    config = training_config("default", 2, {"augment": {"hflip": False, "crop_scale": [0.9, 1.0]}})
    base = method_config("default").augment
    assert (config.augment.hflip, config.augment.crop_scale) == (False, (0.9, 1.0))
    assert (config.augment.rotation_deg, config.augment.vflip) == (base.rotation_deg, base.vflip)
    assert config.seed == 2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"augment": {"mirror": True}}, "unknown augmentation field"),
    ({"augment": {"rotation_deg": 400}}, "rotation_deg"),
    ({"augment": "none"}, "augment must be an object"),
    ({"finetune": "fast"}, "finetune must be an object"),
    ({"intensity": {"mode": "raw"}}, "only 'finetune' and 'augment' may be objects, not intensity"),
    ({"colour": "red"}, "unknown DetectorConfig field"),
    ({"seed": 4}, "the seed is a flow parameter"),
    ({"map_sigma": -1}, "map_sigma"),
])
def test_bad_overrides_are_refused_naming_the_variable_and_the_field(overrides, message):
    with pytest.raises(SettingsError, match=message) as error:
        training_config("default", 0, overrides)
    assert str(error.value).startswith("FSAD_TRAIN_OVERRIDES: ")


def test_settings_refuse_bad_overrides_when_read():
    with pytest.raises(SettingsError, match="not valid JSON"):
        load_settings({"FSAD_TRAIN_OVERRIDES": "{hflip: false}"})
    with pytest.raises(SettingsError, match="unknown augmentation field"):
        load_settings({"FSAD_TRAIN_OVERRIDES": json.dumps({"augment": {"flip": False}})})
