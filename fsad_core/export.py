"""Exporting a detector as ONNX for lines that run without torch (C++, C#, OpenVINO, onnxruntime).

The graph holds what `Detector.score` computes of one prepared view: the network, intensity
standardisation and normalisation, the patch memory and the Gaussians (as constants), the anomaly
map and the Mahalanobis score. What needs an image's own shape (reducing it, cutting its views),
and what is a few lines of arithmetic over the views (the worst view, the fusion, the threshold,
the score unit) is `fsad_core.onnx_runtime`, shipped beside the graph as `fsad_runtime.py`.

An export is written only once onnxruntime has scored the model's own images and defects made on
them as the torch path does: every score within `TOLERANCE` in the score unit, every decision the
same. The check's numbers are kept in `model.json`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import onnx_runtime
from .calibration import Threshold
from .detector import Detector, ScoreResult
from .imageio import WORK_PIXELS
from .negatives import synthesize
from .preprocess import MAX_TILES, prepare, to_tensor
from .provenance import library_versions

FORMATS = ("onnx",)
RUNTIME_FILE = "fsad_runtime.py"
TOLERANCE = 1e-3  # the largest difference from the torch path allowed, in the score unit
OPSET = 18  # antialiased Resize, which the graph's resize to the image branch's side needs


class ExportError(ValueError):
    """An export that cannot be written, with the reason in one line."""


class ViewGraph(nn.Module):
    """One prepared view (1x3xSxS in [0, 1] at the model's work side) to its anomaly map at the
    patch side and, with the image branch, its Mahalanobis score: what the graph computes."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector
        self.net = detector.net  # registered, so the weights are the graph's initialisers

    def forward(self, view: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.detector.features(view)
        amap = self.detector.anomaly_maps(feats)
        if not self.detector.config.image_branch:
            return (amap,)
        return amap, self.detector.scoring.mahalanobis(feats)


@dataclass(frozen=True)
class ExportCheck:
    """How the exported model agreed with the torch path on the images it was checked on."""

    images: int
    flagged_by_torch: int
    max_unit_difference: float
    decisions_identical: bool
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.decisions_identical and self.max_unit_difference <= self.tolerance


class ExportedDetector:
    """An exported folder scored through onnxruntime with `Detector.score`'s answer, for `fsad score
    --runtime onnx`: the same decision records whichever runtime made them (no maps)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.model = onnx_runtime.ExportedModel(folder, threads)
        self.threshold = Threshold.from_dict(self.model.spec["threshold"])

    @property
    def source(self) -> dict:
        """Where the exported model came from (`fsad export`'s --model)."""
        return self.model.spec["model"]

    def score(self, images: list[np.ndarray], with_maps: bool = False) -> ScoreResult:
        if with_maps:
            raise ValueError("the exported model gives decisions, not maps: draw maps with the torch runtime")
        scored = [self.model.components(image) for image in images]
        components = {name: np.array([s[name] for s in scored]) for name in scored[0]}
        return ScoreResult.of(components, self.model.spec["score"], self.threshold)


def check_images(images: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """The images, and one synthetic defect on each, so that the check meets both decisions."""
    rng = np.random.default_rng(seed)
    defects = [synthesize(rng, to_tensor(image))[0] for image in images]
    return images + [(d.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8) for d in defects]


def check_out(out: str | Path) -> Path:
    """The folder an export may be written to: absent or empty, so that nothing is overwritten."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose another --out")
    return out


def export_onnx(detector: Detector, out: str | Path, images: list[np.ndarray], source: dict) -> ExportCheck:
    """Write the export into ``out`` (absent or empty) once it passes the check on ``images`` (the
    model's own, with a defect made on each); ExportError, and nothing written, when it does not."""
    out = check_out(out)
    if not images:
        raise ExportError("no images to check the export on")
    if detector.device.type != "cpu":
        raise ExportError("export a model loaded on the CPU (device='cpu'): the graph is traced there")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        check = _write_checked(detector, folder, images, source)
        if out.exists():
            out.rmdir()
        folder.rename(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return check


def _write_checked(detector: Detector, folder: Path, images: list[np.ndarray], source: dict) -> ExportCheck:
    """The graph, its spec and the runtime module written into ``folder``, and checked there."""
    _write_graph(detector, folder / onnx_runtime.GRAPH_FILE)
    spec = _spec(detector, source)
    (folder / onnx_runtime.SPEC_FILE).write_text(json.dumps(spec, indent=2))
    shutil.copyfile(onnx_runtime.__file__, folder / RUNTIME_FILE)
    check = compare(detector, onnx_runtime.ExportedModel(folder), check_images(images))
    if not check.passed:
        raise ExportError(f"the exported model disagrees with torch on {check.images} check images (largest "
                          f"difference {check.max_unit_difference:.2g} in the score unit, decisions identical: "
                          f"{check.decisions_identical}); nothing written")
    (folder / onnx_runtime.SPEC_FILE).write_text(json.dumps({**spec, "check": asdict(check)}, indent=2))
    return check


def compare(detector: Detector, exported: onnx_runtime.ExportedModel, images: list[np.ndarray]) -> ExportCheck:
    """The torch path against the exported one on the same images."""
    torch_result = detector.score(images)
    onnx_result = [exported.score(image) for image in images]
    difference = np.abs(torch_result.scores - np.array([r.score for r in onnx_result]))
    same = bool((torch_result.is_anomaly == np.array([r.is_anomaly for r in onnx_result])).all())
    return ExportCheck(len(images), int(torch_result.is_anomaly.sum()), float(difference.max()), same)


def _write_graph(detector: Detector, path: Path) -> None:
    graph = ViewGraph(detector).eval()
    view = prepare(np.zeros((64, 64, 3), np.uint8), detector.input_spec)[:1].contiguous()
    outputs = ["map"] + (["mahalanobis"] if detector.config.image_branch else [])
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's step-by-step lines
        program = torch.onnx.export(graph, (view,), input_names=["view"], output_names=outputs, dynamo=True,
                                    opset_version=OPSET, verbose=False)
    program.save(str(path))


def _spec(detector: Detector, source: dict) -> dict:
    """What `onnx_runtime` needs beside the graph, and where the model came from."""
    config = detector.config
    return {
        "format": "fsad-onnx", "format_version": 1, "library": library_versions(), "model": source,
        "score": config.score,
        "input": "view", "outputs": ["map"] + (["mahalanobis"] if config.image_branch else []),
        "side": config.work_side, "patch_side": config.patch_side, "resize": config.resize,
        "max_tiles": MAX_TILES, "work_pixels": WORK_PIXELS,
        "fusion": {name: list(value) for name, value in detector.fusion.items()},
        "threshold": detector.threshold.to_dict(), "meta": detector.meta,
    }
