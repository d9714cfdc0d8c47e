"""Named methods: one registry from a method name to a DetectorConfig, as timm does for models.

The ablation of the contrastive loss (`pretrained`, `instance`, `instance+cross`, `full`) is four
rows of this table; `default` is the best measured setting. Their names are listed in `options`
too, for the command line, and this module refuses to import if the two differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .config import DetectorConfig
from .finetune import FinetuneConfig
from .losses import LossWeights
from .options import METHOD_NAMES, check_registered
from .overrides import apply_overrides

_METHODS: dict[str, Callable[[], DetectorConfig]] = {}
_DESCRIPTIONS: dict[str, str] = {}


MethodFactory = Callable[[], DetectorConfig]


def register_method(name: str, description: str) -> Callable[[MethodFactory], MethodFactory]:
    def wrap(fn: Callable[[], DetectorConfig]) -> Callable[[], DetectorConfig]:
        _METHODS[name] = fn
        _DESCRIPTIONS[name] = description
        return fn
    return wrap


def list_methods() -> dict[str, str]:
    return dict(_DESCRIPTIONS)


def method_config(name: str, seed: int = 0, weights: str | None = None, source: str = "the options given",
                  **settings: object) -> DetectorConfig:
    """The DetectorConfig of a named method for ``seed`` (and a weights file, for experiments on
    this machine), with ``settings`` (None: the method's own) checked and applied by the one
    loader, `apply_overrides`: `{"augment": {"hflip": False}}` keeps the method's crops and rotation."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; one of {sorted(_METHODS)}")
    config = replace(_METHODS[name](), seed=seed, weights=weights)
    return apply_overrides(config, {k: v for k, v in settings.items() if v is not None}, source)


def _finetuned(instance: float, cross: float, negative: float) -> DetectorConfig:
    return DetectorConfig(finetune=FinetuneConfig(loss=LossWeights(instance=instance, cross=cross, negative=negative)))


@register_method("pretrained", "ImageNet features, no fine-tuning; same scoring (the baseline)")
def _pretrained() -> DetectorConfig:
    return DetectorConfig(finetune=None)


@register_method("instance", "fine-tuned with instance pairs only")
def _instance() -> DetectorConfig:
    return _finetuned(1.0, 0.0, 0.0)


@register_method("instance+cross", "fine-tuned with instance and cross-instance positive pairs")
def _instance_cross() -> DetectorConfig:
    return _finetuned(1.0, 1.0, 0.0)


@register_method("full", "instance + cross-instance pairs + synthesized negatives")
def _full() -> DetectorConfig:
    return _finetuned(1.0, 1.0, 1.0)


@register_method("default", "the best measured setting (docs/results.md): full fine-tuning, fused score")
def _default() -> DetectorConfig:
    return _full()


@register_method("fast", "ImageNet features, the patch score alone at 224 px from the original views: one short "
                         "backbone pass and a small memory, for lines that need speed")
def _fast() -> DetectorConfig:
    return DetectorConfig(finetune=None, score="patch", patch_size=None, memory_views=1)


check_registered("method", _METHODS, METHOD_NAMES)
