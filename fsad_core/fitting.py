"""The stages of a fit, each a function of the previous one's result (`Detector.fit` runs them in
order): a pool of augmented views (`view_pool`) -> the frozen prefix once and the optional
contrastive fine-tuning against synthetic negatives (`adapted_features`) -> one patch coreset per
memory unit (an image; with one image, half its views: `Normals`) -> held-out folds
(`held_out_folds`), each scored by a `Scoring` fitted without it, on its normal parts and on
synthetic anomalies (`held_out_scores`) -> fusion statistics and the threshold (`calibrate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .augment import augment_views
from .calibration import Threshold, calibrate_unsupervised
from .config import DetectorConfig
from .features import Extractor, Features, prefix_outputs, resized
from .finetune import TrainingHistory, finetune
from .fusion import COMBINED, fused_spread_floor, fusion_scales, with_combined
from .gaussian import Gaussian
from .imageio import array_at_work_size
from .negatives import NEGATIVE_KINDS, synthesize
from .options import SCORE_KINDS
from .patch_memory import PatchMemory, group_coresets
from .preprocess import InputSpec, prepare
from .progress import Progress, report
from .scoring import Scoring, joined, worst_tile

DEFECT_VIEWS = 8  # views of each confirmed defect among the fine-tuning's negatives: it and augmented copies
MAX_FOLDS = 8  # held-out folds of the normal images for calibration (one image each up to k = 8)


@dataclass
class FitReport:
    """What a fit learnt besides the model: its loss curve and the held-out scores its threshold came from."""

    history: TrainingHistory | None
    normal_scores: dict[str, list[float]]
    synthetic_scores: dict[str, list[float]]
    normal_rule: str
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["history"] = self.history.to_dict() if self.history else None
        return d


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


def view_pool(images: list[np.ndarray], config: DetectorConfig, spec: InputSpec,
              progress: Progress | None = None) -> ViewPool:
    """`pool_views` augmented views spread over the tiles (at least 8 each), each tile's own first."""
    tiles = [prepare(array_at_work_size(img), spec) for img in images]
    bases = [t for image_tiles in tiles for t in image_tiles]
    image_of_tile = torch.cat([torch.full((len(t),), i) for i, t in enumerate(tiles)])
    per_tile = max(8, math.ceil(config.pool_views / len(bases)))

    def augmented(i: int, base: torch.Tensor) -> torch.Tensor:
        views = augment_views(base, per_tile - 1, config.augment, generator_seed=config.seed * 1000 + i)
        report(progress, "views", i + 1, len(bases))
        return torch.cat([base[None], views])

    views = torch.cat([augmented(i, base) for i, base in enumerate(bases)])
    return ViewPool(views, image_of_tile.repeat_interleave(per_tile), torch.arange(per_tile).repeat(len(bases)),
                    per_tile, len(images), len(bases))


def _synthetic_anomalies(rng: np.random.Generator, views: torch.Tensor, picks: np.ndarray) -> torch.Tensor:
    """One synthetic anomaly from each picked view, with material from another view of the pool."""
    return torch.stack([synthesize(rng, views[int(j)], NEGATIVE_KINDS, source=views[int(rng.integers(len(views)))])[0]
                        for j in picks])


def _patches(extractor: Extractor, views: torch.Tensor) -> torch.Tensor:
    """The views' patch features as (views x patches x channels)."""
    patches = extractor.prefixes(views, image_branch=False).features(extractor.net, extractor.device, False).patches
    return patches.flatten(2).transpose(1, 2)


def defect_views(extractor: Extractor, pool: ViewPool, defects: Sequence[np.ndarray]) -> torch.Tensor:
    """Views of confirmed defects for the fine-tuning's negative term: each defect's tile whose
    patches lie farthest from the normal tiles' (a defect is local, and the other tiles of a tiled
    part are normal: pushed away, they would teach the network that normal texture is anomalous),
    then augmented copies of it, as the normal views are made."""
    config = extractor.config
    tiles = [prepare(array_at_work_size(image), extractor.spec) for image in defects]
    reference = (_patches(extractor, pool.views[pool.view_in_tile == 0]).flatten(0, 1)
                 if any(len(t) > 1 for t in tiles) else None)  # only a tiled defect needs the normal patches

    def farthest(candidates: torch.Tensor) -> torch.Tensor:
        if len(candidates) == 1:
            return candidates[0]
        gaps = torch.stack([torch.cdist(p, reference).amin(1).amax() for p in _patches(extractor, candidates)])
        return candidates[int(gaps.argmax())]

    chosen = [farthest(t) for t in tiles]
    return torch.cat([torch.cat([tile[None], augment_views(tile, DEFECT_VIEWS - 1, config.augment,
                                                            generator_seed=config.seed * 1000 + 500 + i)])
                      for i, tile in enumerate(chosen)])


def adapted_features(extractor: Extractor, pool: ViewPool, rng: np.random.Generator,
                      progress: Progress | None, defects: Sequence[np.ndarray] = ()
                      ) -> tuple[Features, TrainingHistory | None]:
    """The pool's features after the optional contrastive fine-tuning, which trains the network's
    suffix on the frozen prefix's outputs, computed once. Its negatives are synthetic anomalies and
    the views of any confirmed defects (`defect_views`)."""
    config, net = extractor.config, extractor.net
    normal_pre = extractor.prefixes(pool.views, config.image_branch or config.finetune is not None, progress)
    history = None
    if config.finetune is not None:
        negatives = _synthetic_anomalies(rng, pool.views, rng.integers(len(pool.views), size=config.negatives))
        if defects:
            negatives = torch.cat([negatives, defect_views(extractor, pool, defects)])
        neg_h = prefix_outputs(net, resized(negatives, config.size), extractor.spec, extractor.device, progress).h
        report = (lambda step, total, loss: progress("fine-tune", step, total)) if progress else None
        # Tiles of one part are views of one instance: the instance term must not learn to tell
        # them apart, and the cross-instance term pairs different parts.
        history = finetune(net, normal_pre.image.h, pool.image_of_view, neg_h, config.finetune, config.seed,
                           extractor.device, report)
    net.eval()
    return normal_pre.features(net, extractor.device, config.image_branch, progress), history


@dataclass(frozen=True)
class Normals:
    """The pool's features and one patch coreset per memory unit, from which the scoring of any
    subset of the views is fitted without choosing a coreset again (`patch_memory.group_coresets`)."""

    features: Features
    banks: dict[int, torch.Tensor]
    unit_of_view: torch.Tensor  # an image; with one image, a half of the views
    in_memory: torch.Tensor     # the first `memory_views` views of each tile

    @classmethod
    def of(cls, features: Features, pool: ViewPool, config: DetectorConfig,
           progress: Progress | None = None) -> Normals:
        in_memory = pool.view_in_tile < config.memory_views
        unit = pool.image_of_view if pool.n_images >= 2 else (pool.view_in_tile >= pool.per_tile // 2).long()
        banks = group_coresets(features.patches[in_memory], unit[in_memory], config.memory_max, config.seed,
                               config.coreset_candidates or None, progress)
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


def held_out_scores(extractor: Extractor, normals: Normals, pool: ViewPool, folds: Folds,
                     rng: np.random.Generator, progress: Progress | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Component scores of each fold's held-out parts (a part scores as its worst tile, as in
    `score`) and of synthetic anomalies made from them, by the fold's scoring."""
    config = extractor.config
    wanted = config.calibration_negatives
    per_fold = max(2, wanted // len(folds.folds)) if wanted > 0 else 0
    normal_parts, synthetic_parts = [], []
    for fold in folds.folds:
        scoring = normals.scoring_on(fold.fit_views)
        held = normals.features.select(fold.held_out)
        normal_parts.append(worst_tile(scoring.components(held, config), folds.part_of_view[fold.held_out]))
        if per_fold:
            candidates = torch.nonzero(fold.anomalies_from).flatten().numpy()
            picks = rng.choice(candidates, size=per_fold, replace=len(candidates) < per_fold)
            anomalies = _synthetic_anomalies(rng, pool.views, picks)
            synthetic_parts.append(scoring.components(extractor.features(anomalies), config))
        report(progress, "held-out", len(normal_parts), len(folds.folds))
    return joined(normal_parts), (joined(synthetic_parts) if synthetic_parts else None)


@dataclass(frozen=True)
class Calibration:
    fusion: dict[str, tuple[float, float]]
    fusion_rule: str | None
    threshold: Threshold
    normal_scores: dict[str, np.ndarray]     # every score kind of the held-out normal parts
    synthetic_scores: dict[str, np.ndarray]  # and of the synthetic anomalies (empty without them)

    def report(self, history: TrainingHistory | None, normal_rule: str, seconds: float) -> FitReport:
        return FitReport(history, _as_lists(self.normal_scores), _as_lists(self.synthetic_scores), normal_rule,
                         seconds)


def calibrate(normal: dict[str, np.ndarray], synthetic: dict[str, np.ndarray] | None, config: DetectorConfig,
               n_images: int, normal_rule: str) -> Calibration:
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
    return Calibration(fusion, fusion_rule, threshold, normal_scores, synthetic_scores)


def _as_lists(scores: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """JSON-ready scores, in the order of SCORE_KINDS."""
    return {name: scores[name].tolist() for name in SCORE_KINDS if name in scores}


