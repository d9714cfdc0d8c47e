"""A fit's progress: lines with the time a stage has left, and no long silence, on an injected clock
that charges each piece of work what it would cost on one slow CPU thread."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import fsad_core.fitting as fitting
from fsad_core.data import load_category
from fsad_core.detector import Detector
from fsad_core.finetune import FinetuneConfig
from fsad_core.methods import method_config
from fsad_core.network import Network
from fsad_core.patch_memory import PatchMemory
from fsad_core.progress import ProgressLine
from fsad_core.scoring import Scoring
from fsad_core.synthetic import make_category

SILENCE_S = 10.0
# Seconds each piece of work is charged: a view through the network's prefix or suffix, a view
# scored against the memory, a patch of a coreset, an augmented or synthesized view.
COST = {"prefix": 1.0, "suffix": 0.5, "scored": 0.3, "patch": 0.002, "augmented": 0.05, "synthesized": 0.2}


def test_a_line_says_what_the_stage_has_left_at_most_every_few_seconds():
    now, lines = [0.0], []
    line = ProgressLine(lines.append, "fit", every_s=5, clock=lambda: now[0])
    for t, done in ((0, 1), (2, 2), (6, 3), (7, 4)):
        now[0] = t
        line("views", done, 4)
    now[0] = 7.5
    line("backbone", 2, 10)
    now[0] = 9
    line("backbone", 10, 10)
    line("backbone", 2, 10)  # the stage again, for the other input side: a new start
    assert lines == ["fit: views 1/4", "fit: views 3/4, about 2 s left", "fit: views 4/4", "fit: backbone 2/10",
                     "fit: backbone 10/10", "fit: backbone 2/10"]


@pytest.fixture(scope="module")
def normals(tmp_path_factory) -> list[np.ndarray]:
    root = make_category(tmp_path_factory.mktemp("d") / "washer", kind="object", n_train=4, n_test_good=1,
                         n_test_defect=1, size=96, seed=3)
    return [s.image() for s in load_category(root).sample_k_shot(4, 0)]


def test_a_fit_is_never_silent_for_long_on_a_slow_thread(normals, monkeypatch):
    now = [0.0]

    def charged(name: str, original, cost):
        def run(*args, **kwargs):
            now[0] += cost(*args, **kwargs)
            return original(*args, **kwargs)
        return run

    monkeypatch.setattr(Network, "forward_prefix", charged("prefix", Network.forward_prefix,
                                                           lambda self, x: COST["prefix"] * len(x)))
    monkeypatch.setattr(Network, "forward_suffix", charged("suffix", Network.forward_suffix,
                                                           lambda self, h, *a: COST["suffix"] * len(h)))
    monkeypatch.setattr(Scoring, "components", charged("scored", Scoring.components,
                                                       lambda self, feats, *a: COST["scored"] * len(feats.patches)))
    fit = PatchMemory.fit.__func__
    monkeypatch.setattr(PatchMemory, "fit", classmethod(charged(
        "patch", fit, lambda cls, features, *a: COST["patch"] * features.shape[0] * np.prod(features.shape[2:]))))
    monkeypatch.setattr(fitting, "augment_views", charged("augmented", fitting.augment_views,
                                                          lambda base, n, *a, **k: COST["augmented"] * n))
    monkeypatch.setattr(fitting, "synthesize", charged("synthesized", fitting.synthesize,
                                                       lambda *a, **k: COST["synthesized"]))
    reported: list[tuple[float, str]] = []
    line = ProgressLine(lambda text: reported.append((now[0], text)), every_s=0, clock=lambda: now[0])
    config = replace(method_config("default", seed=0), size=96, patch_size=None, pool_views=32, negatives=8,
                     calibration_negatives=8, memory_views=2,
                     finetune=FinetuneConfig(steps=4, normals_per_batch=8, negatives_per_batch=4))
    Detector.fit(normals, config, device="cpu", progress=line)
    times = [0.0, *(t for t, _ in reported), now[0]]
    gaps = np.diff(times)
    worst = int(np.argmax(gaps))
    assert gaps.max() <= SILENCE_S, (f"{gaps.max():.1f} s of silence before "
                                     f"{reported[worst][1] if worst < len(reported) else 'the end'}")
    assert {text.split()[0] for _, text in reported} >= {"views", "backbone", "fine-tune", "features", "memory",
                                                        "held-out", "calibrate"}
    assert now[0] > 5 * SILENCE_S  # the fit as charged is long enough to be silent were it not for the reports
