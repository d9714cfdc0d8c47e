"""A production line made from a labelled category, for simulating the loop: the upload, a held-out
truth set and a stream of parts, drawn so that what judges is never seen by anything else.

The k upload images come from the normal training images. Every other image is split, seeded and
stratified by label, into the held-out truth (a third: never labelled, trained on or seen by the
gate) and the stream, ordered at the defect share asked for, as far as the set allows.
Near-duplicates stay on one side: images whose names differ only in a trailing frame number
(consecutive frames of one part: ``part7_f01.png``, ``part7_f02.png``) form one group.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Category, Sample

HELD_OUT_SHARE = 1 / 3
_FRAME = re.compile(r"^(.*\D)\d+$")  # a name with a trailing frame number after a non-digit


@dataclass(frozen=True)
class LineSplit:
    upload: list[Sample]  # k normal images
    held_out: list[Sample]
    stream: list[Sample]  # in the order the line makes them


def frame_group(path: Path) -> str:
    """The group of an image: its folder and its name less a trailing frame number (a purely
    numbered name, as MVTec's, is a group of its own)."""
    match = _FRAME.match(path.stem)
    return f"{path.parent}/{match.group(1) if match else path.stem}"


def split_line(category: Category, k: int, seed: int, defect_share: float = 0.1) -> LineSplit:
    """The upload, the held-out truth and the stream of ``category`` (see the module docstring)."""
    if not 0 < defect_share < 1:
        raise ValueError(f"defect share {defect_share}: above 0 and below 1")
    rng = np.random.default_rng(seed)
    upload = category.sample_k_shot(k, seed)
    taken = {s.path for s in upload}
    rest = [s for s in category.train + category.test if s.path not in taken]
    held_out: list[Sample] = []
    stream_good: list[Sample] = []
    stream_defect: list[Sample] = []
    for label, stream in ((0, stream_good), (1, stream_defect)):
        groups = _groups([s for s in rest if s.label == label])
        order = rng.permutation(len(groups))
        quota = round(HELD_OUT_SHARE * sum(len(g) for g in groups))
        for i in order:
            (held_out if sum(s.label == label for s in held_out) < quota else stream).extend(groups[i])
    return LineSplit(upload, held_out, _at_share(stream_good, stream_defect, defect_share, rng))


def _groups(samples: Sequence[Sample]) -> list[list[Sample]]:
    by_group: dict[str, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: str(s.path)):
        by_group.setdefault(frame_group(s.path), []).append(s)
    return list(by_group.values())


def _at_share(good: list[Sample], defect: list[Sample], share: float, rng: np.random.Generator) -> list[Sample]:
    """The stream: each next part a defect with chance ``share`` while both kinds last, then the rest."""
    good, defect = [good[i] for i in rng.permutation(len(good))], [defect[i] for i in rng.permutation(len(defect))]
    stream: list[Sample] = []
    while good and defect:
        stream.append((defect if rng.random() < share else good).pop())
    return stream + good + defect
