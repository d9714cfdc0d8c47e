"""What a model or a benchmark run was made with: library versions and the CPU.

Fine-tuned weights depend on more than the code, the seed and torch's version: with all three the
same, two installs gave `default` different records while `pretrained` was equal record for record
(docs/measurements.md), and nothing recorded could say which library or machine
differed. So models and benchmark records name them.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import torch

from . import __version__

LIBRARIES = ("torchvision", "timm", "numpy", "scipy", "scikit-image", "scikit-learn", "pillow",
             "safetensors")


def library_versions() -> dict[str, str | None]:
    """fsad's version and that of each library the fit and scoring run on (None: not installed);
    torch's with its build (`2.14.1+cpu`, `+cu130`), which decides the kernels."""
    versions: dict[str, str | None] = {"fsad": __version__, "torch": torch.__version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_description() -> str:
    """The CPU's model name and the vector instruction set torch's kernels use on it."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"
