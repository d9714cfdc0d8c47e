"""The simulated line's split: stable under a seed, disjoint, stratified, frames of one part on one
side, and the stream at the defect share."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsad_core.data import load_category
from fsad_core.line import frame_group, part_groups, split_line
from fsad_core.synthetic import make_category


def test_frames_of_one_part_share_a_group_and_numbered_names_are_their_own():
    assert frame_group(Path("good/part7_f01.png")) == frame_group(Path("good/part7_f02.png")) == "good/part7_f"
    assert frame_group(Path("good/000.png")) != frame_group(Path("good/001.png"))


def test_the_split_is_stable_disjoint_stratified_and_keeps_frames_together(tmp_path):
    root = make_category(tmp_path / "washer", kind="object", n_train=30, n_test_good=12, n_test_defect=24, size=48)
    for i in range(3):  # three frames of one good part
        Image.new("RGB", (48, 48), (i, i, i)).save(root / "test" / "good" / f"part9_f{i}.png")
    category = load_category(root)
    split = split_line(category, 4, seed=3, defect_share=0.2)
    again = split_line(category, 4, seed=3, defect_share=0.2)
    assert [s.path for s in split.stream] == [s.path for s in again.stream]
    sides = [{s.path for s in side} for side in (split.upload, split.held_out, split.stream)]
    assert sum(map(len, sides)) == len(category.train) + len(category.test) and not (sides[0] & sides[1]) \
        and not (sides[1] & sides[2]) and not (sides[0] & sides[2])
    assert all(s.label == 0 for s in split.upload) and len(split.upload) == 4
    held_defects = sum(s.label for s in split.held_out)
    goods = 30 - 4 + 12 + 3  # the held-out third of them, or up to two more (a group of three frames)
    assert held_defects == round(24 / 3) and len(split.held_out) - held_defects in range(round(goods / 3),
                                                                                       round(goods / 3) + 3)
    frames = {frame_group(s.path) for s in split.held_out} & {frame_group(s.path) for s in split.stream}
    assert not [g for g in frames if g.endswith("part9_f")]
    first = split.stream[:40]  # while both kinds last, about the share asked for
    assert 0.05 < np.mean([s.label for s in first]) < 0.4
    assert split_line(category, 4, seed=4).held_out != split.held_out


def _frames(folder: Path, first: int, parts: int, frames: int, seed: int) -> list[list[Path]]:
    """``parts`` parts of ``frames`` numbered frames each (``first``, ``first + 1``, ...): one picture of
    a part, shifted by a little noise from frame to frame, as a camera on a line sees it."""
    rng = np.random.default_rng(seed)
    written, number = [], first
    for _ in range(parts):
        part = rng.integers(0, 255, (48, 48, 3))
        written.append([])
        for _ in range(frames):
            path = folder / f"{number:03d}.png"
            Image.fromarray(np.clip(part + rng.normal(0, 4, part.shape), 0, 255).astype(np.uint8)).save(path)
            written[-1].append(path)
            number += 1
    return written


def test_numbered_frames_of_one_part_stay_on_one_side_and_beside_the_upload_are_never_held_out(tmp_path):
    root = make_category(tmp_path / "spindle", kind="object", n_train=0, n_test_good=0, n_test_defect=12, size=48)
    train = _frames(root / "train" / "good", 0, parts=8, frames=3, seed=1)
    tested = _frames(root / "test" / "good", 100, parts=6, frames=4, seed=2)
    category = load_category(root)
    grouped = [[s.path for s in g] for g in part_groups(category.train + category.test) if len(g) > 1]
    assert sorted(grouped) == sorted(train + tested)  # each part a group, and nothing else joined
    for seed in range(4):
        split = split_line(category, 2, seed=seed, defect_share=0.2)
        held_out = {s.path for s in split.held_out}
        assert all(set(part) <= held_out or not set(part) & held_out for part in tested)
        uploaded = {s.path for s in split.upload}
        assert not {p for part in train if set(part) & uploaded for p in part} & held_out


def test_frames_of_one_part_are_one_group_whatever_sorts_between_them(tmp_path):
    root = make_category(tmp_path / "cam", kind="object", n_train=4, n_test_good=0, n_test_defect=6, size=48)
    _frames(root / "test" / "good", 200, parts=1, frames=1, seed=3)  # other parts, so the folder has a typical distance
    for name, seed in (("part3_f1", 4), ("part3_f1b", 5), ("part3_f2", 6), ("other", 7)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3)).astype(np.uint8)).save(
            root / "test" / "good" / f"{name}.png")
    category = load_category(root)
    groups = [sorted(s.path.stem for s in g) for g in part_groups([s for s in category.test if s.label == 0])]
    assert ["part3_f1", "part3_f2"] in groups and ["part3_f1b"] in groups


def test_a_category_whose_normal_parts_are_all_in_the_upload_is_refused(tmp_path):
    root = make_category(tmp_path / "two", kind="object", n_train=0, n_test_good=0, n_test_defect=6, size=48)
    _frames(root / "train" / "good", 0, parts=2, frames=4, seed=1)
    with pytest.raises(ValueError, match="no normal image is left for the held-out truth"):
        split_line(load_category(root), 5, seed=0)  # five of eight frames: a frame of each part
