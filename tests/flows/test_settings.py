"""The pipeline's training configuration (FSAD_TRAIN_OVERRIDES and a product's own settings): what it
takes and what it refuses."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from flows.settings import (
    DEFAULT_IO_RETRY_DELAYS,
    LoopSettings,
    SettingsError,
    config_sha256,
    io_retry_delays,
    load_settings,
    loop_settings,
    merge_overrides,
    product_overrides,
    read_product_training,
    training_config,
    uri_credentials,
)
from flows.store.storage import LocalStore, training_key
from fsad_core.methods import method_config


def test_io_retry_delays_come_from_the_environment_and_a_bad_value_is_named():
    assert io_retry_delays({}) == list(DEFAULT_IO_RETRY_DELAYS)
    assert io_retry_delays({"FSAD_IO_RETRY_DELAYS": "1,0.5"}) == [1.0, 0.5]
    for bad in ("soon", "1,,2", "-1", "4000", ",".join(["1"] * 11)):
        with pytest.raises(SettingsError, match=f"^FSAD_IO_RETRY_DELAYS={bad!r}: 1 to 10 comma-separated seconds"):
            io_retry_delays({"FSAD_IO_RETRY_DELAYS": bad})


def test_augment_overrides_change_the_methods_own_augmentations():
    config = training_config("default", 2, {"augment": {"hflip": False, "crop_scale": [0.9, 1.0]}})
    base = method_config("default").augment
    assert (config.augment.hflip, config.augment.crop_scale) == (False, (0.9, 1.0))
    assert (config.augment.rotation_deg, config.augment.vflip) == (base.rotation_deg, base.vflip)
    assert config.seed == 2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"augment": {"mirror": True}}, "unknown setting augment.mirror"),
    ({"augment": {"rotation_deg": 400}}, "rotation_deg"),
    ({"augment": "none"}, "augment: an object of AugmentConfig fields, got 'none'"),
    ({"finetune": "fast"}, "finetune: an object of FinetuneConfig fields"),
    ({"intensity": {"mode": "raw"}}, "intensity: a name, got {'mode': 'raw'}"),
    ({"colour": "red"}, "unknown setting colour"),
    ({"seed": 4}, "seed: not a setting: the seed is a flow parameter"),
    ({"map_sigma": -1}, "map_sigma"),
    ({"finetune": {"loss": {"negativ": 1}}}, r"unknown setting finetune\.loss\.negativ \(the settings there: instance"),
    ({"weights": "/etc/passwd"}, r"weights: not a setting: .*\(a file path is never a setting\)"),
    ({"finetune": {"steps": "10"}}, "finetune.steps: a whole number, got '10'"),
    ({"finetune": {"steps": 10**9}}, "finetune.steps: from 1 to 100000, got 1000000000"),
    ({"size": -5}, "input size -5 outside"),
    ({"size": 224.5}, "size: a whole number, got 224.5"),
    ({"patch_size": 0}, "patch_size: from 32 to 2048, got 0"),
    ({"pool_views": 10**7}, "pool_views: from 8 to 4096"),
    ({"finetune": {"lr_head": float("nan")}}, "finetune.lr_head: a finite number, got nan"),
    ({"finetune": {"lr_backbone": float("inf")}}, "finetune.lr_backbone: a finite number, got inf"),
    ({"backbone": "resnet50"}, "backbone: one of tf_efficientnet_lite0"),
    ({"backbone": "vit_giant_patch14_dinov2"}, "backbone: one of"),
    ({"augment": {"hflip": "no"}}, "augment.hflip: true or false"),
])
def test_bad_overrides_are_refused_naming_the_variable_and_the_field(overrides, message):
    with pytest.raises(SettingsError, match=message) as error:
        training_config("default", 0, overrides)
    assert str(error.value).startswith("FSAD_TRAIN_OVERRIDES: ")


def test_settings_refuse_bad_overrides_when_read():
    with pytest.raises(SettingsError, match="not valid JSON"):
        load_settings({"FSAD_TRAIN_OVERRIDES": "{hflip: false}"})
    with pytest.raises(SettingsError, match="unknown setting augment.flip"):
        load_settings({"FSAD_TRAIN_OVERRIDES": json.dumps({"augment": {"flip": False}})})


def test_nested_settings_become_their_configurations_and_merge_field_by_field():
    """``finetune.loss`` (a documented setting) changes the method's loss weights, and a product's
    own loss weights merge over the global ones."""
    merged = merge_overrides({"finetune": {"steps": 10, "loss": {"instance": 2}}},
                             {"finetune": {"loss": {"cross": 0.5}}})
    config = training_config("default", 0, merged)
    assert config.finetune.steps == 10
    assert (config.finetune.loss.instance, config.finetune.loss.cross, config.finetune.loss.negative) == (2, 0.5, 1)
    assert training_config("pretrained", 0, merged).finetune is None  # nothing to fine-tune: checked, not applied
    with pytest.raises(SettingsError, match="finetune.loss.cross: from 0 to 100"):
        training_config("pretrained", 0, {"finetune": {"loss": {"cross": -1}}})


def test_a_products_settings_merge_over_the_global_ones_field_by_field():
    base = {"size": 96, "augment": {"rotation_deg": 0}, "finetune": {"steps": 10}}
    merged = merge_overrides(base, {"size": 128, "augment": {"hflip": False}, "map_sigma": 8})
    assert merged == {"size": 128, "augment": {"rotation_deg": 0, "hflip": False}, "finetune": {"steps": 10},
                      "map_sigma": 8}
    assert base["augment"] == {"rotation_deg": 0}  # the global settings are not changed


def test_product_settings_are_read_from_storage_and_refused_when_malformed(tmp_path):
    store = LocalStore(tmp_path)
    settings = load_settings({"FSAD_HOME": str(tmp_path), "FSAD_TRAIN_OVERRIDES": '{"size": 96}'})
    assert read_product_training(store, "washer") == {}
    assert product_overrides(settings, store, "washer") == ({"size": 96}, "FSAD_TRAIN_OVERRIDES")
    store.put_json(training_key("washer"), {"map_sigma": 8})
    overrides, source = product_overrides(settings, store, "washer")
    assert overrides == {"size": 96, "map_sigma": 8} and source.endswith("products/washer/training.json")
    store.put_bytes(training_key("washer"), b"{map_sigma: 8}")
    with pytest.raises(SettingsError, match="training.json: not valid JSON"):
        read_product_training(store, "washer")
    store.put_json(training_key("washer"), [8])
    with pytest.raises(SettingsError, match="training.json: must be a JSON object"):
        read_product_training(store, "washer")


@pytest.mark.parametrize("method, digest", [
    ("default", "401b4864ecc93b1485a02d17cf3e22bc91a5250e8480599a66ca111a4466dcef"),
    ("fast", "122250797f891a5f49a075f4beaf8dd2c998e2c3d53179ecdcf20f92c06b396f"),
    ("pretrained", "d1b7c66fe04a474cf1ffc795bf46804b28169768084b98367376d0eeaaa88fd8"),
])
def test_a_configurations_hash_stays_what_earlier_versions_registered(method, digest):
    # Champions carry this hash: a refactor that changed it would retrain every product once and
    # register duplicates of versions already trained.
    assert config_sha256(method_config(method, seed=0)) == digest
    assert config_sha256(method_config(method, seed=0), LoopSettings(reviews_per_run=5)) == digest  # not training


def test_the_label_settings_that_change_training_change_its_identity():
    config = method_config("fast", seed=0)
    hashes = {config_sha256(config, loop) for loop in (
        LoopSettings(), LoopSettings(miss_rate_target=0.1), LoopSettings(defect_negatives=True),
        LoopSettings(max_k=8), LoopSettings(benchmark_share=0.3))}
    assert len(hashes) == 5 and config_sha256(config) in hashes


@pytest.mark.parametrize("uri, clean, user, password", [
    ("http://user:s3cret@host:5000/path", "http://host:5000/path", "user", "s3cret"),
    ("https://us%40er:p%3Ass@host", "https://host", "us@er", "p:ss"),
    ("http://token@host", "http://host", "token", None),
    ("http://host:5000", "http://host:5000", None, None),
    ("sqlite:////tmp/fsad/mlflow.db", "sqlite:////tmp/fsad/mlflow.db", None, None),
])
def test_credentials_in_the_tracking_uri_are_kept_apart_from_it(uri, clean, user, password):
    found = uri_credentials(uri)
    assert (found.uri, found.username, found.password) == (clean, user, password)
    assert load_settings({"MLFLOW_TRACKING_URI": uri, "FSAD_HOME": "/tmp/fsad"}).tracking_uri == clean


def test_a_products_loop_settings_sit_beside_the_models_and_are_checked_as_they_are():
    overrides = {"size": 96, "loop": {"benchmark_share": 0.5, "allow_unproven": True}}
    assert training_config("default", 0, overrides).size == 96  # the model never sees "loop"
    assert loop_settings(overrides) == LoopSettings(benchmark_share=0.5, allow_unproven=True)
    assert loop_settings({}) == LoopSettings()
    assert loop_settings({"loop": {"candidates": ["default"]}}).candidates == ("default",)
    for bad, message in (({"loop": {"max_k": 0}}, "loop.max_k: from 1 to 256"),
                         ({"loop": {"share": 0.5}}, "unknown setting loop.share"),
                         ({"loop": {"allow_unproven": "yes"}}, "loop.allow_unproven: true or false"),
                         ({"loop": {"candidates": ["fast", "nope"]}}, "loop.candidates: a list of different names"),
                         ({"loop": {"candidates": []}}, "loop.candidates: a list of different names"),
                         ({"loop": {"miss_rate_target": 0.6}}, "loop.miss_rate_target: from 0 to 0.5"),
                         ({"loop": {"miss_rate_target": 0.1, "defect_negatives": True}},
                          "loop.miss_rate_target with loop.defect_negatives would set the threshold on defects")):
        with pytest.raises(SettingsError, match=f"here: {message}"):
            loop_settings(bad, "here")


DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_every_loop_setting_is_documented():
    documented = re.findall(r"^\| `loop\.([a-z_]+)` \|", DOCS.read_text(), re.MULTILINE)
    assert documented == [f.name for f in dataclasses.fields(LoopSettings)]
