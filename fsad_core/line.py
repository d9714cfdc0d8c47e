"""A production line made from a labelled category, for simulating the loop: the upload, a held-out
truth set and a stream of parts, drawn so that what judges is never seen by anything else.

The k upload images come from the normal training images. Every other image is split, seeded and
stratified by label, into the held-out truth (a third: never labelled, trained on or seen by the
gate) and the stream, ordered at the defect share asked for, as far as the set allows.
Near-duplicates stay on one side: images whose names differ only in a trailing frame number
(consecutive frames of one part: ``part7_f01.png``, ``part7_f02.png``) form one group, and so do
neighbours in name order that look alike (frames numbered ``000.jpg``, ``001.jpg`` of one part, told
from their thumbnails). A group holding an upload image is never held out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .data import Category, Sample
from .imageio import read_image

HELD_OUT_SHARE = 1 / 3
# Neighbours closer than this share of the folder's median distance between two of its images are
# frames of one part: far below what separates two parts, so different parts of a uniform product
# (MVTec's bottles, all alike) stay apart.
NEAR_DUPLICATE = 0.5
_THUMBNAIL = 32
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
    held_out: list[Sample] = []
    stream_good: list[Sample] = []
    stream_defect: list[Sample] = []
    for label, stream in ((0, stream_good), (1, stream_defect)):
        groups = part_groups([s for s in category.train + category.test if s.label == label])
        beside_upload = [any(s.path in taken for s in g) for g in groups]
        stream.extend(s for g, beside in zip(groups, beside_upload) if beside for s in g if s.path not in taken)
        groups = [g for g, beside in zip(groups, beside_upload) if not beside]
        quota = round(HELD_OUT_SHARE * (sum(len(g) for g in groups) + len(stream)))
        for i in rng.permutation(len(groups)):
            (held_out if sum(s.label == label for s in held_out) < quota else stream).extend(groups[i])
        if not any(s.label == label for s in held_out):
            kind = "defective" if label else "normal"
            raise ValueError(f"{category.root}: no {kind} image is left for the held-out truth once the upload's "
                             f"parts and their near-duplicates go to the stream ({len(groups)} other parts)")
    return LineSplit(upload, held_out, _at_share(stream_good, stream_defect, defect_share, rng))


def part_groups(samples: Sequence[Sample]) -> list[list[Sample]]:
    """``samples`` in groups of one part each (in name order): the connected images, where images of
    one frame group are connected, and so is a near-duplicate to the image before it in its folder."""
    ordered = sorted(samples, key=lambda s: str(s.path))
    alike = _alike_to_previous([s.path for s in ordered])
    first_of: dict[str, int] = {}
    links = [(i, first_of.setdefault(frame_group(s.path), i)) for i, s in enumerate(ordered)]
    links += [(i, i - 1) for i in range(1, len(ordered)) if alike[i]]
    rows, cols = zip(*links) if links else ((), ())
    graph = coo_matrix((np.ones(len(links)), (rows, cols)), shape=(len(ordered), len(ordered)))
    _, part = connected_components(graph, directed=False)
    groups: dict[int, list[Sample]] = {}
    for s, p in zip(ordered, part):
        groups.setdefault(int(p), []).append(s)
    return list(groups.values())


def _alike_to_previous(paths: Sequence[Path]) -> list[bool]:
    """For each path, whether it is a near-duplicate of the path before it in the same folder."""
    alike = [False] * len(paths)
    for folder in dict.fromkeys(p.parent for p in paths):
        at = [i for i, p in enumerate(paths) if p.parent == folder]
        if len(at) < 3:  # two images have no typical distance to compare theirs with
            continue
        thumbnails = np.stack([_thumbnail(paths[i]) for i in at])
        squared = (thumbnails ** 2).sum(1)
        distance = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * thumbnails @ thumbnails.T, 0))
        typical = np.median(distance[np.triu_indices(len(at), 1)])
        for j in range(1, len(at)):
            alike[at[j]] = bool(distance[j, j - 1] < NEAR_DUPLICATE * typical)
    return alike


def _thumbnail(path: Path) -> np.ndarray:
    """A small grey copy, standardised, so that two frames compare by shape and not by exposure."""
    small = Image.fromarray(read_image(path)).convert("L").resize((_THUMBNAIL, _THUMBNAIL), Image.BILINEAR)
    grey = np.asarray(small, np.float32)
    return ((grey - grey.mean()) / (grey.std() + 1e-6)).ravel()


def _at_share(good: list[Sample], defect: list[Sample], share: float, rng: np.random.Generator) -> list[Sample]:
    """The stream: each next part a defect with chance ``share`` while both kinds last, then the rest."""
    good, defect = [good[i] for i in rng.permutation(len(good))], [defect[i] for i in rng.permutation(len(defect))]
    stream: list[Sample] = []
    while good and defect:
        stream.append((defect if rng.random() < share else good).pop())
    return stream + good + defect
