"""The anomaly detector: fit on k normal images (`fsad_core.fitting` holds the stages), score
images, save and load as a model folder (its configuration is `fsad_core.config`).

Scores (higher = more anomalous):
- `mahalanobis`: sum over levels of the Mahalanobis distance of the pooled embedding, each level
  divided by its mean distance on the normal views, so levels count alike;
- `patch`: maximum of the anomaly map (nearest-neighbour patch distance, upsampled, smoothed);
- `fused` and `either`: the two combined in common units (`fsad_core.fusion`).

The two branches may see different input sides (`size` for the pooled embeddings, `patch_size`
for the patch memory): small defects on a large part resolve better on a finer patch grid, while
the pooled embedding works best near the scale the backbone was trained at.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .backbone import create_backbone
from .calibration import Threshold
from .config import DetectorConfig
from .devices import resolve_device
from .features import Extractor, Features, build_network
from .fitting import (
    FitReport,
    Normals,
    adapted_features,
    calibrate,
    held_out_folds,
    held_out_scores,
    view_pool,
)
from .fusion import with_combined
from .gaussian import Gaussian
from .imageio import array_at_work_size, checked_array
from .network import Network
from .patch_memory import PatchMemory
from .preprocess import is_grey, map_to_image, prepare, resolve_intensity
from .progress import Progress, report
from .provenance import cpu_description, library_versions
from .scoring import Scoring, joined, worst_tile
from .units import AT_THRESHOLD, to_unit

FORMAT_VERSION = 1
CONFIG_FILE, NETWORK_FILE, SCORING_FILE = "config.json", "network.safetensors", "scoring.safetensors"
MODEL_FILES = (CONFIG_FILE, NETWORK_FILE, SCORING_FILE)  # a model folder: JSON and safetensors, nothing else


@dataclass
class ScoreResult:
    """What `Detector.score` found, one entry per image in the order given.

    scores         in the score unit (`fsad_core.units`): 0.5 is the threshold, higher is more anomalous
    is_anomaly     scores above ``threshold``
    threshold      0.5, the model's threshold in the unit
    raw_scores     the model's own score (its configured kind), for experts
    raw_threshold  the model's own threshold, in the unit of ``raw_scores``
    components     every score kind by name (patch, mahalanobis, combined, ...), the model's own
    maps           HxW anomaly maps at each image's size as read (see WORK_PIXELS), when asked for
    """

    scores: np.ndarray
    is_anomaly: np.ndarray
    threshold: float
    raw_scores: np.ndarray
    raw_threshold: float
    components: dict[str, np.ndarray]
    maps: list[np.ndarray] | None = None

    @classmethod
    def of(cls, components: dict[str, np.ndarray], kind: str, threshold: Threshold,
           maps: list[np.ndarray] | None = None) -> ScoreResult:
        """The result from every component's scores, the model's score kind and its threshold."""
        raw = components[kind]
        return cls(to_unit(raw, threshold.value), threshold.is_anomaly(raw), AT_THRESHOLD, raw, threshold.value,
                   components, maps)


class Detector:
    """A fitted model of one product: the network, the scoring fitted on its normal images, the
    fusion statistics of the combined scores and the calibrated threshold."""

    def __init__(self, config: DetectorConfig, net: Network, scoring: Scoring, fusion: dict[str, tuple[float, float]],
                 threshold: Threshold, meta: dict | None = None, device: torch.device | None = None):
        self.config = config
        self.net = net.eval()
        self.scoring = scoring
        self.fusion = fusion
        self.threshold = threshold
        self.meta = meta or {}
        self.device = device or torch.device("cpu")
        self.input_spec = config.input_spec(config.work_side)
        self.map_spec = config.input_spec(config.patch_side)
        self._extractor = Extractor(self.net, config, self.input_spec, self.device)

    # ----------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, images: list[np.ndarray], config: DetectorConfig = DetectorConfig(), device: str = "auto",
            progress: Progress | None = None, defects: Sequence[np.ndarray] = ()) -> tuple[Detector, FitReport]:
        """Fit on k >= 1 normal images (HxWx3 uint8, any sizes), the stages of `fsad_core.fitting` in
        order; confirmed ``defects``, where given, are negatives of the contrastive fine-tuning."""
        if not images:
            raise ValueError("need at least one normal image")
        images = [checked_array(image, i) for i, image in enumerate(images)]
        start = time.perf_counter()
        dev = resolve_device(device)
        config = replace(config, intensity=resolve_intensity(config.intensity, images))
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        input_spec = config.input_spec(config.work_side)
        net = build_network(config, create_backbone(config.backbone, config.weights)).to(dev).eval()
        extractor = Extractor(net, config, input_spec, dev)
        pool = view_pool(images, config, input_spec, progress)
        defects = [checked_array(image, i) for i, image in enumerate(defects)]
        features, history = adapted_features(extractor, pool, rng, progress, defects)
        normals = Normals.of(features, pool, config, progress)
        folds = held_out_folds(pool)
        normal, synthetic = held_out_scores(extractor, normals, pool, folds, rng, progress)
        report(progress, "calibrate", 1, 1)
        calibration = calibrate(normal, synthetic, config, pool.n_images, folds.rule)
        meta = {"k": pool.n_images, "tiles": pool.n_tiles, "defects": len(defects) if config.finetune else 0,
                "fitted_on": cpu_description(),
                "colour": not all(is_grey(image) for image in images),
                **({"fusion_rule": calibration.fusion_rule} if config.image_branch else {})}
        detector = cls(config, net, normals.scoring_on(torch.ones(len(pool.views), dtype=torch.bool)),
                       calibration.fusion, calibration.threshold, meta, device=dev)
        return detector, calibration.report(history, folds.rule, time.perf_counter() - start)

    def with_threshold(self, threshold: Threshold) -> Detector:
        """The same model deciding at another threshold (a labelled set's, say)."""
        return type(self)(self.config, self.net, self.scoring, self.fusion, threshold, self.meta, self.device)

    # ----------------------------------------------------------------------------- scoring
    def features(self, views: torch.Tensor) -> Features:
        """Prepared views (Nx3xSxS in [0, 1] at the work side, `prepare`) to what the scorers need."""
        return self._extractor.features(views)

    def anomaly_maps(self, feats: Features) -> torch.Tensor:
        """BxSxS maps at the patch branch's input side (`Scoring.anomaly_maps`)."""
        return self.scoring.anomaly_maps(feats, self.config)

    def map_anchor(self, threshold: float | None = None) -> float:
        """The anomaly-map level at which a part reaches the threshold (the model's, or the one given)
        through its patch component: the threshold itself for the patch score; for the combined
        scores the patch level standardised to the threshold (a part whose pooled features are at
        the normal mean is then flagged); for the Mahalanobis score, which maps do not decide, three
        leave-one-out spreads above the normal mean. Overlays share a colour scale around it."""
        value = self.threshold.value if threshold is None else threshold
        if self.config.score == "patch":
            return value
        centre, spread = self.fusion["patch"]
        return centre + (3.0 if self.config.score == "mahalanobis" else value) * spread

    @torch.no_grad()
    def score(self, images: list[np.ndarray], with_maps: bool = False, batch: int = 16,
              progress: Progress | None = None) -> ScoreResult:
        """Score images in batches; in tile mode each score is the worst tile's. An image above
        `WORK_PIXELS` is scored as `read_image` would have read it, and its map is of that size."""
        if not images:
            raise ValueError("no images to score")
        images = [checked_array(image, i) for i, image in enumerate(images)]
        self._warn_if_grey_for_colour(images)
        parts: list[dict[str, np.ndarray]] = []
        maps: list[np.ndarray] = []
        for first in range(0, len(images), batch):
            chunk = [array_at_work_size(img) for img in images[first:first + batch]]
            views = [prepare(img, self.input_spec) for img in chunk]
            feats = self.features(torch.cat(views))
            amap = self.anomaly_maps(feats)
            part_of_view = torch.cat([torch.full((v.shape[0],), i) for i, v in enumerate(views)])
            parts.append(worst_tile(self.scoring.components(feats, self.config, amap), part_of_view))
            if with_maps:
                offsets = np.cumsum([0] + [v.shape[0] for v in views])
                maps += [map_to_image(amap[start:stop], img.shape[0], img.shape[1], self.map_spec)
                         for img, start, stop in zip(chunk, offsets[:-1], offsets[1:])]
            report(progress, "score", min(first + batch, len(images)), len(images))
        arrays = with_combined(joined(parts), self.fusion)
        if not np.isfinite(arrays[self.config.score]).all():
            raise FloatingPointError("non-finite anomaly scores")
        return ScoreResult.of(arrays, self.config.score, self.threshold, maps if with_maps else None)

    def _warn_if_grey_for_colour(self, images: list[np.ndarray]) -> None:
        """A grey copy of a colour product's part scores as a changed part: say so (models fitted
        before the model kept whether it was colour say nothing)."""
        if self.meta.get("colour"):
            grey = [i for i, image in enumerate(images) if is_grey(image)]
            if grey:
                warnings.warn(f"image(s) {', '.join(map(str, grey[:10]))}: grey, but the model was fitted on colour "
                              f"images of the product; a grey copy scores as a changed part", stacklevel=3)

    # ----------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path, extra_config: dict | None = None) -> Path:
        """config.json + network.safetensors + scoring.safetensors; no pickle anywhere."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        net_state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(net_state, str(folder / NETWORK_FILE))
        scoring = {"level_scale": self.scoring.level_scale, "memory": self.scoring.memory.bank.contiguous()}
        for i, g in enumerate(self.scoring.gaussians):
            scoring.update(g.state(f"gaussian.{i}"))
        save_file({k: v.contiguous() for k, v in scoring.items()}, str(folder / SCORING_FILE))
        config = {
            "format_version": FORMAT_VERSION,
            "library": library_versions(),
            "detector": self.config.to_dict(),
            "normalisation": {"mean": list(self.input_spec.mean), "std": list(self.input_spec.std)},
            "levels": len(self.scoring.gaussians),
            "fusion": {k: list(v) for k, v in self.fusion.items()},
            "threshold": self.threshold.to_dict(),
            "meta": self.meta,
            **(extra_config or {}),
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> Detector:
        """Load a model folder; only JSON and safetensors are read (never pickle)."""
        folder = Path(folder)
        cfg_path = folder / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
        config_json = json.loads(cfg_path.read_text())
        if config_json.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: unsupported model format {config_json.get('format_version')}")
        if not config_json.get("threshold"):
            raise ValueError(f"{folder}: the model has no threshold")
        config = DetectorConfig.from_dict(config_json["detector"])
        net = build_network(config, create_backbone(config.backbone, pretrained=False))
        net.load_state_dict(load_file(str(folder / NETWORK_FILE)), strict=True)
        tensors = load_file(str(folder / SCORING_FILE))
        gaussians = [Gaussian.from_state(tensors, f"gaussian.{i}") for i in range(config_json["levels"])]
        fusion = {k: (float(v[0]), float(v[1])) for k, v in config_json["fusion"].items()}
        dev = resolve_device(device)
        fitted = Scoring(gaussians, tensors["level_scale"].double(), PatchMemory(tensors["memory"]))
        return cls(config, net.to(dev), fitted, fusion, Threshold.from_dict(config_json["threshold"]),
                   meta=config_json.get("meta", {}), device=dev)
