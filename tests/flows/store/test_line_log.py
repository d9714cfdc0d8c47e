"""The line log: the flag rate per day with its usual band, drift, and a queue that keeps growing."""

import logging

from flows.store.line_log import LineRun, flag_rates_by_day, line_runs, line_runs_prefix, queue_growing, record_line_run
from flows.store.storage import LocalStore


def run(day: str, scored: int, flagged: int, queued: int = 10) -> LineRun:
    return LineRun(f"{day}T120000.000000Z", "1", scored, flagged, 0, queued)


def test_a_day_outside_the_band_of_the_days_before_is_drift_and_a_small_day_may_swing_further():
    steady = [run(f"2026120{d}", 200, 10) for d in range(1, 6)]  # 5 % a day
    days = flag_rates_by_day([*steady, run("20261206", 200, 30)])
    assert days[0].usual is None and not any(d.drifted for d in days[:-1])
    assert days[-1].rate == 0.15 and days[-1].drifted
    assert not flag_rates_by_day([*steady, run("20261206", 10, 2)])[-1].drifted  # 2 in 10: within chance


def test_runs_of_one_day_add_up_and_a_quiet_line_flags_its_first_flags():
    days = flag_rates_by_day([run("20261201", 100, 0), run("20261201", 100, 0), run("20261202", 200, 12)])
    assert [(d.day, d.scored, d.flagged) for d in days] == [("20261201", 200, 0), ("20261202", 200, 12)]
    assert days[1].drifted


def test_a_queue_longer_after_each_of_the_last_runs_is_growing():
    assert queue_growing([run("20261201", 1, 0, q) for q in (5, 8, 12, 20)])
    assert not queue_growing([run("20261201", 1, 0, q) for q in (5, 8, 8, 20)])
    assert not queue_growing([run("20261201", 1, 0, q) for q in (8, 12, 20)])


def test_runs_are_kept_in_order_and_a_corrupt_record_is_skipped_with_a_warning(tmp_path, caplog):
    store = LocalStore(tmp_path)
    record_line_run(store, "washer", "3", 60, 4, 1, 24)
    store.put_bytes(line_runs_prefix("washer") + "20990101T000000.000000Z-bad.json", b"{not json")
    with caplog.at_level(logging.WARNING):
        [kept] = line_runs(store, "washer")
    assert (kept.version, kept.scored, kept.flagged, kept.unreadable, kept.queued) == ("3", 60, 4, 1, 24)
    assert "not a line run" in caplog.text
