"""The named choices of a detector configuration, in one place that imports nothing heavy.

The library checks configurations against these names and the `fsad` command line offers them,
so that `fsad --help` lists them without importing torch. The registries in `methods` and
`backbone` check at import that they define exactly the names listed here.
"""

from __future__ import annotations

from collections.abc import Iterable

RESIZE_MODES = ("resize", "letterbox", "tile")
INTENSITY_MODES = ("raw", "standardise")  # what a fitted model uses
INTENSITY_POLICIES = ("auto", *INTENSITY_MODES)  # what a configuration may ask for
POOLINGS = ("mean", "mean+std", "mean+std+max")
SCORE_KINDS = ("mahalanobis", "patch", "fused", "either")
# Names of the flip settings, as (hflip, vflip): none for text-bearing or handed parts, both for
# parts that look the same mirrored either way.
FLIPS = {"none": (False, False), "horizontal": (True, False), "vertical": (False, True), "both": (True, True)}
METHOD_NAMES = ("pretrained", "instance", "instance+cross", "full", "default", "fast")
BUNDLED_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def check_registered(registry: str, registered: Iterable[str], listed: tuple[str, ...]) -> None:
    """Refuse to import a registry whose names differ from its list here: a list the command line
    offers must never go stale unnoticed."""
    if tuple(registered) != listed:
        raise ImportError(f"the {registry} registry defines {tuple(registered)}, "
                          f"but fsad_core.options lists {listed}")
