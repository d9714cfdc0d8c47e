"""Changes a user asks of a configuration (a product's settings, FSAD_TRAIN_OVERRIDES), checked
whole before any work: one loader for every nested object of `DetectorConfig`.

Each key must name a field, with its path in the refusal (``finetune.loss.negativ``); a nested
object becomes its own configuration, changed field by field; every value is checked for its
type (a whole number is never a string or a fraction, no number is NaN or infinite) and its
range, so that a setting cannot make a worker load a file, build another model, or run for ever.
A refusal is one line: where the settings came from, the setting, and what it takes.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from .augment import AugmentConfig
from .config import DetectorConfig
from .finetune import FinetuneConfig
from .losses import LossWeights
from .options import BUNDLED_BACKBONES, METHOD_NAMES

Settings = typing.TypeVar("Settings")


class OverrideError(ValueError):
    """A setting that cannot be used; the message names where it came from and its path."""


# Settings users may not give: a path to load, or a choice the pipeline makes.
_NOT_SETTINGS = {
    "weights": "not a setting: a bundled backbone's ImageNet weights come with fsad (a file path is never a setting)",
    "seed": "not a setting: the seed is a flow parameter",
}
# (low, high) of each number: whole numbers by their type, the rest finite. Sized for the few-shot
# fits of a worker: wide enough for any product, narrow enough that no setting runs for ever.
# Fields whose configuration checks its range itself (sizes, map_sigma, the false-alarm target,
# the augmentations) are not repeated here.
_RANGES: dict[str, tuple[float, float]] = {
    "patch_size": (32, 2048),  # 0 would read as "none given" (its side is then `size`)
    "pool_views": (8, 4096), "negatives": (0, 4096), "calibration_negatives": (0, 4096), "memory_views": (1, 64),
    "memory_max": (1, 1_000_000), "coreset_candidates": (0, 10_000_000),
    "finetune.steps": (1, 100_000), "finetune.lr_backbone": (1e-8, 1.0), "finetune.lr_head": (1e-8, 1.0),
    "finetune.weight_decay": (0, 1.0), "finetune.normals_per_batch": (2, 1024),
    "finetune.negatives_per_batch": (0, 1024), "finetune.patience": (1, 100_000),
    "finetune.min_improvement": (0, 1.0), "finetune.loss.instance": (0, 100), "finetune.loss.cross": (0, 100),
    "finetune.loss.negative": (0, 100), "finetune.loss.temperature": (1e-3, 10),
    "loop.benchmark_share": (0.05, 0.9), "loop.max_k": (1, 256), "loop.reviews_per_run": (1, 100_000),
    "loop.miss_rate_target": (0, 0.5),
}
_CHOICES: dict[str, tuple[str, ...]] = {"backbone": BUNDLED_BACKBONES, "loop.candidates": METHOD_NAMES}
_NESTED = (AugmentConfig, FinetuneConfig, LossWeights)  # the configurations inside DetectorConfig


def apply_overrides(config: Settings, overrides: Mapping[str, Any], source: str, path: str = "") -> Settings:
    """``config`` (a `DetectorConfig`, or another dataclass of settings, named ``path`` in
    refusals) with ``overrides`` applied field by field (nested objects too); OverrideError, naming
    ``source`` and the setting, for anything that cannot be used."""
    try:
        return _changed(config, overrides, path)
    except (TypeError, ValueError) as exc:  # ours, or a check of the configuration itself (fields together)
        raise OverrideError(f"{source}: {exc}") from None


def _changed(current: Any, changes: Any, path: str) -> Any:
    """The dataclass ``current`` with ``changes`` (a mapping of its fields) applied."""
    cls = type(current)
    if not isinstance(changes, Mapping):
        raise OverrideError(f"{path.rstrip('.')}: an object of {cls.__name__} fields, got {_shown(changes)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    updates = {}
    for key, value in changes.items():
        where = f"{path}{key}"
        if key in _NOT_SETTINGS and not path and cls is DetectorConfig:
            raise OverrideError(f"{where}: {_NOT_SETTINGS[key]}")
        if key not in names:
            raise OverrideError(f"unknown setting {where} (the settings there: {', '.join(names)})")
        updates[key] = _value(getattr(current, key), hints[key], value, where)
    return dataclasses.replace(current, **updates)


def _value(current: Any, hint: Any, value: Any, path: str) -> Any:
    """One field's new value, checked against its type hint and range."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise OverrideError(f"{path}: cannot be null")
    nested = next((o for o in options if o in _NESTED), None)
    if nested is not None:
        base = current if isinstance(current, nested) else None
        if base is None:  # `pretrained` has nothing to fine-tune: the changes are checked, and there is none
            _changed(nested(), value, f"{path}.")
            return None
        return _changed(base, value, f"{path}.")
    kind = next(o for o in options if o is not type(None))
    return _checked(kind, value, path)


def _checked(kind: Any, value: Any, path: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise OverrideError(f"{path}: true or false, got {_shown(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OverrideError(f"{path}: a whole number, got {_shown(value)}")
        return _in_range(value, path)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OverrideError(f"{path}: a finite number, got {_shown(value)}")
        return _in_range(float(value), path)
    if kind is str:
        if not isinstance(value, str):
            raise OverrideError(f"{path}: a name, got {_shown(value)}")
        if path in _CHOICES and value not in _CHOICES[path]:
            raise OverrideError(f"{path}: one of {', '.join(_CHOICES[path])}, got {_shown(value)}")
        return value
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is str:
        if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value) or not all(
                isinstance(v, str) and v in _CHOICES.get(path, (v,)) for v in value):
            raise OverrideError(f"{path}: a list of different names of {', '.join(_CHOICES.get(path, ()))}, "
                                f"got {_shown(value)}")
        return tuple(value)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise OverrideError(f"{path}: a list of finite numbers, got {_shown(value)}")
        return tuple(float(v) for v in value)
    raise OverrideError(f"{path}: not a setting")


def _in_range(value: float, path: str) -> Any:
    low, high = _RANGES.get(path, (-math.inf, math.inf))
    if not low <= value <= high:
        raise OverrideError(f"{path}: from {low:g} to {high:g}, got {value!r}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
