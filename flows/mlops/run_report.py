"""A retraining run's report as one static HTML file, logged to MLflow beside the model.

It says what a quality engineer asks of a new model before trusting it: the verdict and why, the
ROC curve, the score histograms of normal and defect images with the threshold, the false-alarm
and miss rates, and overlays of the images that matter most (the normals scored highest, the
defects scored highest and lowest). Every picture is a PNG inside the file as a data: URI, so it
opens anywhere, offline, on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fsad_core.overlay import overlay, png_bytes
from fsad_core.units import AT_THRESHOLD

PER_ROLE = 3  # overlays of each kind in the gallery


@dataclass(frozen=True)
class GalleryItem:
    role: str          # "worst normal", "best defect", "worst defect" or "training image"
    name: str
    score: float
    image: np.ndarray  # HxWx3 uint8
    amap: np.ndarray   # HxW anomaly map at the image's size


def gallery_picks(labels: Sequence[int], scores: Sequence[float], per_role: int = PER_ROLE) -> list[tuple[str, int]]:
    """(role, index) of the images to show: the highest-scoring normals (the false alarms to come),
    the highest- and the lowest-scoring defects (what is caught, and what slips through)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    normals = [int(i) for i in order if labels[i] == 0]
    defects = [int(i) for i in order if labels[i] == 1]
    worst_defects = [i for i in defects[::-1][:per_role] if i not in defects[:per_role]]
    return ([("worst normal", i) for i in normals[:per_role]] + [("best defect", i) for i in defects[:per_role]]
            + [("worst defect", i) for i in worst_defects])


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def histogram_png(labels: Sequence[int], scores: Sequence[float], threshold: float) -> bytes:
    """Score histograms of the normal and the defect images on shared bins, the threshold a line."""
    from matplotlib.figure import Figure

    labels_arr, scores_arr = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    bins = np.histogram_bin_edges(np.append(scores_arr, threshold), bins=30)
    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot()
    for label, name, colour in ((0, "normal", "tab:blue"), (1, "defect", "tab:red")):
        if (labels_arr == label).any():
            ax.hist(scores_arr[labels_arr == label], bins=bins, alpha=0.6, label=name, color=colour)
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="score (fsad's unit)", ylabel="images")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


@dataclass(frozen=True)
class ReportContent:
    """What a retraining's report shows, gathered by the run that wrote it."""

    title: str
    verdict: str  # "passed the gate" or "failed the gate"
    outcome: str  # what happened to the version (promoted, held, kept the champion)
    gate_reason: str  # the gate's own reason, with the evidence it stood on
    candidates: str  # which candidate methods were compared and why this one
    rates: dict[str, float]
    benchmark: str  # the benchmark's kind: labelled, or synthetic anomalies
    labels: Sequence[int]
    scores: Sequence[float]  # in the score unit, where the threshold is 0.5
    threshold: float  # the model's own threshold, in its own score
    threshold_rule: str
    expected_false_alarm_rate: float | None
    roc_png: bytes | None
    loss: Sequence[float]  # the fine-tuning loss by step ([] without fine-tuning)
    configuration: dict  # the fitted model's DetectorConfig
    validation: str  # the upload's validation report (JSON), summarised
    gallery: Sequence[GalleryItem]
    anchor: float  # the map level of the threshold: the middle of the overlays' shared colour scale


def loss_png(loss: Sequence[float]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(1, len(loss) + 1), loss, color="tab:blue")
    ax.set(xlabel="fine-tuning step", ylabel="loss", title="fine-tuning loss")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def validation_summary(report_json: str) -> str:
    """One line: whether the upload passed its checks, and the failed ones by name."""
    try:
        report = json.loads(report_json)
        failed = report.get("failed") or []
        checked = len(report.get("result", {}).get("results", []))
    except (ValueError, AttributeError):
        return "no validation report"
    return (f"passed all {checked} checks" if report.get("success") else
            f"failed {len(failed)} of {checked} checks: " + "; ".join(map(str, failed)))


def build_report(content: ReportContent) -> str:
    """The whole HTML document, every picture inside it; every text from the run escaped."""
    c, e = content, html.escape
    rows = "".join(f"<tr><th>{e(name)}</th><td>{value:.4g}</td></tr>" for name, value in c.rates.items())
    figures = [_img(histogram_png(c.labels, c.scores, AT_THRESHOLD), "score histograms")]
    if c.roc_png is not None:
        figures.insert(0, _img(c.roc_png, "ROC curve"))
    expected = "" if c.expected_false_alarm_rate is None else (
        f"; it expects to flag {c.expected_false_alarm_rate:.2%} of normal parts")
    cards = "".join(
        f'<figure>{_img(png_bytes(overlay(item.image, item.amap, c.anchor)), item.name)}'
        f"<figcaption>{e(item.role)}: {e(item.name)}, score {item.score:.4g}</figcaption></figure>"
        for item in c.gallery)
    loss = _img(loss_png(c.loss), "fine-tuning loss") if c.loss else "<p>no fine-tuning</p>"
    config = e(json.dumps(c.configuration, indent=1, sort_keys=True))
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{e(c.title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:0.5em}"
            "img{max-width:420px}td,th{padding:0.2em 1em;text-align:left}pre{background:#f4f4f4;padding:1em}"
            "</style></head><body>"
            f"<h1>{e(c.title)}</h1><h2>Verdict: {e(c.verdict)}</h2><p>{e(c.outcome)}</p>"
            f"<p><b>The gate:</b> {e(c.gate_reason)}</p><p><b>Candidates:</b> {e(c.candidates)}</p>"
            f"<h2>Benchmark: {e(c.benchmark)}</h2><table>{rows}</table>{''.join(figures)}"
            f"<h2>Threshold</h2><p>Scores are in fsad's score unit, where the threshold reads {AT_THRESHOLD:g}; "
            f"it is the model's own score {c.threshold:.4g}, set by the rule {e(c.threshold_rule)}{expected}.</p>"
            f"<h2>Overlays</h2><p>One colour scale for all, read by the colour bar in the score unit: the white "
            f"mark, {AT_THRESHOLD:g} and green, is the map level at which a part reaches the threshold; yellow to "
            f"red is past it, up to {2 * AT_THRESHOLD:g} and above; blue below it.</p>{cards}"
            f"<h2>Training</h2>{loss}<h2>Validation of the upload</h2><p>{e(validation_summary(c.validation))}</p>"
            f"<h2>Configuration</h2><pre>{config}</pre></body></html>")
