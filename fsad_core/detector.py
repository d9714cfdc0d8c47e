"""The anomaly detector: fit on k normal images, score images, save and load as a model folder.

Fit = prepare inputs -> pool of augmented views and synthetic negatives -> frozen prefix once ->
optional contrastive fine-tuning -> per-level Gaussians (Mahalanobis) and a patch memory ->
leave-one-out normal scores and synthetic-anomaly scores -> fusion statistics and threshold.

Scores (higher = more anomalous):
- `mahalanobis`: sum over levels of the Mahalanobis distance of the pooled embedding, each level
  divided by its mean distance on the normal views, so levels count alike;
- `patch`: maximum of the anomaly map (nearest-neighbour patch distance, upsampled, smoothed);
- `fused`: z(mahalanobis) + z(patch), each standardised by its leave-one-out normal scores.
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

from . import __version__
from .augment import AugmentConfig, augment_views
from .backbone import create_backbone, get_spec
from .calibration import Threshold, calibrate_unsupervised
from .finetune import FinetuneConfig, TrainingHistory, finetune
from .gaussian import Gaussian
from .losses import LossWeights
from .negatives import NEGATIVE_KINDS, synthesize
from .network import Network
from .patch_memory import PatchMemory, patch_features, smooth_and_upsample
from .preprocess import InputSpec, map_to_image, normalise, prepare

FORMAT_VERSION = 1
SCORE_KINDS = ("mahalanobis", "patch", "fused")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DetectorConfig:
    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = None
    size: int = 224
    resize: str = "resize"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    split: int = 4
    patch_blocks: tuple[int, int] = (2, 4)
    pool_views: int = 64          # augmented views in the pool, spread over the k images (>= 8 each)
    negatives: int = 48           # synthetic anomalies in the pool
    negative_kinds: tuple[str, ...] = NEGATIVE_KINDS
    calibration_negatives: int = 32  # synthetic anomalies scored to calibrate the threshold
    memory_views: int = 3         # views per image in the patch memory (the original first)
    memory_max: int = 10000
    map_sigma: float = 4.0
    score: str = "fused"
    target_false_alarm_rate: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.score not in SCORE_KINDS:
            raise ValueError(f"score {self.score!r}: one of {SCORE_KINDS}")
        InputSpec(self.size, self.resize)  # validates size and mode

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        d["finetune"] = self.finetune.to_dict() if self.finetune else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorConfig":
        d = dict(d)
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


def _batched(fn: Callable[[torch.Tensor], object], x: torch.Tensor, batch: int = 32) -> list:
    return [fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)]


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
        self.input_spec = InputSpec(config.size, config.resize, spec.mean, spec.std)

    # ----------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, images: list[np.ndarray], config: DetectorConfig = DetectorConfig(), device: str = "auto",
            progress: Progress | None = None) -> tuple["Detector", FitReport]:
        """Fit on k >= 1 normal images (HxWx3 uint8, any sizes)."""
        if not images:
            raise ValueError("need at least one normal image")
        start = time.perf_counter()
        dev = resolve_device(device)
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        spec = get_spec(config.backbone)
        input_spec = InputSpec(config.size, config.resize, spec.mean, spec.std)
        net = Network(create_backbone(config.backbone, config.weights), config.split, config.patch_blocks).to(dev).eval()

        # Each tile of each image is a training "image"; views are drawn per tile.
        bases = [t for img in images for t in prepare(img, input_spec)]
        k = len(bases)
        per_image = max(8, math.ceil(config.pool_views / k))
        views, source = [], []
        for i, base in enumerate(bases):
            aug = augment_views(base, per_image - 1, config.augment, generator_seed=config.seed * 1000 + i)
            views.append(torch.cat([base[None], aug]))
            source += [i] * per_image
        views_t = torch.cat(views)
        source_t = torch.tensor(source)
        negs = []
        for _ in range(config.negatives):
            a, b = rng.integers(len(views_t), size=2)
            neg, _, _ = synthesize(rng, views_t[a], config.negative_kinds, source=views_t[b])
            negs.append(neg)
        negs_t = torch.stack(negs) if negs else views_t[:0]

        def prefix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                e, h = net.forward_prefix(normalise(x.to(dev), input_spec))
            return e.cpu(), h.cpu()

        if progress:
            progress("features", 0, 1)
        normal_early, normal_cache = map(torch.cat, zip(*_batched(prefix, views_t)))
        neg_cache = torch.cat([h for _, h in _batched(prefix, negs_t)]) if negs else views_t[:0]

        history = None
        if config.finetune is not None:
            report = (lambda step, total, loss: progress("fine-tune", step, total)) if progress else None
            history = finetune(net, normal_cache, source_t, neg_cache, config.finetune, config.seed, dev, report)
        net.eval()

        def suffix(h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            with torch.no_grad():
                late, pooled = net.forward_suffix(h.to(dev))
            return late.cpu(), [p.cpu().double() for p in pooled]

        normal_late, normal_pooled = _cat_suffix(_batched(suffix, normal_cache))
        view_in_image = torch.cat([torch.arange(per_image)] * k)
        mem_mask = view_in_image < config.memory_views
        normal_patches = patch_features([normal_early[mem_mask], normal_late[mem_mask]])
        mem_source = source_t[mem_mask]

        def fit_scoring(keep: torch.Tensor, mem_keep: torch.Tensor) -> tuple[list[Gaussian], torch.Tensor, PatchMemory]:
            gaussians = [Gaussian.fit(level[keep]) for level in normal_pooled]
            scale = torch.stack([g.distance(level[keep]).mean() for g, level in zip(gaussians, normal_pooled)])
            memory = PatchMemory.fit(normal_patches[mem_keep], config.memory_max, config.seed)
            return gaussians, scale, memory

        gaussians, scale, memory = fit_scoring(torch.ones(len(source_t), dtype=torch.bool),
                                               torch.ones(len(mem_source), dtype=torch.bool))
        # Leave-one-out scores of the normals, and of synthetic anomalies made from the left-out
        # image, so both come from a model that never saw that image. With one image: held-out
        # augmented views instead.
        originals = view_in_image == 0
        cal_per_fold = max(2, config.calibration_negatives // k)
        if k >= 2:
            rule = "leave-one-out over the k normal images"
            folds = [(source_t != i, mem_source != i, originals & (source_t == i), source_t == i) for i in range(k)]
        else:
            rule = "held-out augmented views of the single normal image"
            half = per_image // 2
            fit_keep = view_in_image < half
            folds = [(fit_keep, view_in_image[mem_mask] < min(config.memory_views, half), ~fit_keep, ~fit_keep)]
        normal_comps: list[dict[str, np.ndarray]] = []
        synth_comps: list[dict[str, np.ndarray]] = []
        for keep, mem_keep, held, neg_from in folds:
            fold = cls._from_parts(config, net, *fit_scoring(keep, mem_keep), fusion=None, device=dev)
            normal_comps.append(fold._components([p[held] for p in normal_pooled],
                                                 patch_features([normal_early[held], normal_late[held]])))
            if config.calibration_negatives > 0:
                candidates = torch.nonzero(neg_from).flatten().numpy()
                picks = rng.choice(candidates, size=cal_per_fold, replace=len(candidates) < cal_per_fold)
                cal = torch.stack([synthesize(rng, views_t[j], config.negative_kinds,
                                              source=views_t[int(rng.integers(len(views_t)))])[0] for j in picks])
                early, h = prefix(cal)
                late, pooled = suffix(h)
                synth_comps.append(fold._components(pooled, patch_features([early, late])))
        loo_maha = np.concatenate([c["mahalanobis"] for c in normal_comps]).tolist()
        loo_patch = np.concatenate([c["patch"] for c in normal_comps]).tolist()

        fusion = {"mahalanobis": _mean_std(loo_maha), "patch": _mean_std(loo_patch)}
        detector = cls._from_parts(config, net, gaussians, scale, memory, fusion=fusion, device=dev)
        detector.meta = {"k": len(images), "tiles": k}
        normal_scores = {"mahalanobis": loo_maha, "patch": loo_patch,
                         "fused": [detector._fuse(a, b) for a, b in zip(loo_maha, loo_patch)]}
        synthetic_scores: dict[str, list[float]] = {name: [] for name in SCORE_KINDS}
        if synth_comps:
            maha = np.concatenate([c["mahalanobis"] for c in synth_comps])
            patch = np.concatenate([c["patch"] for c in synth_comps])
            synthetic_scores = {"mahalanobis": maha.tolist(), "patch": patch.tolist(),
                                "fused": [detector._fuse(a, b) for a, b in zip(maha, patch)]}
        if progress:
            progress("calibrate", 1, 1)
        detector.threshold = calibrate_unsupervised(np.asarray(normal_scores[config.score]),
                                                    np.asarray(synthetic_scores[config.score]) if synth_comps else None,
                                                    config.target_false_alarm_rate)
        detector.threshold.details["normal_rule"] = rule
        report = FitReport(history, normal_scores, synthetic_scores, rule, time.perf_counter() - start)
        return detector, report

    @classmethod
    def _from_parts(cls, config: DetectorConfig, net: Network, gaussians: list[Gaussian], scale: torch.Tensor,
                    memory: PatchMemory, fusion: dict[str, tuple[float, float]] | None,
                    device: torch.device) -> "Detector":
        return cls(config, net, gaussians, scale, memory, fusion or {}, None, device=device)

    # ----------------------------------------------------------------------------- scoring
    def _fuse(self, maha: float, patch: float) -> float:
        if not self.fusion:  # fusion statistics are not known yet while calibrating
            return math.nan
        (mm, ms), (pm, ps) = self.fusion["mahalanobis"], self.fusion["patch"]
        return (maha - mm) / ms + (patch - pm) / ps

    def _components(self, pooled: list[torch.Tensor], feats: torch.Tensor) -> dict[str, np.ndarray]:
        maha = _maha(pooled, self.gaussians, self.level_scale)
        patch = _patch_scores(self.memory, feats, self.config)
        fused = np.asarray([self._fuse(a, b) for a, b in zip(maha, patch)])
        return {"mahalanobis": maha, "patch": patch, "fused": fused}

    @torch.no_grad()
    def score(self, images: list[np.ndarray], with_maps: bool = False, batch: int = 16) -> ScoreResult:
        """Score images in batches; in tile mode an image's score is its worst tile's."""
        comps: dict[str, list[float]] = {name: [] for name in SCORE_KINDS}
        maps: list[np.ndarray] = []
        sigma = self.config.map_sigma * self.config.size / 224
        for first in range(0, len(images), batch):
            chunk = images[first:first + batch]
            views = [prepare(img, self.input_spec) for img in chunk]
            x = normalise(torch.cat(views), self.input_spec).to(self.device)
            early, h = self.net.forward_prefix(x)
            late, pooled = self.net.forward_suffix(h)
            feats = patch_features([early.cpu(), late.cpu()])
            maha = _maha([p.cpu().double() for p in pooled], self.gaussians, self.level_scale)
            amap = smooth_and_upsample(self.memory.distances(feats), self.config.size, sigma)
            patch = amap.flatten(1).amax(dim=1).numpy()
            offset = 0
            for img, v in zip(chunk, views):
                n = v.shape[0]
                m, p = float(maha[offset:offset + n].max()), float(patch[offset:offset + n].max())
                comps["mahalanobis"].append(m)
                comps["patch"].append(p)
                comps["fused"].append(self._fuse(m, p))
                if with_maps:
                    maps.append(map_to_image(amap[offset:offset + n], img.shape[0], img.shape[1], self.input_spec))
                offset += n
        arrays = {name: np.asarray(v) for name, v in comps.items()}
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
        save_file(net_state, str(folder / "network.safetensors"))
        scoring = {"level_scale": self.level_scale, "memory": self.memory.bank.contiguous()}
        for i, g in enumerate(self.gaussians):
            scoring.update(g.state(f"gaussian.{i}"))
        save_file({k: v.contiguous() for k, v in scoring.items()}, str(folder / "scoring.safetensors"))
        config = {
            "format_version": FORMAT_VERSION,
            "library": {"fsad": __version__, "torch": torch.__version__},
            "detector": self.config.to_dict(),
            "normalisation": {"mean": list(self.input_spec.mean), "std": list(self.input_spec.std)},
            "levels": len(self.gaussians),
            "fusion": {k: list(v) for k, v in self.fusion.items()},
            "threshold": self.threshold.to_dict() if self.threshold else None,
            "meta": self.meta,
            **(extra_config or {}),
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> "Detector":
        """Load a model folder; only JSON and safetensors are read (never pickle)."""
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
        config_json = json.loads(cfg_path.read_text())
        if config_json.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: unsupported model format {config_json.get('format_version')}")
        config = DetectorConfig.from_dict(config_json["detector"])
        backbone = create_backbone(config.backbone, pretrained=False)
        net = Network(backbone, config.split, config.patch_blocks)
        net.load_state_dict(load_file(str(folder / "network.safetensors")), strict=True)
        scoring = load_file(str(folder / "scoring.safetensors"))
        gaussians = [Gaussian.from_state(scoring, f"gaussian.{i}") for i in range(config_json["levels"])]
        fusion = {k: (float(v[0]), float(v[1])) for k, v in config_json["fusion"].items()}
        threshold = Threshold.from_dict(config_json["threshold"]) if config_json.get("threshold") else None
        dev = resolve_device(device)
        return cls(config, net.to(dev), gaussians, scoring["level_scale"], PatchMemory(scoring["memory"]), fusion,
                   threshold, meta=config_json.get("meta", {}), device=dev)

    def with_threshold(self, threshold: Threshold) -> "Detector":
        self.threshold = threshold
        return self


def _cat_suffix(parts: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    late = torch.cat([p[0] for p in parts])
    pooled = [torch.cat([p[1][i] for p in parts]) for i in range(len(parts[0][1]))]
    return late, pooled


def _maha(pooled: list[torch.Tensor], gaussians: list[Gaussian], scale: torch.Tensor) -> np.ndarray:
    total = sum(g.distance(p) / s for g, p, s in zip(gaussians, pooled, scale))
    return total.numpy()


def _patch_scores(memory: PatchMemory, feats: torch.Tensor, config: DetectorConfig) -> np.ndarray:
    dist = memory.distances(feats)
    amap = smooth_and_upsample(dist, config.size, config.map_sigma * config.size / 224)
    return amap.flatten(1).amax(dim=1).numpy()


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return mean, max(std, 0.05 * abs(mean), 1e-6)  # floor: with k = 1..3 the spread is barely known


__all__ = ["Detector", "DetectorConfig", "FitReport", "ScoreResult", "resolve_device", "replace"]
