import dataclasses
import functools
import re
from pathlib import Path

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


# A value other than the default for every setting: a field added to the configuration must be
# added here and to docs/settings.md.
EVERY_SETTING = {
    "backbone": "tf_efficientnet_lite1", "size": 256, "resize": "letterbox", "intensity": "standardise",
    "patch_size": 256, "pooling": "mean", "pool_views": 32, "negatives": 16, "calibration_negatives": 16,
    "memory_views": 2, "memory_max": 5000, "coreset_candidates": 0, "map_sigma": 2.0, "score": "patch",
    "target_false_alarm_rate": 0.05, "augment.crop_scale": (0.9, 1.0), "augment.hflip": False,
    "augment.vflip": True, "augment.rotation_deg": 5.0, "augment.brightness": 0.1, "augment.contrast": 0.1,
    "finetune.steps": 10, "finetune.lr_backbone": 1e-5, "finetune.lr_head": 1e-4, "finetune.weight_decay": 0.0,
    "finetune.normals_per_batch": 8, "finetune.negatives_per_batch": 4, "finetune.patience": 5,
    "finetune.min_improvement": 0.001, "finetune.loss.instance": 0.5, "finetune.loss.cross": 0.5,
    "finetune.loss.negative": 0.5, "finetune.loss.temperature": 0.1,
}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def _leaf_paths(config: object, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        paths += (_leaf_paths(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value)
                  else [f"{prefix}{f.name}"])
    return paths


def test_every_field_of_the_configuration_is_a_documented_setting_but_weights_and_seed():
    fields = set(_leaf_paths(DetectorConfig())) - {"weights", "seed"}
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", DOCS.read_text(), re.MULTILINE)) - {"finetune"}
    assert fields == {path for path in documented if not path.startswith("loop.")} == set(EVERY_SETTING)


@pytest.mark.parametrize("path", sorted(EVERY_SETTING))
def test_each_setting_can_be_set_and_is_held_by_the_configuration(path):
    value = EVERY_SETTING[path]
    *parents, leaf = path.split(".")
    nested: dict = {leaf: list(value) if isinstance(value, tuple) else value}
    for parent in reversed(parents):
        nested = {parent: nested}
    config = apply_overrides(DetectorConfig(), nested, "here")
    field_of = functools.partial(functools.reduce, getattr, path.split("."))
    assert field_of(config) == value != field_of(DetectorConfig())
    assert DetectorConfig.from_dict(config.to_dict()) == config
