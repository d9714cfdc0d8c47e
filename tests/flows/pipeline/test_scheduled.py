"""The nightly sweep's decision per product (no I/O): what makes a product due and what does not."""

import pytest

from flows.pipeline.scheduled import plan_for

U1, U2 = "20260101T000001Z-a", "20260102T000001Z-b"
OLD, NEW = "a" * 64, "b" * 64
NEWS = (NEW, "c" * 64)  # the candidates' configurations


@pytest.mark.parametrize(("args", "due", "reason"), [
    ((None, False, None, None, None), None, "no complete upload"),
    ((U2, True, None, "1", U1), None, "rejected by validation"),
    ((U2, False, "3", "1", U1, OLD, NEWS), None, "already trained as version 3"),
    ((U1, False, None, None, None), U1, "no champion yet"),
    ((U2, False, None, "1", U1, NEW, NEWS), U2, "newer than champion v1"),
    ((U1, False, None, "1", U1, NEW, NEWS), None, "trained on the latest upload"),
    ((U1, False, None, "1", U1, OLD, NEWS), U1, "configuration changed since champion v1"),
    ((U1, False, None, "1", U1, NEWS[1], NEWS), None, "trained on the latest upload"),  # the other candidate
    ((U1, False, None, "1", U1, None, NEWS), None, "trained on the latest upload"),  # a champion without the tag
    ((U1, False, None, "1", U1, NEW, NEWS, "none", OLD), U1, "labels changed since champion v1"),
    ((U1, False, None, "1", U1, NEW, NEWS, OLD, OLD), None, "trained on the latest upload"),
])
def test_decide(args, due, reason):
    plan = plan_for("washer", *args)
    assert plan.upload_id == due and reason in plan.reason
