"""The token, the signed session and the CSRF token of the review page, and its rate limit."""

import pytest

from flows.review.auth import RateLimit, ReviewAccessError, Sessions, server_token

TOKEN = "a-long-enough-token-1234"


def test_any_host_but_the_loopback_refuses_to_start_without_a_token_and_the_loopback_makes_one():
    with pytest.raises(ReviewAccessError, match="serving on 0.0.0.0 needs FSAD_REVIEW_TOKEN"):
        server_token("0.0.0.0", {})
    made, fresh = server_token("127.0.0.1", {})
    assert fresh and len(made) >= 16 and made != server_token("127.0.0.1", {})[0]
    assert server_token("0.0.0.0", {"FSAD_REVIEW_TOKEN": TOKEN}) == (TOKEN, False)
    with pytest.raises(ReviewAccessError, match="at least 16"):
        server_token("127.0.0.1", {"FSAD_REVIEW_TOKEN": "short"})


def test_a_session_names_its_operator_until_it_expires_and_a_forged_one_names_nobody():
    now = [1000.0]
    sessions = Sessions(TOKEN, clock=lambda: now[0])
    assert sessions.sign_in("ann", "wrong") is None
    cookie = sessions.sign_in("Ann Li", TOKEN)
    assert sessions.operator(cookie) == "Ann Li"
    forged = cookie.replace(cookie.split(".")[0], "Ym9i")  # "bob", with ann's signature
    assert sessions.operator(forged) is None and sessions.operator("") is None and sessions.operator("a.b") is None
    assert Sessions(TOKEN, clock=lambda: now[0]).operator(cookie) is None  # another server's key
    now[0] += 13 * 3600
    assert sessions.operator(cookie) is None


def test_the_csrf_token_belongs_to_its_session():
    sessions = Sessions(TOKEN)
    ann, bob = sessions.sign_in("ann", TOKEN), sessions.sign_in("bob", TOKEN)
    assert sessions.csrf_ok(ann, sessions.csrf(ann))
    assert not sessions.csrf_ok(ann, sessions.csrf(bob))
    assert not sessions.csrf_ok(ann, "") and not sessions.csrf_ok(None, sessions.csrf(ann))


def test_the_rate_limit_allows_a_burst_then_the_rate():
    now = [0.0]
    limit = RateLimit(per_second=2, burst=3, clock=lambda: now[0])
    assert [limit.allow("ann") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("bob")  # each operator has their own
    now[0] += 0.5
    assert limit.allow("ann") and not limit.allow("ann")
