"""The review page in process: who may do what, what is written, and what is shown."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from flows.mlops import control, registry
from flows.review import app as review_app_module
from flows.review.serve import review_app
from flows.store.labels import current_labels, label_history
from flows.store.storage import StorageError
from tests.flows.review.conftest import HOSTILE, PRODUCT, TOKEN, Line

QUEUE = f"/p/{PRODUCT}/queue"


@pytest.fixture
def client(line: Line) -> TestClient:
    return TestClient(review_app(TOKEN, line.storage_url, ""), follow_redirects=False)


def signin_csrf(client: TestClient) -> str:
    return re.search(r'<form class="signin".*?name="csrf" value="([0-9a-f]+)"', client.get("/signin").text,
                     re.S).group(1)


def sign_in(client: TestClient, name: str = "ann") -> str:
    """Signs in; the CSRF token of the session's forms."""
    answer = client.post("/signin", data={"name": name, "token": TOKEN, "next": QUEUE, "csrf": signin_csrf(client)})
    assert answer.status_code == 303 and answer.headers["location"] == QUEUE
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    return re.search(r'name="csrf" value="([0-9a-f]+)"', client.get(QUEUE).text).group(1)


def label(client: TestClient, csrf: str | None, item: str, value: str = "good", **extra: str):
    form = {"item": item, "label": value, "view": "card", "at": "0", **extra}
    return client.post(f"/p/{PRODUCT}/label", data=form if csrf is None else {**form, "csrf": csrf})


def test_without_a_session_pages_ask_to_sign_in_and_posts_are_refused_writing_nothing(client, line):
    assert client.get(QUEUE).headers["location"] == f"/signin?next={QUEUE}"
    assert label(client, "0" * 64, line.items[0].id).status_code == 401
    assert client.post("/signin", data={"name": "ann", "token": "wrong", "next": "/",
                                        "csrf": signin_csrf(client)}).status_code == 403
    assert label_history(line.store, PRODUCT) == []


def test_a_sign_in_without_the_forms_csrf_token_is_refused_and_opens_no_session(client):
    stranger = TestClient(client.app, follow_redirects=False)  # never saw the form: no nonce, no token
    answer = stranger.post("/signin", data={"name": "ann", "token": TOKEN, "next": "/", "csrf": "0" * 64})
    assert answer.status_code == 403 and "fsad_review=" not in answer.headers.get("set-cookie", "")
    client.get("/signin")
    answer = client.post("/signin", data={"name": "ann", "token": TOKEN, "next": "/"})  # the nonce, no token
    assert answer.status_code == 403 and "fsad_review=" not in answer.headers.get("set-cookie", "")


def test_a_post_without_the_sessions_csrf_token_is_refused_and_writes_nothing(client, line):
    sign_in(client)
    assert label(client, None, line.items[0].id).status_code == 403
    assert label(client, "0" * 64, line.items[0].id).status_code == 403
    assert client.post(f"/p/{PRODUCT}/undo", data={}).status_code == 403
    assert label_history(line.store, PRODUCT) == []


def test_a_label_names_the_operator_and_why_the_card_was_queued_and_undo_retracts_it(client, line):
    csrf = sign_in(client, "Ann Li")
    first, second = line.items[0], line.items[1]
    assert label(client, csrf, first.id).headers["location"] == f"{QUEUE}?view=card&at=0"
    assert label(client, csrf, second.id, "defect", defect_type="scratch").status_code == 303
    labels = {e.source: e for e in current_labels(line.store, PRODUCT).values()}
    assert {(e.label, e.by, e.reason, e.defect_type) for e in labels.values()} == {
        ("good", "Ann Li", first.reason, ""), ("defect", "Ann Li", second.reason, "scratch")}
    page = client.get(QUEUE).text
    assert "4 to review · labelled 1 good, 1 defect" in page and '<option value="scratch">' in page
    assert client.post(f"/p/{PRODUCT}/undo", data={"csrf": csrf, "view": "card", "at": "0"}).status_code == 303
    assert [e.label for e in current_labels(line.store, PRODUCT).values()] == ["good"]
    assert "5 to review · labelled 1 good, 0 defect" in client.get(QUEUE).text
    assert label(client, csrf, first.id).status_code == 409  # labelled: it left the queue


def test_undo_takes_back_only_the_operators_own_label(client, line):
    bob = TestClient(client.app, follow_redirects=False)
    assert label(bob, sign_in(bob, "bob"), line.items[0].id).status_code == 303
    csrf = sign_in(client, "ann")
    assert client.post(f"/p/{PRODUCT}/undo", data={"csrf": csrf}).status_code == 409
    assert len(current_labels(line.store, PRODUCT)) == 1


def test_a_hostile_file_name_shows_as_text(client, line):
    sign_in(client)
    page = client.get(f"{QUEUE}?view=grid").text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert HOSTILE in [i.image.rsplit("/", 1)[1] for i in line.items]


def test_pictures_are_found_by_version_and_card_id_only_without_reading_the_queue(client, line, monkeypatch):
    sign_in(client)
    item, version = line.items[0].id, line.items[0].version
    page = client.get(f"{QUEUE}?view=grid").text
    assert f"/p/{PRODUCT}/picture/{version}/{item}/thumb" in page
    monkeypatch.setattr("flows.store.queue.read_queue", lambda *a: pytest.fail("a picture read the queue"))
    answer = client.get(f"/p/{PRODUCT}/picture/{version}/{item}/overlay")
    assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    here = f"/p/{PRODUCT}/picture"
    for path in (f"{here}/{version}/{'0' * 32}/thumb", f"{here}/{version}/{item}/queue.json",
                 f"{here}/9{version}/{item}/thumb", f"{here}/..%2F{version}/{item}/thumb",
                 f"/p/..%2Fother/picture/{version}/{item}/thumb", f"{here}/{version}/..%2F..%2Fqueue/thumb"):
        assert client.get(path).status_code == 404, path


def test_a_body_over_the_limit_is_refused_and_writes_nothing(client, line):
    csrf = sign_in(client)
    answer = label(client, csrf, line.items[0].id, defect_type="x" * 20_000)
    assert answer.status_code == 413 and label_history(line.store, PRODUCT) == []


def test_labels_beyond_the_operators_rate_are_refused(line):
    """With the clock held still, so that no token comes back however slowly the machine answers."""
    from flows.review.app import Review, create_app
    from flows.review.auth import RateLimit, Sessions
    from flows.review.serve import LABEL_BURST, LABELS_PER_SECOND
    from flows.store.storage import open_store

    still = RateLimit(LABELS_PER_SECOND, LABEL_BURST, clock=lambda: 0.0)
    client = TestClient(create_app(Review(open_store(line.storage_url), Sessions(TOKEN), still, RateLimit(1, 10))),
                        follow_redirects=False)
    csrf = sign_in(client)  # a burst of 20 (serve.LABEL_BURST), spent on a card that is not there
    codes = [label(client, csrf, "f" * 32).status_code for _ in range(25)]
    assert codes[:20] == [409] * 20 and set(codes[20:]) == {429}


def test_a_fault_of_the_store_is_one_line_on_the_page_and_a_label_given_stays(client, line, monkeypatch):
    csrf = sign_in(client)
    assert label(client, csrf, line.items[0].id).status_code == 303

    def broken(*args, **kwargs):
        raise StorageError("s3://line/queue.json: connection refused\nsecond line")

    monkeypatch.setattr(type(line.store), "get_bytes", broken)
    answer = client.get(QUEUE)
    assert answer.status_code == 503
    [message] = re.findall(r'<p class="fault" role="alert">(.*?)</p>', answer.text, re.S)
    assert message == "the store or the registry failed: s3://line/queue.json: connection refused"
    monkeypatch.undo()
    assert len(current_labels(line.store, PRODUCT)) == 1


def test_sign_in_goes_back_only_to_a_page_of_this_site(client):
    for target, expected in (("//evil.example/x", "/"), ("https://evil.example", "/"), (QUEUE, QUEUE)):
        answer = client.post("/signin", data={"name": "ann", "token": TOKEN, "next": target,
                                              "csrf": signin_csrf(client)})
        assert answer.headers.get("location") == expected, (answer.status_code, answer.text[-300:])


def test_the_product_view_shows_versions_evidence_and_the_failed_gate(client, line):
    sign_in(client)
    page = client.get(f"/p/{PRODUCT}").text
    assert "v2 · fast" in page and "0.860 (0.810-0.890) · labelled" in page
    assert "the last retraining (v3) failed the gate: failed on labelled evidence" in page
    assert page.count('class="labelled"') == 2 and page.count('class="synthetic"') == 1  # the plot's points


def test_actions_need_the_confirmation_and_are_recorded_with_the_operator(client, line):
    csrf = sign_in(client, "ann")
    form = {"csrf": csrf, "action": "promote", "version": "1", "why": "v1 caught the dent"}
    assert client.post(f"/p/{PRODUCT}/control", data=form).status_code == 400
    assert registry.aliases(PRODUCT)["champion"] == "2"
    assert client.post(f"/p/{PRODUCT}/control", data={**form, "confirm": "yes"}).status_code == 303
    assert registry.aliases(PRODUCT)["champion"] == "1"
    [action] = control.action_log(line.store, PRODUCT)
    assert (action.action, action.by, action.why) == ("promote", "ann", "v1 caught the dent")


def test_every_answer_carries_the_content_policy(client):
    answer = client.get("/signin")
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert answer.headers["x-frame-options"] == "DENY"
    assert f"{review_app_module.COOKIE}=" not in answer.headers.get("set-cookie", "")  # no session before sign-in


def test_a_slow_store_call_holds_up_no_other_operators_request(line, served, monkeypatch):
    """Handlers run in worker threads: one card's picture waiting on the store leaves the page
    answering everyone else."""
    import threading
    import time

    import httpx

    real = type(line.store).get_bytes

    def slow(self, key):
        if key.endswith("-overlay.png"):
            time.sleep(2.0)
        return real(self, key)

    monkeypatch.setattr(type(line.store), "get_bytes", slow)
    with httpx.Client(base_url=served) as browser:
        csrf = re.search(r'<form class="signin".*?name="csrf" value="([0-9a-f]+)"', browser.get("/signin").text,
                         re.S).group(1)
        signed = browser.post("/signin", data={"name": "ann", "token": TOKEN, "next": "/", "csrf": csrf})
        assert signed.status_code == 303
        picture = f"/p/{PRODUCT}/picture/{line.items[0].version}/{line.items[0].id}/overlay"
        waiting = threading.Thread(target=browser.get, args=(picture,))
        waiting.start()
        time.sleep(0.3)
        start = time.perf_counter()
        assert browser.get(f"/p/{PRODUCT}/queue").status_code == 200
        assert time.perf_counter() - start < 1.5  # held up, it would wait out the 2 s call
        waiting.join()
