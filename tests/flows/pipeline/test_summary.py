"""The retraining's summary: the flow's JSON result reads back as the record it was written from."""

import json

from flows.pipeline.summary import (
    ALREADY_TRAINED,
    PROMOTED,
    GateSummary,
    RetrainSummary,
    ThresholdSummary,
    TrainedSummary,
    TrainingSummary,
)

IDENTITY = dict(product="washer", upload_id="u1", content_sha256="c" * 64, method="default", seed=0,
                config_sha256="f" * 64, validation="store/products/washer/uploads/u1/validation.json")


def _trained() -> RetrainSummary:
    trained = TrainedSummary("labelled", 4, {"benchmark_auroc": 0.97, "f1": 0.9},
                             ThresholdSummary(1.25, "normal_prediction_bound", 0.01),
                             TrainingSummary(224, 60, 64, "tf_efficientnet_lite0", "cpu"))
    return RetrainSummary(**IDENTITY, status=PROMOTED, message="version 2 passed the gate and is now champion",
                          version="2", run_id="r", model="models:/fsad-washer/2",
                          gate=GateSummary(True, "benchmark AUROC 0.97 >= 0.9", 0.9, 0.97, "1", 0.95),
                          aliases={"champion": "2", "previous": "1"}, trained=trained)


def test_a_summary_survives_the_json_of_a_flow_result_and_keeps_its_flat_fields():
    summary = _trained()
    result = json.loads(json.dumps(summary.to_dict()))
    assert result["status"] == PROMOTED and result["metrics"]["benchmark_auroc"] == 0.97
    assert result["threshold"]["rule"] == "normal_prediction_bound" and result["gate"]["champion_version"] == "1"
    assert RetrainSummary.from_dict(result) == summary and summary.champion == "2"


def test_an_already_trained_summary_has_no_measurements_and_says_so_in_few_lines():
    summary = RetrainSummary(**IDENTITY, status=ALREADY_TRAINED, message="already trained as version 2",
                             version="2", run_id="r", model="models:/fsad-washer/2",
                             gate=GateSummary(True, "recorded"), aliases={"champion": "2"})
    result = json.loads(json.dumps(summary.to_dict()))
    assert "metrics" not in result and RetrainSummary.from_dict(result) == summary
    assert summary.text().splitlines() == [
        "washer upload u1: already trained as version 2",
        'model     models:/fsad-washer/2  aliases {"champion": "2"}', "gate      passed: recorded"]
    assert "threshold 1.25 (normal_prediction_bound)" in _trained().text()
