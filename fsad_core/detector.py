"""The anomaly detector: fit on k normal images, score images, save and load as a model folder
(its configuration is `fsad_core.config`).

Fit, in stages: a pool of augmented views (`view_pool`) -> the frozen prefix once (`fsad_core.features`),
and the optional contrastive fine-tuning against synthetic negatives -> one patch coreset per memory
unit (an image; with one image, half its views: `_Normals`) ->
held-out folds (`held_out_folds`), each scored by a `Scoring` (per-level Gaussians and a patch
memory) fitted without it, on its normal parts and on synthetic anomalies -> fusion statistics
and the threshold (`_calibrate`) -> the detector, built once with the scoring of all the views.

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
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .augment import augment_views
from .backbone import create_backbone
from .calibration import Threshold, calibrate_unsupervised
from .config import DetectorConfig
from .features import Extractor, Features, build_network, prefix_outputs, resized
from .finetune import TrainingHistory, finetune
from .fusion import COMBINED, fused_spread_floor, fusion_scales, with_combined
from .gaussian import Gaussian
from .imageio import array_at_work_size
from .negatives import NEGATIVE_KINDS, synthesize
from .network import Network
from .options import SCORE_KINDS
from .patch_memory import PatchMemory, group_coresets, smooth_and_upsample
from .preprocess import (
    InputSpec,
    map_to_image,
    prepare,
    resolve_intensity,
)
from .provenance import cpu_description, library_versions

FORMAT_VERSION = 1
CONFIG_FILE, NETWORK_FILE, SCORING_FILE = "config.json", "network.safetensors", "scoring.safetensors"
MODEL_FILES = (CONFIG_FILE, NETWORK_FILE, SCORING_FILE)  # a model folder: JSON and safetensors, nothing else
MAX_FOLDS = 8  # held-out folds of the normal images for calibration (one image each up to k = 8)
Progress = Callable[[str, int, int], None]


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
    is_anomaly: np.ndarray                   # scores above the model's threshold
    maps: list[np.ndarray] | None = None     # HxW maps at each image's size (as read: see WORK_PIXELS), when asked for


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
            progress: Progress | None = None) -> tuple[Detector, FitReport]:
        """Fit on k >= 1 normal images (HxWx3 uint8, any sizes): the stages of the module docstring."""
        if not images:
            raise ValueError("need at least one normal image")
        start = time.perf_counter()
        dev = resolve_device(device)
        config = replace(config, intensity=resolve_intensity(config.intensity, images))
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        input_spec = config.input_spec(config.work_side)
        net = build_network(config, create_backbone(config.backbone, config.weights)).to(dev).eval()
        extractor = Extractor(net, config, input_spec, dev)
        pool = view_pool(images, config, input_spec)
        if progress:
            progress("features", 0, 1)
        features, history = _adapted_features(extractor, pool, rng, progress)
        normals = _Normals.of(features, pool, config)
        folds = held_out_folds(pool)
        normal, synthetic = _held_out_scores(extractor, normals, pool, folds, rng)
        if progress:
            progress("calibrate", 1, 1)
        calibration = _calibrate(normal, synthetic, config, pool.n_images, folds.rule)
        meta = {"k": pool.n_images, "tiles": pool.n_tiles, "fitted_on": cpu_description(),
                **({"fusion_rule": calibration.fusion_rule} if config.image_branch else {})}
        detector = cls(config, net, normals.scoring_on(torch.ones(len(pool.views), dtype=torch.bool)),
                       calibration.fusion, calibration.threshold, meta, device=dev)
        report = FitReport(history, _as_lists(calibration.normal_scores), _as_lists(calibration.synthetic_scores),
                           folds.rule, time.perf_counter() - start)
        return detector, report

    def with_threshold(self, threshold: Threshold) -> Detector:
        """The same model deciding at another threshold (a labelled set's, say)."""
        return type(self)(self.config, self.net, self.scoring, self.fusion, threshold, self.meta, self.device)

    # ----------------------------------------------------------------------------- scoring
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
    def score(self, images: list[np.ndarray], with_maps: bool = False, batch: int = 16) -> ScoreResult:
        """Score images in batches; in tile mode each score is the worst tile's. An image above
        `WORK_PIXELS` is scored as `read_image` would have read it, and its map is of that size."""
        if not images:
            raise ValueError("no images to score")
        parts: list[dict[str, np.ndarray]] = []
        maps: list[np.ndarray] = []
        for first in range(0, len(images), batch):
            chunk = [array_at_work_size(img) for img in images[first:first + batch]]
            views = [prepare(img, self.input_spec) for img in chunk]
            feats = self._extractor.features(torch.cat(views))
            amap = self.anomaly_maps(feats)
            part_of_view = torch.cat([torch.full((v.shape[0],), i) for i, v in enumerate(views)])
            parts.append(_worst_tile(self.scoring.components(feats, self.config, amap), part_of_view))
            if with_maps:
                offsets = np.cumsum([0] + [v.shape[0] for v in views])
                maps += [map_to_image(amap[start:stop], img.shape[0], img.shape[1], self.map_spec)
                         for img, start, stop in zip(chunk, offsets[:-1], offsets[1:])]
        arrays = with_combined(_concat(parts), self.fusion)
        scores = arrays[self.config.score]
        if not np.isfinite(scores).all():
            raise FloatingPointError("non-finite anomaly scores")
        return ScoreResult(scores, arrays, self.threshold.is_anomaly(scores), maps if with_maps else None)

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


# ----------------------------------------------------------------------------- fitting stages
@dataclass(frozen=True)
class ViewPool:
    """The fit's views: each tile of each normal image as itself, then augmented. A part's tiles
    are views of one instance, so fine-tuning and calibration group views by image."""

    views: torch.Tensor          # (tiles x per_tile) x 3 x S x S at the work side
    image_of_view: torch.Tensor  # the normal image each view shows
    view_in_tile: torch.Tensor   # 0: the tile itself, then its augmented views
    per_tile: int                # views of each tile
    n_images: int
    n_tiles: int


def view_pool(images: list[np.ndarray], config: DetectorConfig, spec: InputSpec) -> ViewPool:
    """`pool_views` augmented views spread over the tiles (at least 8 each), each tile's own first."""
    tiles = [prepare(array_at_work_size(img), spec) for img in images]
    bases = [t for image_tiles in tiles for t in image_tiles]
    image_of_tile = torch.cat([torch.full((len(t),), i) for i, t in enumerate(tiles)])
    per_tile = max(8, math.ceil(config.pool_views / len(bases)))
    views = torch.cat([torch.cat([base[None], augment_views(base, per_tile - 1, config.augment,
                                                            generator_seed=config.seed * 1000 + i)])
                       for i, base in enumerate(bases)])
    return ViewPool(views, image_of_tile.repeat_interleave(per_tile), torch.arange(per_tile).repeat(len(bases)),
                    per_tile, len(images), len(bases))


def _synthetic_anomalies(rng: np.random.Generator, views: torch.Tensor, picks: np.ndarray) -> torch.Tensor:
    """One synthetic anomaly from each picked view, with material from another view of the pool."""
    return torch.stack([synthesize(rng, views[int(j)], NEGATIVE_KINDS, source=views[int(rng.integers(len(views)))])[0]
                        for j in picks])


def _adapted_features(extractor: Extractor, pool: ViewPool, rng: np.random.Generator,
                      progress: Progress | None) -> tuple[Features, TrainingHistory | None]:
    """The pool's features after the optional contrastive fine-tuning, which trains the network's
    suffix on the frozen prefix's outputs, computed once."""
    config, net = extractor.config, extractor.net
    normal_pre = extractor.prefixes(pool.views, config.image_branch or config.finetune is not None)
    history = None
    if config.finetune is not None:
        negatives = _synthetic_anomalies(rng, pool.views, rng.integers(len(pool.views), size=config.negatives))
        neg_h = prefix_outputs(net, resized(negatives, config.size), extractor.spec, extractor.device).h
        report = (lambda step, total, loss: progress("fine-tune", step, total)) if progress else None
        # Tiles of one part are views of one instance: the instance term must not learn to tell
        # them apart, and the cross-instance term pairs different parts.
        history = finetune(net, normal_pre.image.h, pool.image_of_view, neg_h, config.finetune, config.seed,
                           extractor.device, report)
    net.eval()
    return normal_pre.features(net, extractor.device, config.image_branch), history


@dataclass(frozen=True, eq=False)
class Scoring:
    """What scores a view against the normal images: a Gaussian a pooled level with its mean
    normal distance (so levels count alike), and the memory of normal patches."""

    gaussians: list[Gaussian]
    level_scale: torch.Tensor  # float64, one a level
    memory: PatchMemory

    def anomaly_maps(self, feats: Features, config: DetectorConfig) -> torch.Tensor:
        """BxSxS maps at the patch branch's input side: nearest-normal-patch distance, upsampled, smoothed."""
        side = config.patch_side
        return smooth_and_upsample(self.memory.distances(feats.patches), side, config.map_sigma * side / 224)

    def components(self, feats: Features, config: DetectorConfig,
                   maps: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Per-view patch scores (each map's maximum), and Mahalanobis ones with the image branch."""
        maps = self.anomaly_maps(feats, config) if maps is None else maps
        per_view = {"patch": maps.flatten(1).amax(dim=1).numpy()}
        if config.image_branch:
            total = sum(g.distance(p) / s for g, p, s in zip(self.gaussians, feats.pooled, self.level_scale))
            per_view["mahalanobis"] = total.numpy()
        return per_view


@dataclass(frozen=True)
class _Normals:
    """The pool's features and one patch coreset per memory unit, from which the scoring of any
    subset of the views is fitted without choosing a coreset again (`patch_memory.group_coresets`)."""

    features: Features
    banks: dict[int, torch.Tensor]
    unit_of_view: torch.Tensor  # an image; with one image, a half of the views
    in_memory: torch.Tensor     # the first `memory_views` views of each tile

    @classmethod
    def of(cls, features: Features, pool: ViewPool, config: DetectorConfig) -> _Normals:
        in_memory = pool.view_in_tile < config.memory_views
        unit = pool.image_of_view if pool.n_images >= 2 else (pool.view_in_tile >= pool.per_tile // 2).long()
        banks = group_coresets(features.patches[in_memory], unit[in_memory], config.memory_max, config.seed,
                               config.coreset_candidates or None)
        return cls(features, banks, unit, in_memory)

    def scoring_on(self, keep: torch.Tensor) -> Scoring:
        """The scoring fitted on the views ``keep`` marks."""
        gaussians = [Gaussian.fit(level[keep]) for level in self.features.pooled]
        scale = torch.tensor([float(g.distance(level[keep]).mean())
                              for g, level in zip(gaussians, self.features.pooled)], dtype=torch.float64)
        kept_units = self.unit_of_view[keep & self.in_memory].unique().tolist()
        return Scoring(gaussians, scale, PatchMemory.union([self.banks[u] for u in kept_units]))


@dataclass(frozen=True)
class Fold:
    fit_views: torch.Tensor  # views its scoring is fitted on
    held_out: torch.Tensor   # views scored as its normal parts
    anomalies_from: torch.Tensor  # views its synthetic anomalies are made from


@dataclass(frozen=True)
class Folds:
    rule: str
    folds: list[Fold]
    part_of_view: torch.Tensor  # the part a held-out view stands for


def held_out_folds(pool: ViewPool) -> Folds:
    """Folds that score each normal part by a scoring that never saw it, nor any tile of it: tiles
    of one part look alike, and leaving out one tile at a time would understate the spread between
    parts. Beyond MAX_FOLDS images, images share folds (image i in fold i mod MAX_FOLDS), so the
    fit's cost stops growing with k squared. With one image: the first half of its views fits and
    the second half is scored, each view index across the tiles standing for one part."""
    if pool.n_images == 1:
        fit_half = pool.view_in_tile < pool.per_tile // 2
        return Folds("held-out augmented views of the single normal image", [Fold(fit_half, ~fit_half, ~fit_half)],
                     pool.view_in_tile)
    n_folds = min(pool.n_images, MAX_FOLDS)
    fold_of_view = pool.image_of_view % n_folds
    folds = [Fold(fold_of_view != i, (fold_of_view == i) & (pool.view_in_tile == 0), fold_of_view == i)
             for i in range(n_folds)]
    rule = ("leave-one-out over the k normal images" if n_folds == pool.n_images else
            f"{n_folds}-fold held-out scores of the k normal images")
    return Folds(rule, folds, pool.image_of_view)


def _held_out_scores(extractor: Extractor, normals: _Normals, pool: ViewPool, folds: Folds,
                     rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Component scores of each fold's held-out parts (a part scores as its worst tile, as in
    `score`) and of synthetic anomalies made from them, by the fold's scoring."""
    config = extractor.config
    wanted = config.calibration_negatives
    per_fold = max(2, wanted // len(folds.folds)) if wanted > 0 else 0
    normal_parts, synthetic_parts = [], []
    for fold in folds.folds:
        scoring = normals.scoring_on(fold.fit_views)
        held = normals.features.select(fold.held_out)
        normal_parts.append(_worst_tile(scoring.components(held, config), folds.part_of_view[fold.held_out]))
        if per_fold:
            candidates = torch.nonzero(fold.anomalies_from).flatten().numpy()
            picks = rng.choice(candidates, size=per_fold, replace=len(candidates) < per_fold)
            anomalies = _synthetic_anomalies(rng, pool.views, picks)
            synthetic_parts.append(scoring.components(extractor.features(anomalies), config))
    return _concat(normal_parts), (_concat(synthetic_parts) if synthetic_parts else None)


@dataclass(frozen=True)
class _Calibration:
    fusion: dict[str, tuple[float, float]]
    fusion_rule: str | None
    threshold: Threshold
    normal_scores: dict[str, np.ndarray]     # every score kind of the held-out normal parts
    synthetic_scores: dict[str, np.ndarray]  # and of the synthetic anomalies (empty without them)


def _calibrate(normal: dict[str, np.ndarray], synthetic: dict[str, np.ndarray] | None, config: DetectorConfig,
               n_images: int, normal_rule: str) -> _Calibration:
    """Fusion statistics from the held-out scores, then the threshold on the configured score."""
    fusion, fusion_rule = (fusion_scales(normal, synthetic, single_image=n_images == 1) if config.image_branch
                           else ({}, None))
    normal_scores = with_combined(normal, fusion)
    synthetic_scores = (with_combined(synthetic, fusion) if synthetic is not None
                        else {name: np.array([]) for name in normal_scores})
    # With k >= 2 the combined scores are in units of the leave-one-out spreads (`fused_spread_floor`).
    min_spread = (fused_spread_floor(normal, fusion, config.score)
                  if config.score in COMBINED and n_images >= 2 else 0.0)
    threshold = calibrate_unsupervised(
        normal_scores[config.score], synthetic_scores[config.score] if synthetic is not None else None,
        config.target_false_alarm_rate, min_spread=min_spread,
        views_of_one_image=n_images == 1).with_details(normal_rule=normal_rule)
    return _Calibration(fusion, fusion_rule, threshold, normal_scores, synthetic_scores)


def _as_lists(scores: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """JSON-ready scores, in the order of SCORE_KINDS."""
    return {name: scores[name].tolist() for name in SCORE_KINDS if name in scores}


def _worst_tile(components: dict[str, np.ndarray], part: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-part Mahalanobis and patch scores from per-tile ones: each part's highest, in order of part."""
    parts = part.unique()  # sorted
    return {name: np.asarray([scores[(part == p).numpy()].max() for p in parts])
            for name, scores in components.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-fold component scores joined into one array each."""
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
