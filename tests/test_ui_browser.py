"""The dashboard in a real chromium (selenium) against a real ``modelcache run`` with its import daemon.

One server for the module (``ui_run``); the tests run in order: an import dropped into the folder is
promoted through the Models page, then every page is looked at (and photographed) at a laptop's and a
phone's size. The later tests ask for ``tiny``, which finishes through the API what the first did not,
so one failure is reported once rather than by every test after it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from conftest import gguf_bytes
from modelcache.server.ui.filters import size
from ui_browser import (LAPTOP, PHONE, By, assert_no_console_errors, browser, needs_browser,  # noqa: F401 - fixtures
                        expected_conditions, screenshot, sign_in, ui_run, wait_for)

pytestmark = needs_browser

TINY = "acme/tiny/1/tiny.gguf"
PAGES = {"overview": "/ui/", "models": "/ui/models", "audit": "/ui/audit", "policy": "/ui/policy"}


def drop(import_dir, relative: str, content: bytes) -> None:
    """Put a file into the import folder the way a careful copy does: written aside, renamed in."""
    target = import_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.partial"
    temp.write_bytes(content)
    os.rename(temp, target)


def api(ui_run, method: str, path: str, role: str = "admin", body: dict | None = None) -> bytes:
    request = urllib.request.Request(f"{ui_run.base}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {ui_run.tokens[role]}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read()


@pytest.fixture
def tiny(ui_run) -> dict:
    """acme/tiny:1, imported through the folder and promoted: by the first test, or else here."""
    deadline = time.monotonic() + 30
    while not (found := json.loads(api(ui_run, "GET", "/v1/artifacts?model=tiny"))["artifacts"]):
        if not (ui_run.import_dir / TINY).exists():
            drop(ui_run.import_dir, TINY, gguf_bytes(n_floats=4096))
        assert time.monotonic() < deadline, ui_run.log_text()
        time.sleep(0.2)
    if found[0]["state"] != "promoted":
        api(ui_run, "POST", f"/v1/artifacts/{found[0]['id']}/promote")
    return json.loads(api(ui_run, "GET", f"/v1/artifacts/{found[0]['id']}"))


def row_state(driver, model: str) -> str | None:
    for row in driver.find_elements(By.CSS_SELECTOR, "#artifacts tbody tr"):
        if model in row.text:
            return row.get_attribute("data-state")
    return None


def test_an_import_appears_and_is_promoted_through_the_page(browser, ui_run):
    driver = browser(*LAPTOP)
    sign_in(driver, ui_run.base, ui_run.tokens["admin"])
    assert driver.current_url == f"{ui_run.base}/ui/"
    assert "ui-admin" in driver.find_element(By.CSS_SELECTOR, "header .who").text

    # imports stay staged, set on the Policy page like an admin would
    driver.get(f"{ui_run.base}/ui/policy")
    card = driver.find_element(By.ID, "pref-models-import-auto_promote")
    card.find_element(By.TAG_NAME, "summary").click()
    card.find_element(By.CSS_SELECTOR, "select[name=value] option[value=false], select[name=value] option:nth-child(2)").click()
    card.find_element(By.NAME, "reason").send_keys("review imports first")
    card.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(driver, expected_conditions.text_to_be_present_in_element(
        (By.CSS_SELECTOR, "main"), "models.import.auto_promote is now false (version 1)"))

    drop(ui_run.import_dir, TINY, gguf_bytes(n_floats=4096))
    deadline = time.monotonic() + 30
    while row_state(driver, "acme/tiny:1") is None:
        assert time.monotonic() < deadline, ui_run.log_text()
        driver.get(f"{ui_run.base}/ui/models")
        time.sleep(0.2)
    assert row_state(driver, "acme/tiny:1") == "staged"

    row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#artifacts tbody tr") if "acme/tiny:1" in r.text)
    row.find_element(By.LINK_TEXT, "Promote").click()
    wait_for(driver, expected_conditions.presence_of_element_located((By.ID, "confirm")))
    assert "Nodes will be able to pull it at once" in driver.find_element(By.TAG_NAME, "main").text
    driver.find_element(By.ID, "confirm").click()
    wait_for(driver, expected_conditions.text_to_be_present_in_element((By.CSS_SELECTOR, "main"), "Promoted tiny:1"))
    assert driver.current_url == f"{ui_run.base}/ui/models"
    assert row_state(driver, "acme/tiny:1") == "promoted"
    assert_no_console_errors(driver)


def test_the_overview_shows_usage_traffic_and_failed_imports(browser, ui_run, tiny):
    api(ui_run, "PUT", "/v1/preferences/models.cache.max_bytes", body={"value": 64 << 10, "reason": "a tiny disk"})
    artifact = tiny
    digest = artifact["digest"]
    for _ in range(3):  # three pulls by a node-like reader: the served bytes of the hour
        api(ui_run, "GET", f"/v1/blobs/{digest}", role="reader")
    drop(ui_run.import_dir, "acme/broken/1/broken.gguf", b"GGUF" + os.urandom(300))
    driver = browser(*LAPTOP)
    sign_in(driver, ui_run.base, ui_run.tokens["operator"])
    deadline = time.monotonic() + 30
    while "broken.gguf" not in driver.find_element(By.ID, "failed").text:
        assert time.monotonic() < deadline, ui_run.log_text()
        time.sleep(0.2)
        driver.get(f"{ui_run.base}/ui/")
    assert "Failed imports (1)" in driver.find_element(By.ID, "failed").text
    usage = driver.find_element(By.ID, "usage").text
    assert "of 64.0 KiB" in usage and "promoted 17." in usage
    assert f"served {size(3 * artifact['size_bytes'])}" in driver.find_element(By.ID, "traffic").text
    assert driver.find_element(By.CSS_SELECTOR, "[data-count=artifacts-promoted]").text == "1"
    assert "Ready" in driver.find_element(By.ID, "ready").text
    assert_no_console_errors(driver)


def test_a_reader_finds_no_admin_actions_and_forged_forms_are_refused(browser, ui_run, tiny):
    driver = browser(*LAPTOP)
    sign_in(driver, ui_run.base, ui_run.tokens["reader"], path="/ui/models")
    assert driver.current_url == f"{ui_run.base}/ui/models"
    assert row_state(driver, "acme/tiny:1") == "promoted"
    assert driver.find_elements(By.CSS_SELECTOR, "#artifacts .actions a") == []
    driver.get(f"{ui_run.base}/ui/policy")
    assert driver.find_elements(By.CSS_SELECTOR, "main form") == []
    artifact_id = None
    driver.get(f"{ui_run.base}/ui/models")
    link = driver.find_element(By.CSS_SELECTOR, "#artifacts tbody tr a")
    artifact_id = link.get_attribute("href").rsplit("/", 1)[1]
    assert_no_console_errors(driver)

    def post(action: str, with_csrf: bool) -> str:
        """Submit a form the page does not offer, built in the page (with the session's real CSRF token)."""
        driver.execute_script("""
            const [action, withCsrf] = arguments;
            const form = document.createElement("form");
            form.method = "post"; form.action = action;
            if (withCsrf) {
              const csrf = document.querySelector("input[name=csrf]").cloneNode();
              form.appendChild(csrf);
            }
            document.body.appendChild(form); form.submit();""", action, with_csrf)
        wait_for(driver, expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "main .error")))
        return driver.find_element(By.TAG_NAME, "main").text

    text = post(f"/ui/models/{artifact_id}/evict", with_csrf=True)
    assert "403" in driver.title and "model_artifact.evict needs role admin or operator" in text
    driver.get(f"{ui_run.base}/ui/models")
    text = post(f"/ui/models/{artifact_id}/evict", with_csrf=False)
    assert "403" in driver.title and "the form carried no CSRF token" in text
    driver.get(f"{ui_run.base}/ui/models")
    assert row_state(driver, "acme/tiny:1") == "promoted"  # nothing happened
    driver.get_log("browser")  # the two 403 documents are logged as failed loads: expected here


def test_every_page_at_a_laptop_and_a_phone_size(browser, ui_run, tiny):
    for (width, height) in (LAPTOP, PHONE):
        driver = browser(width, height)
        sign_in(driver, ui_run.base, ui_run.tokens["admin"])
        for name, path in PAGES.items():
            driver.get(f"{ui_run.base}{path}")
            wait_for(driver, expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "main h1")))
            # nothing wider than the window: a phone scrolls down, never sideways (tables scroll in their card)
            overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            wide = driver.execute_script("""
                return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right >
                    window.innerWidth + 1).slice(-3).map(e => e.tagName + '.' + e.className + '#' + e.id + ' ' +
                    Math.round(e.getBoundingClientRect().right))""")
            assert overflow <= 0, f"{path} is {overflow}px wider than a {width}px window: {wide}"
            screenshot(driver, f"{name}-{width}x{height}")
            assert_no_console_errors(driver)
        driver.get(f"{ui_run.base}/ui/models")
        driver.find_element(By.CSS_SELECTOR, "#artifacts tbody tr a").click()
        wait_for(driver, expected_conditions.presence_of_element_located((By.ID, "pull-1")))
        assert "/v1/blobs/sha256:" in driver.find_element(By.ID, "pull-1").text
        assert driver.find_element(By.CSS_SELECTOR, "button[data-copy]").is_displayed()  # ui.js ran
        screenshot(driver, f"artifact-{width}x{height}")
        assert_no_console_errors(driver)


def test_the_system_dark_mode_is_honoured(browser, ui_run):
    driver = browser(*LAPTOP)
    sign_in(driver, ui_run.base, ui_run.tokens["reader"])
    light = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                           {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    dark = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert light == "rgb(246, 247, 249)" and dark == "rgb(18, 22, 28)"
    for name, path in PAGES.items():
        driver.get(f"{ui_run.base}{path}")
        screenshot(driver, f"{name}-dark-1280x800")
    assert_no_console_errors(driver)


def test_pages_read_and_actions_work_without_javascript(browser, ui_run, tiny):
    driver = browser(*LAPTOP, javascript=False)
    sign_in(driver, ui_run.base, ui_run.tokens["operator"])
    for path in PAGES.values():
        driver.get(f"{ui_run.base}{path}")
        assert driver.find_element(By.CSS_SELECTOR, "main h1").text
    driver.get(f"{ui_run.base}/ui/models")
    row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#artifacts tbody tr") if "acme/tiny:1" in r.text)
    row.find_element(By.LINK_TEXT, "Pin").click()
    driver.find_element(By.ID, "confirm").click()
    wait_for(driver, expected_conditions.text_to_be_present_in_element((By.CSS_SELECTOR, "main"), "Pinned tiny:1"))
    row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#artifacts tbody tr") if "acme/tiny:1" in r.text)
    assert "pinned" in row.text
    row.find_element(By.CSS_SELECTOR, "td a").click()
    assert "/v1/blobs/sha256:" in driver.find_element(By.ID, "pull-1").text  # to select and copy by hand
    assert not driver.find_element(By.CSS_SELECTOR, "button[data-copy]").is_displayed()  # ui.js did not run
