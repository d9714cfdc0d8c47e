"""``fsad simulate``: the loop from the line back into the pipeline, run on a labelled category as
a line would run it, through the real flows, storage and registry (a folder store, SQLite MLflow
and a temporary Prefect server in the work folder).

Day 0 uploads k normal images and retrains. Each day the champion decides the day's parts
(``score-prefix``), the first R images of the review queue (in its order, by chance) are labelled from
the ground truth with their weights, and the nightly sweep retrains what is due. After each day the champion is measured
on the held-out truth, which nothing else ever sees (`fsad_core.line`); the day's seconds count the
retraining, the scoring and the labelling, not that measurement.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flows.cli.embedded import environment, ephemeral_prefect
from flows.mlops import registry, tracking
from flows.pipeline.retrain import retrain_flow
from flows.pipeline.runners import prefect_api
from flows.pipeline.scheduled import retrain_due_flow
from flows.pipeline.score_prefix import score_prefix_flow
from flows.settings import LOOP, Settings, load_settings, training_config
from flows.store.labels import DEFECT, GOOD, add_labels
from flows.store.queue import drawn, queue_state
from flows.store.storage import open_store, training_key
from flows.store.upload import upload_folder, write_upload_folder
from fsad_core.data import Sample, load_category
from fsad_core.detector import Detector
from fsad_core.line import LineSplit, split_line
from fsad_core.metrics import image_auroc, rates_at_threshold

BASELINES = ("fast", "default")
LABELLER = "simulation"


@dataclass(frozen=True)
class DayRecord:
    day: int
    champion_version: str | None
    method: str | None
    labels_good: int
    labels_defect: int
    evidence: str | None
    benchmark_auroc: float | None  # the champion's, as the gate last saw it (`registry.belief`)
    benchmark_interval: list[float] | None
    heldout_auroc: float | None
    heldout_false_alarm_rate: float | None
    heldout_miss_rate: float | None
    estimated_escape_rate: float | None
    seconds: float


class HeldOut:
    """The held-out truth, decoded once, and how a version does on it."""

    def __init__(self, samples: list[Sample]):
        self.images = [s.image() for s in samples]
        self.labels = [s.label for s in samples]

    def measure(self, detector: Detector) -> tuple[float | None, float | None, float | None]:
        scores = detector.score(self.images).raw_scores
        rates = rates_at_threshold(self.labels, scores, detector.threshold.value)
        return image_auroc(self.labels, scores), rates["false_alarm_rate"], rates["miss_rate"]


def simulate(data: str, k: int, days: int, per_day: int, reviews: int, defect_share: float, seed: int,
             workdir: Path) -> dict[str, Any]:
    """The records of a simulated line (see the module docstring)."""
    category = load_category(data)
    split = split_line(category, k, seed, defect_share)
    held_out = HeldOut(split.held_out)
    if workdir.exists():
        shutil.rmtree(workdir)
    embedded = {"FSAD_HOME": str(workdir), "FSAD_STORAGE": str(workdir / "store"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    with environment(embedded), ephemeral_prefect(workdir / "prefect"), prefect_api():
        settings = load_settings()
        tracking.configure(settings)
        line = _Line(settings, "sim-" + "".join(c if c.isalnum() else "-" for c in category.name)[:40], workdir)
        started = time.monotonic()
        line.upload(split, seed, reviews)
        records = [line.record(0, held_out, time.monotonic() - started)]
        stream = list(split.stream)
        for day in range(1, days + 1):
            parts, stream = stream[:per_day], stream[per_day:]
            if not parts:
                break
            started = time.monotonic()
            line.run_day(day, parts, reviews, seed)
            records.append(line.record(day, held_out, time.monotonic() - started))
        baselines = {method: held_out.measure(_fitted(settings, method, seed, split))[0] for method in BASELINES}
    return {"records": [asdict(r) for r in records], "baselines": baselines,
            "setup": {"data": str(data), "k": k, "days": days, "per_day": per_day, "reviews": reviews,
                      "defect_share": defect_share, "seed": seed, "held_out": len(split.held_out),
                      "stream": len(split.stream)}}


def _fitted(settings: Settings, method: str, seed: int, split: LineSplit) -> Detector:
    config = training_config(method, seed, settings.train_overrides)
    return Detector.fit([s.image() for s in split.upload], config, device=settings.device)[0]


class _Line:
    """One product's line in the work folder: its store, its truth, and what it has done."""

    def __init__(self, settings: Settings, product: str, workdir: Path):
        self.settings, self.product, self.workdir = settings, product, workdir
        self.store = open_store(settings.storage_url)
        self.truth: dict[str, Sample] = {}  # image address -> the sample it is

    def upload(self, split: LineSplit, seed: int, reviews: int) -> None:
        """The product's settings (a day's draw into the queue is what people review that day), then
        the day-0 upload and its retraining."""
        self.store.put_json(training_key(self.product), {LOOP: {"reviews_per_run": reviews}})
        folder = write_upload_folder(self.workdir / "upload", [s.path for s in split.upload])
        upload_folder(self.store, self.product, folder)
        retrain_flow(self.product, seed=seed)

    def run_day(self, day: int, parts: list[Sample], reviews: int, seed: int) -> None:
        folder = self.workdir / "line" / f"day-{day}"
        folder.mkdir(parents=True)
        for i, sample in enumerate(parts):
            target = folder / f"{i:05d}{sample.path.suffix}"
            shutil.copyfile(sample.path, target)
            self.truth[str(target)] = sample
        if registry.deciding_alias(self.product) is not None:  # the candidate in shadow before a champion
            score_prefix_flow(self.product, str(folder))
            self.label(reviews)
        retrain_due_flow(None, seed)

    def label(self, reviews: int) -> None:
        """The first ``reviews`` images of the queue, in its order, labelled from the truth with their weights."""
        for item in queue_state(self.store, self.product).items[:reviews]:
            sample = self.truth[item.image]
            add_labels(self.store, self.product, [(item.image, sample.path.read_bytes())],
                       DEFECT if sample.label else GOOD, LABELLER, item.reason, drawn=drawn([item]))

    def record(self, day: int, held_out: HeldOut, seconds: float) -> DayRecord:
        state = queue_state(self.store, self.product)
        counts, escape = state.counts, state.escape
        version = registry.alias_version(self.product, registry.CHAMPION)
        if version is None:
            return DayRecord(day, None, None, counts[GOOD], counts[DEFECT], None, None, None, None, None, None,
                             None if escape is None else escape.rate, seconds)
        history = registry.versions(self.product)
        method = next(v.tags.get("method") for v in history if v.version == version)
        belief = registry.belief(history, version)
        detector = Detector.load(registry.download_model(f"models:/{registry.model_name(self.product)}/{version}"),
                                 device=self.settings.device)
        auroc, false_alarms, misses = held_out.measure(detector)
        return DayRecord(day, version, method, counts[GOOD], counts[DEFECT], belief.evidence, belief.auroc,
                         list(belief.interval) if belief.interval else None, auroc, false_alarms, misses,
                         None if escape is None else escape.rate, seconds)


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out AUROC and the gate's belief (benchmark AUROC with its interval) over the days."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in result["records"] if r["heldout_auroc"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    days = [r["day"] for r in records]
    ax.plot(days, [r["heldout_auroc"] for r in records], "o-", label="held-out AUROC (the truth)")
    believed = [r for r in records if r["benchmark_auroc"] is not None]
    ax.plot([r["day"] for r in believed], [r["benchmark_auroc"] for r in believed], "s--",
            label="benchmark AUROC (the gate's belief)")
    ranged = [r for r in believed if r["benchmark_interval"]]
    ax.fill_between([r["day"] for r in ranged], [r["benchmark_interval"][0] for r in ranged],
                    [r["benchmark_interval"][1] for r in ranged], alpha=0.2, label="its 90 % interval")
    baselines = sorted((auroc, method) for method, auroc in result["baselines"].items() if auroc is not None)
    for i, (auroc, method) in enumerate(baselines):  # the lower label below its line, the higher above
        ax.axhline(auroc, linestyle=":", linewidth=1, color="grey")
        ax.annotate(f"{method} on day 0", (days[0] if days else 0, auroc), fontsize=7, color="grey",
                    va="top" if i == 0 and len(baselines) > 1 else "bottom")
    ax.set_xlabel("day")
    ax.set_ylabel("AUROC")
    ax.set_title(f"{Path(result['setup']['data']).name}, seed {result['setup']['seed']}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_simulation(args: Any) -> int:
    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out.with_suffix(".work")
    result = simulate(args.data, args.k, args.days, args.per_day, args.reviews, args.defect_share, args.seed,
                      workdir.absolute())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, Path(args.plot))
    for r in result["records"]:
        print(f"day {r['day']}: champion v{r['champion_version']} held-out AUROC {r['heldout_auroc']} "
              f"benchmark {r['benchmark_auroc']} ({r['evidence']}) labels {r['labels_good']}+{r['labels_defect']} "
              f"{r['seconds']:.0f} s", file=sys.stderr)
    return 0
