"""A detector's configuration: how it is fitted and scores, and its dict round trip (what a model
folder's config.json and the configuration hash are made of)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .augment import AugmentConfig
from .backbone import get_spec
from .calibration import check_false_alarm_target
from .finetune import FinetuneConfig
from .losses import LossWeights
from .negatives import NEGATIVE_KINDS
from .network import check_pooling
from .options import SCORE_KINDS
from .preprocess import DEFAULT_RESIZE_MODE, InputSpec, check_intensity_policy


@dataclass(frozen=True)
class DetectorConfig:
    """How a detector is fitted and scores. Sides: `size` and `patch_size` are the input sides asked
    for; `patch_side` and `work_side` the sides used (see their docstrings). Where the backbone is
    cut is the backbone's (`BackboneSpec`), not a setting."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = None
    size: int = 224
    resize: str = DEFAULT_RESIZE_MODE  # options.RESIZE_MODES
    intensity: str = "auto"       # options.INTENSITY_POLICIES; a fitted model holds the mode `auto` chose
    patch_size: int | None = 320  # input side of the patch branch (None: `size`); see the module docstring
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    pooling: str = "mean+std+max" # statistics over positions of each pooled level (options.POOLINGS)
    pool_views: int = 64          # augmented views in the pool, spread over the tiles of the k images (>= 8 each)
    negatives: int = 48           # synthetic anomalies in the pool
    calibration_negatives: int = 32  # synthetic anomalies scored to calibrate the threshold
    memory_views: int = 3         # views per tile in the patch memory (the tile itself first)
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
        """The patch branch's input side: `patch_size`, or `size` when that is None."""
        return self.patch_size or self.size

    @property
    def image_branch(self) -> bool:
        """Whether scoring needs the pooled embeddings and their Gaussians: not for the patch score,
        which then takes one backbone pass an image, up to the last patch block."""
        return self.score != "patch"

    @property
    def work_side(self) -> int:
        """The side images are prepared, augmented and given defects at: the larger of the two."""
        return max(self.size, self.patch_side)

    def input_spec(self, side: int) -> InputSpec:
        """How images are prepared at ``side``: the resize mode, the backbone's normalisation and the
        intensity mode."""
        spec = get_spec(self.backbone)
        return InputSpec(side, self.resize, spec.mean, spec.std, self.intensity)

    def to_dict(self) -> dict:
        """The fields, with the backbone's cut and the negatives' kinds beside them: model folders
        and configuration hashes stay those of fsad versions where they were settings."""
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        d["finetune"] = self.finetune.to_dict() if self.finetune else None
        spec = get_spec(self.backbone)
        d.update(split=spec.split, patch_blocks=spec.patch_blocks, first_level=spec.first_level,
                 negative_kinds=NEGATIVE_KINDS)
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
        _check_saved_cut(d)
        return cls(**d)


def _check_saved_cut(d: dict) -> None:
    """A saved configuration names the backbone's cut (`to_dict`): a model cut elsewhere (older fsad
    versions took it as a setting) cannot be rebuilt by this one; the negatives' kinds only
    mattered to the fit."""
    spec = get_spec(d["backbone"])
    for name in ("split", "patch_blocks", "first_level"):
        saved = d.pop(name, None)
        wanted = getattr(spec, name)
        if saved is not None and (tuple(saved) if isinstance(saved, list) else saved) != wanted:
            raise ValueError(f"the model cuts its backbone at {name}={saved}, this fsad only at {wanted}: "
                             "retrain it")
    d.pop("negative_kinds", None)
