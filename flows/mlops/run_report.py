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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fsad_core.overlay import overlay, png_bytes

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
    ax.set(xlabel="anomaly score", ylabel="images")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def build_report(title: str, verdict: str, reason: str, rates: dict[str, float], benchmark: str,
                 labels: Sequence[int], scores: Sequence[float], threshold: float, roc_png: bytes | None,
                 gallery: Sequence[GalleryItem], anchor: float) -> str:
    """The whole HTML document; `anchor` is the map level of the overlays' shared colour scale."""
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>{value:.4g}</td></tr>" for name, value in rates.items())
    figures = [_img(histogram_png(labels, scores, threshold), "score histograms")]
    if roc_png is not None:
        figures.insert(0, _img(roc_png, "ROC curve"))
    cards = "".join(
        f'<figure>{_img(png_bytes(overlay(item.image, item.amap, anchor)), item.name)}'
        f"<figcaption>{html.escape(item.role)}: {html.escape(item.name)}, score {item.score:.4g}</figcaption></figure>"
        for item in gallery)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:0.5em}"
            "img{max-width:420px}td,th{padding:0.2em 1em;text-align:left}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><h2>Verdict: {html.escape(verdict)}</h2><p>{html.escape(reason)}</p>"
            f"<h2>Benchmark: {html.escape(benchmark)}</h2><table>{rows}</table>{''.join(figures)}"
            f"<h2>Overlays</h2><p>One colour scale for all: red is past the level at which a part is flagged "
            f"({anchor:.4g}, the white mark on each colour bar).</p>{cards}</body></html>")
