import threading
import time

import pytest

from fsad_core.budget import MemoryBudget


def test_a_share_waits_while_others_hold_the_budget_and_is_refused_when_the_wait_runs_out():
    budget = MemoryBudget(100)
    with budget.share(70, wait_s=0) as first:
        assert first and budget.held == 70
        with budget.share(40, wait_s=0.2) as second:
            assert not second and budget.held == 70  # refused: nothing taken
        with budget.share(30, wait_s=0) as third:
            assert third and budget.held == 100
    assert budget.held == 0


def test_a_waiting_share_is_granted_when_the_holder_lets_go():
    budget, events = MemoryBudget(100), []

    def hold() -> None:
        with budget.share(80, wait_s=0):
            events.append("held")
            time.sleep(0.5)
        events.append("released")

    holder = threading.Thread(target=hold)
    holder.start()
    while not events:
        time.sleep(0.01)
    with budget.share(50, wait_s=5) as granted:
        events.append("granted" if granted else "refused")
    holder.join()
    assert events == ["held", "released", "granted"]


def test_a_share_above_the_whole_budget_is_never_granted():
    with pytest.raises(ValueError, match="101 bytes asked of a budget of 100"):
        with MemoryBudget(100).share(101, wait_s=0):
            pass
    with pytest.raises(ValueError, match="at least one byte"):
        MemoryBudget(0)
