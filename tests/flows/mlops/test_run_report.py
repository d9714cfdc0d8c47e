"""The run report is one static HTML file: every picture it shows is inside it."""

import io
import json

import numpy as np
from PIL import Image

from flows.mlops.run_report import GalleryItem, ReportContent, build_report, gallery_picks
from tests.html_pictures import pictures_of


def test_the_gallery_shows_the_highest_normals_and_the_highest_and_lowest_defects():
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    scores = [0.1, 0.9, 0.3, 0.5, 2.0, 0.2, 1.5, 3.0, 0.4, 1.0, 2.5]
    assert gallery_picks(labels, scores, per_role=2) == [
        ("worst normal", 1), ("worst normal", 3), ("best defect", 7), ("best defect", 10),
        ("worst defect", 5), ("worst defect", 8)]
    # with few defects none is shown twice
    assert gallery_picks([0, 1, 1], [0.1, 0.5, 0.7], per_role=3) == [
        ("worst normal", 0), ("best defect", 2), ("best defect", 1)]


def test_the_report_holds_the_verdict_rates_curves_and_overlays_inside_one_file():
    rng = np.random.default_rng(0)
    labels = [0] * 6 + [1] * 6
    scores = list(rng.normal(size=6)) + list(rng.normal(3, 1, size=6))
    image = np.full((48, 64, 3), 120, np.uint8)
    gallery = [GalleryItem(role, f"eval/{role}/{i}.png", scores[i], image, rng.random((48, 64)))
               for role, i in gallery_picks(labels, scores)]
    validation = json.dumps({"success": False, "failed": ["every file decodes as an image: a.png"],
                             "result": {"results": [{}, {}, {}]}})
    page = build_report(ReportContent(
        "washer: upload U1", "failed the gate", "version 2 failed the gate; champion stays v1",
        "AUROC 0.61 < 0.7 <script> (evidence: labelled)", "fast: 0.61 (0.5-0.7); default: 0.58 (0.45-0.7)",
        {"benchmark_auroc": 0.61, "false_alarm_rate": 0.02, "miss_rate": 0.4}, "labelled", labels, scores, 1.5,
        "normal_prediction_bound", 0.01, _png(image), [0.9, 0.7, 0.5], {"size": 224, "score": "patch"}, validation,
        gallery, anchor=0.8))
    assert "Verdict: failed the gate" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert "false_alarm_rate</th><td>0.02" in page and "miss_rate</th><td>0.4" in page
    assert "<b>The gate:</b> AUROC 0.61 &lt; 0.7" in page and "fast: 0.61 (0.5-0.7); default: 0.58" in page
    assert "the model's own score 1.5, set by the rule normal_prediction_bound; it expects to flag 1.00% of" in page
    assert "failed 1 of 3 checks: every file decodes as an image: a.png" in page and "&quot;size&quot;: 224" in page
    assert "the white mark, 0.5 and green, is the map level at which a part reaches the threshold" in page
    pictures = pictures_of(page)
    assert len(pictures) == 3 + len(gallery)  # ROC, histograms, one overlay per gallery image, the loss curve
    assert pictures[1].size[0] > 100 and all(p.size[1] == 48 for p in pictures[2:-1])


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
