"""The review page in the system's headless Chromium: sign in, label by keyboard, undo, and what a
browser without the session or the form's CSRF token cannot do. `.ci/run` installs Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from flows.review.screenshots import chromium
from flows.store.labels import current_labels, label_history
from tests.flows.review.conftest import HOSTILE, PRODUCT, TOKEN

pytestmark = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                reason="no Debian chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture
def browser(tmp_path: Path):
    driver = chromium(tmp_path / "chromium")
    yield driver
    driver.quit()


def press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def counts_become(driver, text: str) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The page reloads after each label: the element read may be the old page's.
    wait = WebDriverWait(driver, 15, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    wait.until(lambda d: d.find_element(By.ID, "counts").text == text)


def test_an_operator_signs_in_labels_three_cards_by_keyboard_and_undoes_one(browser, served, line):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    browser.get(f"{served}/p/{PRODUCT}/queue")
    browser.find_element(By.ID, "name").send_keys("Ann Li")
    browser.find_element(By.ID, "token").send_keys(TOKEN + "\n")
    counts_become(browser, "6 to review · labelled 0 good, 0 defect")
    press(browser, "g")
    counts_become(browser, "5 to review · labelled 1 good, 0 defect")
    press(browser, "s")  # skip: the next card, nothing written
    press(browser, "g")
    counts_become(browser, "4 to review · labelled 2 good, 0 defect")
    press(browser, "d")
    press(browser, "scratch\n")
    counts_become(browser, "3 to review · labelled 2 good, 1 defect")
    press(browser, "u")
    counts_become(browser, "4 to review · labelled 2 good, 0 defect")
    labels = current_labels(line.store, PRODUCT)
    assert sorted((e.label, e.by) for e in labels.values()) == [("good", "Ann Li"), ("good", "Ann Li")]

    browser.get(f"{served}/p/{PRODUCT}/queue?view=grid")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "figcaption.name")]
    assert HOSTILE in names  # shown as text: no element made of it, no script run
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    assert browser.find_elements(By.CSS_SELECTOR, "img[src='x']") == []

    written = len(label_history(line.store, PRODUCT))
    cookie = {"fsad_review": browser.get_cookie("fsad_review")["value"]}
    card = [i.id for i in line.items if i.image not in {e.source for e in labels.values()}][0]
    form = {"item": card, "label": "defect", "view": "card", "at": "0"}
    csrf = browser.find_element(By.CSS_SELECTOR, "form.good input[name=csrf]").get_attribute("value")
    with httpx.Client(base_url=served) as stranger, httpx.Client(base_url=served, cookies=cookie) as forged_form:
        assert stranger.post(f"/p/{PRODUCT}/label", data={**form, "csrf": csrf}).status_code == 401  # no cookie
        assert forged_form.post(f"/p/{PRODUCT}/label", data=form).status_code == 403  # no CSRF token
        assert forged_form.post(f"/p/{PRODUCT}/undo", data={}).status_code == 403
    assert len(label_history(line.store, PRODUCT)) == written
