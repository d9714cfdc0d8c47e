"""MVTec-layout categories: listing, labels, masks and deterministic k-shot sampling.

    CATEGORY/train/good/*                       normal training pool
    CATEGORY/test/good/*, CATEGORY/test/<defect>/*
    CATEGORY/ground_truth/<defect>/<stem>_mask.png   optional
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imageio import ImageReadError, is_image_name, read_image, read_mask


@dataclass(frozen=True)
class Sample:
    """One image of a category: its path, label (0 good, 1 defect), defect type and mask path."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None

    def image(self) -> np.ndarray:
        return read_image(self.path)

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Bool mask of the image's size; all zero for good images without a mask file."""
        if self.mask_path is None:
            return np.zeros(shape, dtype=bool)
        mask = read_mask(self.mask_path)
        if mask.shape != shape:
            raise ImageReadError(f"{self.mask_path}: mask is {mask.shape[::-1]} but image is {shape[::-1]}")
        return mask


class CategoryError(ValueError):
    """A folder that does not follow the MVTec layout, or is missing a required mask."""


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p.name))


@dataclass
class Category:
    """An MVTec-layout category folder."""

    root: Path
    train: list[Sample]
    test: list[Sample]

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def has_masks(self) -> bool:
        return (self.root / "ground_truth").is_dir()

    def sample_k_shot(self, k: int, seed: int) -> list[Sample]:
        """k distinct training images chosen by a seeded permutation (same k, seed -> same images;
        the k-shot set for k is a prefix of the one for a larger k)."""
        if not 1 <= k <= len(self.train):
            raise ValueError(f"k={k} but {self.root} has {len(self.train)} training images")
        order = np.random.default_rng(seed).permutation(len(self.train))
        return [self.train[i] for i in order[:k]]


def load_category(root: str | Path) -> Category:
    root = Path(root)
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise CategoryError(f"{root}: no train/good folder (expected the MVTec layout)")
    train = [Sample(p, 0, "good", None) for p in _images(train_dir)]
    if not train:
        raise CategoryError(f"{train_dir}: no images")
    test: list[Sample] = []
    gt_root = root / "ground_truth"
    test_dir = root / "test"
    if test_dir.is_dir():
        for sub in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            label = 0 if sub.name == "good" else 1
            for path in _images(sub):
                mask_path = None
                if gt_root.is_dir():
                    candidate = gt_root / sub.name / f"{path.stem}_mask.png"
                    if candidate.is_file():
                        mask_path = candidate
                    elif label == 1:
                        raise CategoryError(f"{path}: defect image has no mask {candidate}")
                test.append(Sample(path, label, sub.name, mask_path))
    return Category(root, train, test)


def find_all_categories(roots: Iterable[str | Path]) -> list[Path]:
    """Category folders under each of ``roots``, in order; FileNotFoundError when there is none."""
    roots = [Path(root) for root in roots]
    found = [category for root in roots for category in find_categories(root)]
    if not found:
        raise FileNotFoundError(f"no MVTec-layout category under {' '.join(map(str, roots))}")
    return found


def find_categories(root: str | Path) -> list[Path]:
    """Category folders under root (root itself if it is one), sorted."""
    root = Path(root)
    if (root / "train" / "good").is_dir():
        return [root]
    return sorted(p.parent.parent for p in root.glob("**/train/good") if p.is_dir())
