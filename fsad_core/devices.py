"""Where the model runs: the one reading of `FSAD_DEVICE`, and a device name made a torch device."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

DEVICES = ("auto", "cpu", "cuda")
DEVICE_VARIABLE = "FSAD_DEVICE"


def configured_device(env: Mapping[str, str] = os.environ) -> str:
    """The device `FSAD_DEVICE` names (``auto`` when unset); a value outside DEVICES is refused here,
    so a typo never silently runs on the wrong device."""
    device = env.get(DEVICE_VARIABLE) or "auto"
    if device not in DEVICES:
        raise ValueError(f"{DEVICE_VARIABLE}={device!r}: one of {', '.join(DEVICES)}")
    return device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA where there is one; asking for CUDA where there is none is an error, not a fallback."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)
