"""The anomaly detector: fit on k normal images, score images, save and load as a model folder.

Fit = prepare inputs -> pool of augmented views and synthetic negatives -> frozen prefix once ->
optional contrastive fine-tuning -> per-level Gaussians (Mahalanobis) and a patch memory ->
leave-one-out normal scores and synthetic-anomaly scores -> fusion statistics and threshold.

Scores (higher = more anomalous):
- `mahalanobis`: sum over levels of the Mahalanobis distance of the pooled embedding, each level
  divided by its mean distance on the normal views, so levels count alike;
- `patch`: maximum of the anomaly map (nearest-neighbour patch distance, upsampled, smoothed);
- `fused`: z(mahalanobis) + z(patch), each standardised by its leave-one-out normal scores. With
  one image there is no part-to-part spread to standardise by: the held-out views measure only
  augmentation noise, which fine-tuning removes on purpose (on ELPV their Mahalanobis spread was a
  fifth of the normal test images'), so z-scores would hand the fusion to that component. At k = 1
  each component is instead put in units of the gap from the normal views to the median synthetic
  anomaly: 0 = the normal image, 1 = a typical synthetic defect, for both components alike;
- `either`: max(z(mahalanobis), z(patch)) in the same units: a part is as anomalous as the branch
  that finds it most so. A sum hands half the say to a branch that sees little on a product; the
  larger of the two lets the weaker branch add only where it stands out.

The two branches may see different input sides (`size` for the pooled embeddings, `patch_size`
for the patch memory): small defects on a large part resolve better on a finer patch grid, while
the pooled embedding works best near the scale the backbone was trained at.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .augment import AugmentConfig, augment_views
from .backbone import create_backbone, get_spec
from .calibration import Threshold, calibrate_unsupervised, check_false_alarm_target
from .finetune import FinetuneConfig, TrainingHistory, finetune
from .gaussian import Gaussian
from .losses import LossWeights
from .negatives import NEGATIVE_KINDS, synthesize
from .network import Network, check_pooling
from .options import SCORE_KINDS
from .patch_memory import PatchMemory, group_coresets, patch_features, smooth_and_upsample
from .preprocess import (
    DEFAULT_RESIZE_MODE,
    InputSpec,
    check_intensity_policy,
    map_to_image,
    normalise,
    prepare,
    resolve_intensity,
)
from .provenance import cpu_description, library_versions

FORMAT_VERSION = 1
CONFIG_FILE, NETWORK_FILE, SCORING_FILE = "config.json", "network.safetensors", "scoring.safetensors"
MODEL_FILES = (CONFIG_FILE, NETWORK_FILE, SCORING_FILE)  # a model folder: JSON and safetensors, nothing else
MAX_FOLDS = 8  # held-out folds of the normal images for calibration (one image each up to k = 8)
COMBINED = ("fused", "either")  # scores made of the two components
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DetectorConfig:
    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = None
    size: int = 224
    resize: str = DEFAULT_RESIZE_MODE  # preprocess.RESIZE_MODES
    intensity: str = "auto"       # preprocess.INTENSITY_POLICIES; a fitted model holds the mode `auto` chose
    patch_size: int | None = 320  # input side of the patch branch (None: `size`); see the module docstring
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    split: int = 4
    patch_blocks: tuple[int, ...] = (2, 4)
    first_level: int = 4          # pooled outputs of blocks >= this (and the head) get a Gaussian each
    pooling: str = "mean+std+max" # statistics over positions of each pooled level (network.POOLINGS)
    pool_views: int = 64          # augmented views in the pool, spread over the k images (>= 8 each)
    negatives: int = 48           # synthetic anomalies in the pool
    negative_kinds: tuple[str, ...] = NEGATIVE_KINDS
    calibration_negatives: int = 32  # synthetic anomalies scored to calibrate the threshold
    memory_views: int = 3         # views per image in the patch memory (the original first)
    memory_max: int = 10000
    coreset_candidates: int = 40000  # random subsample of patches the coreset is chosen from (0: all of them)
    map_sigma: float = 4.0        # blur of the anomaly map, pixels at 224 (scaled with the patch side); 0: none
    score: str = "fused"
    target_false_alarm_rate: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.score not in SCORE_KINDS:
            raise ValueError(f"score {self.score!r}: one of {SCORE_KINDS}")
        check_pooling(self.pooling)  # here too, so a bad override fails before any fit
        check_false_alarm_target(self.target_false_alarm_rate)  # here too, before any fit
        check_intensity_policy(self.intensity)  # here too, before any fit
        InputSpec(self.size, self.resize)  # validates size and mode
        InputSpec(self.patch_side, self.resize)
        sigma = self.map_sigma
        if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and 0 <= sigma < 64):
            raise ValueError(f"map_sigma {sigma!r}: a blur in pixels from 0 (none) to below 64")
        candidates = self.coreset_candidates
        if isinstance(candidates, bool) or not isinstance(candidates, int) or 0 != candidates < self.memory_max:
            raise ValueError(f"coreset_candidates {candidates!r}: 0 (all patches) or a whole number of at least "
                             f"memory_max ({self.memory_max}), the number of patches the coreset keeps")

    @property
    def patch_side(self) -> int:
        return self.patch_size or self.size

    @property
    def image_branch(self) -> bool:
        """Whether scoring needs the pooled embeddings and their Gaussians: not for the patch score,
        which then takes one backbone pass an image, up to the last patch block."""
        return self.score != "patch"

    @property
    def work_size(self) -> int:
        """The side images are prepared, augmented and given defects at: the larger of the two."""
        return max(self.size, self.patch_side)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        d["finetune"] = self.finetune.to_dict() if self.finetune else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        d = dict(d)
        d.setdefault("intensity", "raw")  # models saved before the policy existed were fitted on raw levels
        d.setdefault("patch_size", None)  # and before the patch branch had its own side, on one side
        if d.get("coreset_candidates") is None:  # saved before the candidate cap, or without one: all patches
            d["coreset_candidates"] = 0
        d["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["augment"].items()})
        if d.get("finetune"):
            ft = dict(d["finetune"])
            ft["loss"] = LossWeights(**ft["loss"])
            d["finetune"] = FinetuneConfig(**ft)
        d["patch_blocks"] = tuple(d["patch_blocks"])
        d["negative_kinds"] = tuple(d["negative_kinds"])
        return cls(**d)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


@dataclass
class ScoreResult:
    scores: np.ndarray                       # the configured score, one per image
    components: dict[str, np.ndarray]        # every score kind, one per image
    maps: list[np.ndarray] | None = None     # HxW anomaly maps at each image's own size
    is_anomaly: np.ndarray | None = None


@dataclass
class FitReport:
    history: TrainingHistory | None
    normal_scores: dict[str, list[float]]
    synthetic_scores: dict[str, list[float]]
    normal_rule: str
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["history"] = self.history.to_dict() if self.history else None
        return d


class Detector:
    def __init__(self, config: DetectorConfig, net: Network, gaussians: list[Gaussian], level_scale: torch.Tensor,
                 memory: PatchMemory, fusion: dict[str, tuple[float, float]], threshold: Threshold | None,
                 meta: dict | None = None, device: torch.device | None = None):
        self.config = config
        self.net = net.eval()
        self.gaussians = gaussians
        self.level_scale = level_scale.double()
        self.memory = memory
        self.fusion = fusion
        self.threshold = threshold
        self.meta = meta or {}
        self.device = device or torch.device("cpu")
        spec = get_spec(config.backbone)
        self.input_spec = InputSpec(config.work_size, config.resize, spec.mean, spec.std, config.intensity)
        self.map_spec = InputSpec(config.patch_side, config.resize, spec.mean, spec.std, config.intensity)

    # ----------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, images: list[np.ndarray], config: DetectorConfig = DetectorConfig(), device: str = "auto",
            progress: Progress | None = None) -> tuple[Detector, FitReport]:
        """Fit on k >= 1 normal images (HxWx3 uint8, any sizes)."""
        if not images:
            raise ValueError("need at least one normal image")
        start = time.perf_counter()
        dev = resolve_device(device)
        config = replace(config, intensity=resolve_intensity(config.intensity, images))
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        spec = get_spec(config.backbone)
        input_spec = InputSpec(config.work_size, config.resize, spec.mean, spec.std, config.intensity)
        net = _network(config, create_backbone(config.backbone, config.weights)).to(dev).eval()

        # Views are drawn per tile; fine-tuning and calibration group a part's tiles (image_of_view).
        tiles = [prepare(img, input_spec) for img in images]
        bases = [t for image_tiles in tiles for t in image_tiles]
        image_of_base = torch.cat([torch.full((len(t),), i) for i, t in enumerate(tiles)])
        k, n_images = len(bases), len(images)
        per_image = max(8, math.ceil(config.pool_views / k))
        views = torch.cat([torch.cat([base[None], augment_views(base, per_image - 1, config.augment,
                                                                generator_seed=config.seed * 1000 + i)])
                           for i, base in enumerate(bases)])
        source = torch.arange(k).repeat_interleave(per_image)
        image_of_view = image_of_base[source]
        view_in_image = torch.arange(per_image).repeat(k)

        def synthesize_from(indices: np.ndarray) -> torch.Tensor:
            return torch.stack([synthesize(rng, views[int(j)], config.negative_kinds,
                                           source=views[int(rng.integers(len(views)))])[0] for j in indices])

        if progress:
            progress("features", 0, 1)
        normal_pre = _Prefixes.of(net, views, config, input_spec, dev,
                                  config.image_branch or config.finetune is not None)
        history = None
        if config.finetune is not None:
            negatives = synthesize_from(rng.integers(len(views), size=config.negatives))
            neg_h = _prefix(net, _resized(negatives, config.size), input_spec, dev).h
            report = (lambda step, total, loss: progress("fine-tune", step, total)) if progress else None
            # Tiles of one part are views of one instance: the instance term must not learn to tell
            # them apart, and the cross-instance term pairs different parts.
            history = finetune(net, normal_pre.image.h, image_of_view, neg_h, config.finetune, config.seed, dev,
                               report)
        net.eval()
        normal = normal_pre.features(net, dev, config.image_branch)
        in_memory = view_in_image < config.memory_views
        # One coreset per image (per half of the views with one image), so every fold's memory is
        # the union of the coresets of the images it keeps (patch_memory.group_coresets).
        unit_of_view = image_of_view if n_images >= 2 else (view_in_image >= per_image // 2).long()
        banks = group_coresets(normal.patches[in_memory], unit_of_view[in_memory], config.memory_max, config.seed,
                               config.coreset_candidates or None)

        def fit_scoring(keep: torch.Tensor) -> Detector:
            gaussians = [Gaussian.fit(level[keep]) for level in normal.pooled]
            scale = torch.tensor([float(g.distance(level[keep]).mean()) for g, level in zip(gaussians, normal.pooled)],
                                 dtype=torch.float64)
            kept_units = unit_of_view[keep & in_memory].unique().tolist()
            memory = PatchMemory.union([banks[u] for u in kept_units])
            return cls(config, net, gaussians, scale, memory, {}, None, device=dev)

        # Leave-one-out scores of the normals, and of synthetic anomalies made from the left-out
        # image, so both come from a model that never saw that image (nor any tile of it: tiles of
        # one part look alike, and leaving out one tile at a time would understate the spread
        # between parts); a held-out part scores as its worst tile, as in `score`. With one image:
        # held-out augmented views instead (the first half of the views fits, the second half is
        # scored; each view index across the tiles stands for one part).
        # Beyond MAX_FOLDS images, images share folds (image i in fold i mod MAX_FOLDS): each is still
        # scored by a model that never saw it, and the fit's cost stops growing with k squared (a
        # greedy coreset per fold over the patches of all the fold's other images).
        if n_images >= 2:
            n_folds = min(n_images, MAX_FOLDS)
            rule = ("leave-one-out over the k normal images" if n_folds == n_images else
                    f"{n_folds}-fold held-out scores of the k normal images")
            fold_of_view = image_of_view % n_folds
            folds = [(fold_of_view != i, (fold_of_view == i) & (view_in_image == 0), fold_of_view == i)
                     for i in range(n_folds)]
            part_of_view = image_of_view
        else:
            rule = "held-out augmented views of the single normal image"
            fit_half = view_in_image < per_image // 2
            folds = [(fit_half, ~fit_half, ~fit_half)]
            part_of_view = view_in_image
        cal_per_fold = max(2, config.calibration_negatives // len(folds)) if config.calibration_negatives > 0 else 0
        normal_parts: list[dict[str, np.ndarray]] = []
        synth_parts: list[dict[str, np.ndarray]] = []
        for keep, held, negatives_from in folds:
            fold = fit_scoring(keep)
            normal_parts.append(_worst_tile(fold._components(normal.select(held)), part_of_view[held]))
            if cal_per_fold:
                candidates = torch.nonzero(negatives_from).flatten().numpy()
                picks = rng.choice(candidates, size=cal_per_fold, replace=len(candidates) < cal_per_fold)
                cal = _Prefixes.of(net, synthesize_from(picks), config, input_spec, dev,
                                   config.image_branch).features(net, dev, config.image_branch)
                synth_parts.append(fold._components(cal))

        detector = fit_scoring(torch.ones(len(source), dtype=torch.bool))
        detector.meta = {"k": n_images, "tiles": k, "fitted_on": cpu_description()}
        loo = _concat(normal_parts)
        syn = _concat(synth_parts) if synth_parts else None
        if config.image_branch:
            detector.fusion, detector.meta["fusion_rule"] = _fusion_scales(loo, syn, single_image=n_images == 1)
        normal_scores = detector._with_fused(loo)
        synthetic_scores = detector._with_fused(syn) if syn is not None else {name: [] for name in normal_scores}
        if progress:
            progress("calibrate", 1, 1)
        # With k >= 2 the combined scores are in units of the leave-one-out spreads (`fused_spread_floor`).
        min_spread = fused_spread_floor(loo, detector.fusion, config.score) if config.score in COMBINED and \
            n_images >= 2 else 0.0
        detector.threshold = calibrate_unsupervised(
            np.asarray(normal_scores[config.score]),
            np.asarray(synthetic_scores[config.score]) if syn is not None else None,
            config.target_false_alarm_rate, min_spread=min_spread,
            views_of_one_image=n_images == 1).with_details(normal_rule=rule)
        report = FitReport(history, normal_scores, synthetic_scores, rule, time.perf_counter() - start)
        return detector, report

    # ----------------------------------------------------------------------------- scoring
    def _standardised(self, components: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Each component in the fusion's units (NaN while the fusion statistics are not known)."""
        if not self.fusion:
            nan = np.full(len(components["patch"]), math.nan)
            return nan, nan
        (mm, ms), (pm, ps) = self.fusion["mahalanobis"], self.fusion["patch"]
        return (components["mahalanobis"] - mm) / ms, (components["patch"] - pm) / ps

    def _with_fused(self, components: dict[str, np.ndarray]) -> dict[str, list[float]]:
        """The component scores as lists, with the combined scores added when there are two."""
        arrays = {name: np.asarray(values, dtype=np.float64) for name, values in components.items()}
        lists = {name: values.tolist() for name, values in arrays.items()}
        if "mahalanobis" in arrays:
            z_maha, z_patch = self._standardised(arrays)
            lists["fused"] = (z_maha + z_patch).tolist()
            lists["either"] = np.maximum(z_maha, z_patch).tolist()
        return lists

    def _components(self, feats: Features) -> dict[str, np.ndarray]:
        """Per-view patch scores, and Mahalanobis ones when the detector has the image branch."""
        patch = self.anomaly_maps(feats).flatten(1).amax(dim=1).numpy()
        if not self.config.image_branch:
            return {"patch": patch}
        return {"mahalanobis": _maha(feats.pooled, self.gaussians, self.level_scale), "patch": patch}

    def anomaly_maps(self, feats: Features) -> torch.Tensor:
        """BxSxS maps at the patch branch's input side: nearest-normal-patch distance, upsampled, smoothed."""
        side = self.config.patch_side
        return smooth_and_upsample(self.memory.distances(feats.patches), side, self.config.map_sigma * side / 224)

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
    def score(self, images: list[np.ndarray], with_maps: bool = False, batch: int = 16) -> ScoreResult:
        """Score images in batches; in tile mode each score is the worst tile's."""
        if not images:
            raise ValueError("no images to score")
        branch = self.config.image_branch
        parts: list[dict[str, np.ndarray]] = []
        maps: list[np.ndarray] = []
        for first in range(0, len(images), batch):
            chunk = images[first:first + batch]
            views = [prepare(img, self.input_spec) for img in chunk]
            feats = _Prefixes.of(self.net, torch.cat(views), self.config, self.input_spec, self.device,
                                 branch).features(self.net, self.device, branch)
            amap = self.anomaly_maps(feats)
            per_view = {"patch": amap.flatten(1).amax(dim=1).numpy()}
            if branch:
                per_view["mahalanobis"] = _maha(feats.pooled, self.gaussians, self.level_scale)
            part_of_view = torch.cat([torch.full((v.shape[0],), i) for i, v in enumerate(views)])
            parts.append(_worst_tile(per_view, part_of_view))
            if with_maps:
                offsets = np.cumsum([0] + [v.shape[0] for v in views])
                maps += [map_to_image(amap[start:stop], img.shape[0], img.shape[1], self.map_spec)
                         for img, start, stop in zip(chunk, offsets[:-1], offsets[1:])]
        arrays = {name: np.asarray(values) for name, values in self._with_fused(_concat(parts)).items()}
        scores = arrays[self.config.score]
        if not np.isfinite(scores).all():
            raise FloatingPointError("non-finite anomaly scores")
        is_anomaly = scores > self.threshold.value if self.threshold is not None else None
        return ScoreResult(scores, arrays, maps if with_maps else None, is_anomaly)

    # ----------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path, extra_config: dict | None = None) -> Path:
        """config.json + network.safetensors + scoring.safetensors; no pickle anywhere."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        net_state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(net_state, str(folder / NETWORK_FILE))
        scoring = {"level_scale": self.level_scale, "memory": self.memory.bank.contiguous()}
        for i, g in enumerate(self.gaussians):
            scoring.update(g.state(f"gaussian.{i}"))
        save_file({k: v.contiguous() for k, v in scoring.items()}, str(folder / SCORING_FILE))
        config = {
            "format_version": FORMAT_VERSION,
            "library": library_versions(),
            "detector": self.config.to_dict(),
            "normalisation": {"mean": list(self.input_spec.mean), "std": list(self.input_spec.std)},
            "levels": len(self.gaussians),
            "fusion": {k: list(v) for k, v in self.fusion.items()},
            "threshold": self.threshold.to_dict() if self.threshold else None,
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
        config = DetectorConfig.from_dict(config_json["detector"])
        net = _network(config, create_backbone(config.backbone, pretrained=False))
        net.load_state_dict(load_file(str(folder / NETWORK_FILE)), strict=True)
        scoring = load_file(str(folder / SCORING_FILE))
        gaussians = [Gaussian.from_state(scoring, f"gaussian.{i}") for i in range(config_json["levels"])]
        fusion = {k: (float(v[0]), float(v[1])) for k, v in config_json["fusion"].items()}
        threshold = Threshold.from_dict(config_json["threshold"]) if config_json.get("threshold") else None
        dev = resolve_device(device)
        return cls(config, net.to(dev), gaussians, scoring["level_scale"], PatchMemory(scoring["memory"]), fusion,
                   threshold, meta=config_json.get("meta", {}), device=dev)


@dataclass
class _Prefix:
    """Cached outputs of the frozen prefix for a batch of views."""

    maps: dict[int, torch.Tensor]
    pooled: list[torch.Tensor]
    h: torch.Tensor


@dataclass
class Features:
    """What the scorers need of a batch of views: pooled levels and patch features."""

    pooled: list[torch.Tensor]
    patches: torch.Tensor

    def select(self, mask: torch.Tensor) -> Features:
        return Features([p[mask] for p in self.pooled], self.patches[mask])


def _resized(views: torch.Tensor, side: int) -> torch.Tensor:
    """A batch of prepared views (Nx3xSxS) at another side; the same tensor when it already fits."""
    if views.shape[-1] == side:
        return views
    return torch.nn.functional.interpolate(views, size=(side, side), mode="bilinear", align_corners=False,
                                           antialias=True)


@dataclass
class _Prefixes:
    """Frozen-prefix outputs of a batch of views for the image branch (at `size`) and for the patch
    branch (at `patch_size`); one and the same when the two sides are equal."""

    image: _Prefix | None  # None: the patch branch alone (`DetectorConfig.image_branch`)
    patch: _Prefix

    @classmethod
    def of(cls, net: Network, views: torch.Tensor, config: DetectorConfig, spec: InputSpec,
           device: torch.device, image_branch: bool = True) -> _Prefixes:
        patch = _prefix(net, _resized(views, config.patch_side), spec, device)
        if not image_branch:
            return cls(None, patch)
        if config.patch_side == config.size:
            return cls(patch, patch)
        return cls(_prefix(net, _resized(views, config.size), spec, device), patch)

    def features(self, net: Network, device: torch.device, pooled_levels: bool = True) -> Features:
        """Patch features, and the pooled levels when asked for (which needs the image branch)."""
        if not pooled_levels:
            return _features(net, self.patch, device, pooled_levels=False)
        image = _features(net, self.image, device)
        if self.patch is self.image:
            return image
        return Features(image.pooled, _features(net, self.patch, device, pooled_levels=False).patches)


def _network(config: DetectorConfig, backbone: torch.nn.Module) -> Network:
    return Network(backbone, config.split, config.patch_blocks, config.first_level, config.pooling)


def views_per_forward(device: torch.device) -> int:
    """Views one backbone forward takes at once: on a CPU a few views keep the activations in cache
    (faster fits and scoring and a lower peak than large batches, docs/measurements.md section 20);
    a GPU wants them many."""
    return 64 if device.type == "cuda" else 2


@torch.no_grad()
def _prefix(net: Network, views: torch.Tensor, spec: InputSpec, device: torch.device) -> _Prefix:
    batch = views_per_forward(device)
    parts = []
    for i in range(0, views.shape[0], batch):
        maps, pooled, h = net.forward_prefix(normalise(views[i:i + batch].to(device), spec))
        parts.append(({j: m.cpu() for j, m in maps.items()}, [p.cpu() for p in pooled], h.cpu()))
    return _Prefix({j: torch.cat([p[0][j] for p in parts]) for j in parts[0][0]},
                   [torch.cat([p[1][i] for p in parts]) for i in range(len(parts[0][1]))],
                   torch.cat([p[2] for p in parts]))


@torch.no_grad()
def _features(net: Network, pre: _Prefix, device: torch.device, pooled_levels: bool = True) -> Features:
    """Pooled levels and patch features of cached prefix outputs; without `pooled_levels` the patch
    features alone (and only the blocks they need run). Patch features are made a batch at a time,
    so the upsampled maps of all views never exist at once."""
    batch = views_per_forward(device)
    patch_parts, pooled_parts = [], []
    for i in range(0, pre.h.shape[0], batch):
        maps, pooled = net.forward_suffix(pre.h[i:i + batch].to(device), pooled_levels)
        maps = {**{j: m[i:i + batch] for j, m in pre.maps.items()}, **{j: m.float().cpu() for j, m in maps.items()}}
        patch_parts.append(patch_features([maps[j].float() for j in net.patch_blocks]))
        pooled_parts.append([p.cpu() for p in pooled])
    pooled = pre.pooled + [torch.cat([p[i] for p in pooled_parts]) for i in range(len(pooled_parts[0]))]
    if not pooled_levels:
        pooled = []
    return Features([p.double() for p in pooled], torch.cat(patch_parts))


def _maha(pooled: list[torch.Tensor], gaussians: list[Gaussian], scale: torch.Tensor) -> np.ndarray:
    total = sum(g.distance(p) / s for g, p, s in zip(gaussians, pooled, scale))
    return total.numpy()


def _worst_tile(components: dict[str, np.ndarray], part: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-part Mahalanobis and patch scores from per-tile ones: each part's highest, in order of part."""
    parts = part.unique()  # sorted
    return {name: np.asarray([scores[(part == p).numpy()].max() for p in parts])
            for name, scores in components.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-fold component scores joined into one array each."""
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


FUSION_LOO = "z-scores over the leave-one-out normal scores"
FUSION_SYNTHETIC_GAP = "single image: units of the gap from the held-out views to the median synthetic anomaly"


def _fusion_scales(normal: dict[str, np.ndarray], synthetic: dict[str, np.ndarray] | None,
                   single_image: bool) -> tuple[dict[str, tuple[float, float]], str]:
    """(centre, scale) per component for the fused score, and the rule that chose them."""
    scales = {name: _mean_std(v) for name, v in normal.items()}
    if not single_image or synthetic is None:
        return scales, FUSION_LOO
    gaps = {name: float(np.median(synthetic[name])) - scales[name][0] for name in normal}
    # A component whose synthetic anomalies do not score above the normal views gives no unit.
    if min(gaps.values()) <= 0:
        return scales, FUSION_LOO
    return {name: (scales[name][0], max(gaps[name], scales[name][1])) for name in normal}, FUSION_SYNTHETIC_GAP


def fused_spread_floor(normal: dict[str, np.ndarray], fusion: dict[str, tuple[float, float]],
                       score: str = "fused") -> float:
    """The spread the fused leave-one-out scores would have if their components were uncorrelated.

    The fused score adds the components in units of their own leave-one-out spread, so the fused
    leave-one-out scores have spread sqrt(2 + 2 r), r the components' correlation over the same k
    images. From a few images r is a coin toss (at k = 2 it is +1 or -1: the two fused scores are
    then equal, the spread 0 and the threshold their mean, or the spread 2): a bound on those
    scores flags several times the target of new normal images (simulated in
    `tests/fsad_core/test_detector.py`). Two measures of one departure from normal do not cancel
    each other (their correlation was positive on the test normals of every measured run,
    docs/measurements.md), so the spread is taken as at least the uncorrelated one. `either`, the
    larger of the two, spreads about as the wider of them: that one's spread is its floor.
    """
    spreads = [float(np.std(normal[name], ddof=1)) / fusion[name][1] for name in normal]
    return max(spreads) if score == "either" else math.sqrt(sum(s ** 2 for s in spreads))


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return mean, max(std, 0.05 * abs(mean), 1e-6)  # floor: with k = 1..3 the spread is barely known


