"""What the product view reads from the registry's tags, and the warnings it raises."""

from flows.mlops.registry import VersionRecord
from flows.review.plot import auroc_svg
from flows.review.state import VersionRow, warnings
from flows.store.line_log import DayRate


def row(version: str, tags: dict[str, str]) -> VersionRow:
    return VersionRow.of(VersionRecord(version, 1_796_000_000_000, "run", tags))


def test_a_version_row_reads_the_gate_tags_and_leaves_out_what_is_not_a_number():
    labelled = row("4", {"method": "default", "gate.candidate_auroc": "0.912", "gate.candidate_auroc_low": "0.85",
                         "gate.candidate_auroc_high": "0.96", "gate.evidence": "labelled", "gate.verdict": "passed"})
    assert (labelled.auroc, labelled.interval, labelled.evidence) == (0.912, (0.85, 0.96), "labelled")
    old = row("1", {"benchmark_auroc": "nan", "gate.candidate_auroc_low": "n/a"})
    assert (old.auroc, old.interval, old.evidence, old.method) == (None, None, "synthetic", "?")


def test_warnings_name_a_failed_gate_a_champion_below_the_minimum_drift_and_a_growing_queue():
    failed = row("2", {"gate.verdict": "failed", "gate.reason": "AUROC 0.80 < champion 0.86",
                       "gate.champion_below_minimum": "true"})
    drifted = DayRate("20261206", 100, 30, (0.02, 0.08))
    found = warnings([row("1", {}), failed], [drifted], growing=True)
    assert found[0] == "the last retraining (v2) failed the gate: AUROC 0.80 < champion 0.86"
    assert "below the minimum" in found[1] and "30.0% on 20261206" in found[2] and "grown" in found[3]
    assert warnings([row("1", {"gate.verdict": "passed"})], [DayRate("20261206", 100, 5, (0.02, 0.08))],
                    growing=False) == []


def test_the_plot_marks_labelled_and_synthetic_evidence_and_is_empty_without_numbers():
    rows = [row("1", {"gate.candidate_auroc": "0.97"}),
            row("2", {"gate.candidate_auroc": "0.86", "gate.evidence": "labelled",
                      "gate.candidate_auroc_low": "0.8", "gate.candidate_auroc_high": "0.9"})]
    svg = auroc_svg(rows)
    assert svg.count('class="synthetic"') == 1 and svg.count('class="labelled"') == 1
    assert svg.count('class="interval"') == 1 and auroc_svg([row("1", {})]) == ""
