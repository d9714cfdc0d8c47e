"""What a retraining tells its caller: a typed summary, written by the flow as the JSON of its
result (Prefect persists it) and read back by the command line, the demo and the nightly sweep."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PROMOTED, GATE_FAILED, ALREADY_TRAINED = "promoted", "gate_failed", "already_trained"
PINNED = "passed_pinned"  # passed the gate, not promoted: the product is pinned
METRICS_SHOWN = ("benchmark_auroc", "f1", "false_alarm_rate", "miss_rate", "fit_seconds")


@dataclass(frozen=True)
class GateSummary:
    passed: bool
    reason: str
    min_auroc: float | None = None
    candidate_auroc: float | None = None
    champion_version: str | None = None
    champion_auroc: float | None = None
    evidence: str = ""  # labelled or synthetic (`fsad_core.evidence`); "" where not recorded
    champion_below_minimum: bool = False


@dataclass(frozen=True)
class ThresholdSummary:
    value: float
    rule: str
    expected_false_alarm_rate: float | None


@dataclass(frozen=True)
class TrainingSummary:
    size: int
    steps: int
    pool_views: int
    backbone: str
    device: str


@dataclass(frozen=True)
class TrainedSummary:
    """What a run that trained measured; absent when the upload was already trained."""

    eval_set: str
    k: int
    metrics: dict[str, float]
    threshold: ThresholdSummary
    training: TrainingSummary


@dataclass(frozen=True)
class RetrainSummary:
    product: str
    upload_id: str
    content_sha256: str
    method: str
    seed: int
    config_sha256: str
    validation: str  # the validation report's address
    status: str  # PROMOTED, GATE_FAILED, PINNED or ALREADY_TRAINED
    message: str
    version: str
    run_id: str
    model: str  # models:/NAME/VERSION
    gate: GateSummary
    aliases: dict[str, str] = field(default_factory=dict)
    trained: TrainedSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        """The flow's JSON result: the trained run's fields at the top level, beside the others."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "trained"}
        summary["gate"] = asdict(self.gate)
        return {**summary, **(asdict(self.trained) if self.trained else {})}

    @classmethod
    def from_dict(cls, summary: dict[str, Any]) -> RetrainSummary:
        own = {f.name: summary[f.name] for f in fields(cls) if f.name in summary and f.name != "trained"}
        trained = None
        if "metrics" in summary:
            trained = TrainedSummary(summary["eval_set"], summary["k"], summary["metrics"],
                                     ThresholdSummary(**summary["threshold"]), TrainingSummary(**summary["training"]))
        return cls(**{**own, "gate": GateSummary(**summary["gate"])}, trained=trained)

    @property
    def champion(self) -> str | None:
        return self.aliases.get("champion")

    def text(self) -> str:
        """A few lines for people (the command line and the demo)."""
        lines = [f"{self.product} upload {self.upload_id}: {self.message}",
                 f"model     {self.model}  aliases {json.dumps(self.aliases, sort_keys=True)}",
                 f"gate      {'passed' if self.gate.passed else 'failed'}: {self.gate.reason}"]
        if self.gate.champion_below_minimum:
            lines.append(f"warning   champion v{self.gate.champion_version} is below the minimum AUROC "
                         f"{self.gate.min_auroc} on the labelled benchmark")
        if self.trained:
            m = self.trained.metrics
            lines.append(f"metrics   ({self.trained.eval_set} benchmark) "
                         + ", ".join(f"{k} {m[k]:.4g}" for k in METRICS_SHOWN if k in m))
            lines.append(f"threshold {self.trained.threshold.value:.4g} ({self.trained.threshold.rule})")
        return "\n".join(lines)
