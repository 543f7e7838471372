"""The Downloads and Nodes pages in a real chromium against a real ``modelcache run``: a download
approved in the page is watched to 100 % without a reload, from a real upstream (nginx on loopback,
rate-limited so the transfer takes seconds); a rejection with a reason; a node's report changes a
cell of the Nodes grid without a reload; the live script stops while the tab is hidden; no console
errors; screenshots of both pages at 1280x800 and 390x844."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import gguf_bytes
from test_downloads import NGINX, Nginx, put
from ui_browser import (LAPTOP, PHONE, By, assert_no_console_errors, browser, needs_browser,  # noqa: F401 - fixtures
                        screenshot, sign_in, ui_run, wait_for)

pytestmark = [needs_browser, pytest.mark.skipif(NGINX is None, reason="Debian's nginx is not installed")]

SIZES = ((LAPTOP, "1280x800"), (PHONE, "390x844"))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """nginx serving files on loopback; ``/slower/`` sends 1 MB/s, so a few MB take seconds."""
    root = tmp_path_factory.mktemp("upstream")
    (root / "www" / "files").mkdir(parents=True)
    (root / "nginx").mkdir()
    root.chmod(0o755)
    server = Nginx(root / "www", root / "nginx")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ui_config(upstream) -> str:
    return f'[sources.local]\nkind = "http"\nurl = "{upstream.url}"\n\n[downloads]\npoll_seconds = 0.2\n'


def api(run, method: str, path: str, role: str = "admin", body=None, token: str | None = None,
        data: bytes | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token or run.tokens[role]}"}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(run.base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def downloads_allowed(ui_run):
    for key, value in (("models.download.allowed_sources", ["local"]),
                       ("models.download.require_user_approval", True)):
        status, body = api(ui_run, "PUT", f"/v1/preferences/{key}", body={"value": value})
        assert status == 200, body


def ask(run, upstream, name: str, size: int) -> dict:
    """The operator asks for a GGUF of about ``size`` bytes from ``/slower/``; it waits for approval."""
    content = gguf_bytes(n_floats=size // 4)
    digest = put(upstream, name, content)
    status, body = api(run, "POST", "/v1/downloads", "operator",
                       body={"source": "local", "reference": f"slower/files/{name}", "model": name.split(".")[0],
                             "version": "1", "sha256": digest})
    assert status == 202 and body["state"] == "pending_approval", body
    return body


def row(driver, download_id: str):
    return driver.find_element(By.ID, f"dl-{download_id}")


def act(driver, action) -> None:
    """Do ``action(driver)`` again if live.js replaced the element under it meanwhile (a row is swapped
    when any of its text changes, e.g. its age, until the user works in it)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 5, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: action(d) or True)


def seen(driver, download_id: str) -> dict:
    """A download's row as the page shows it now, read in one go (live.js replaces rows as they change)."""
    return driver.execute_script("""
        const row = document.getElementById(arguments[0]);
        const bar = row.querySelector("progress");
        return {state: row.querySelector("[data-cell=state]").textContent, text: row.innerText,
                value: Number(bar && bar.getAttribute("value") || 0), max: Number(bar && bar.getAttribute("max") || 0)};
    """, f"dl-{download_id}")


def test_approve_a_download_and_watch_it_reach_100_percent(browser, ui_run, upstream, downloads_allowed):
    # company for the picture: one that completed before, one that waits
    small = ask(ui_run, upstream, "small.gguf", 256 << 10)
    status, _ = api(ui_run, "POST", f"/v1/downloads/{small['id']}/approve")
    assert status == 200
    ask(ui_run, upstream, "waiting.gguf", 64 << 10)
    asked = ask(ui_run, upstream, "watched.gguf", 6 << 20)
    driver = browser(*LAPTOP)
    sign_in(driver, ui_run.base, ui_run.tokens["admin"], "/ui/downloads")
    assert seen(driver, asked["id"])["state"] == "pending approval"
    act(driver, lambda d: row(d, asked["id"]).find_element(By.CSS_SELECTOR, "button[name=approve]").click())
    wait_for(driver, lambda d: "approved" in " ".join(n.text for n in d.find_elements(By.CSS_SELECTOR, "p.notice")))
    driver.execute_script("window.notReloaded = true;")  # gone if the page were loaded again

    # the bar moves while the bytes arrive: seen part-way at least once, with a rate and an ETA
    wait_for(driver, lambda d: 0 < seen(d, asked["id"])["value"] < seen(d, asked["id"])["max"]
             and "/s · ETA" in seen(d, asked["id"])["text"], timeout=30)
    now = seen(driver, asked["id"])
    assert now["state"] == "running" and "of 6.0 MiB" in now["text"], now
    # exactly 1280x800 of page, from its top: docs/ui-downloads.png is one of these
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    driver.execute_script("window.scrollTo(0, 0);")
    screenshot(driver, "downloads-running-1280x800", full_page=False)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    wait_for(driver, lambda d: seen(d, asked["id"])["state"] == "completed", timeout=60)
    now = seen(driver, asked["id"])
    assert now["value"] == now["max"] > 6 << 20 and "100.0 %" in now["text"], now
    assert driver.execute_script("return window.notReloaded === true;")
    status, body = api(ui_run, "GET", f"/v1/downloads/{asked['id']}")
    assert body["state"] == "completed" and body["approved_by"] == "token:ui-admin" and body["digest"]
    assert_no_console_errors(driver)


def test_reject_a_download_with_a_reason(browser, ui_run, upstream, downloads_allowed):
    asked = ask(ui_run, upstream, "unwanted.gguf", 64 << 10)
    driver = browser(*LAPTOP)
    sign_in(driver, ui_run.base, ui_run.tokens["admin"], "/ui/downloads?state=pending_approval")
    act(driver, lambda d: row(d, asked["id"]).find_element(By.NAME, "reason").send_keys("use the Q5 file"))
    time.sleep(1.5)  # live.js refreshes meanwhile: the reason being typed must survive it
    assert row(driver, asked["id"]).find_element(By.NAME, "reason").get_attribute("value") == "use the Q5 file"
    row(driver, asked["id"]).find_element(By.CSS_SELECTOR, "button[name=reject]").click()
    wait_for(driver, lambda d: "rejected" in " ".join(n.text for n in d.find_elements(By.CSS_SELECTOR, "p.notice")))
    driver.get(f"{ui_run.base}/ui/downloads?state=rejected")
    text = seen(driver, asked["id"])["text"]
    assert "rejected" in text and "use the Q5 file" in text and "ui-admin" in text
    assert driver.execute_script("return document.querySelectorAll(arguments[0]).length;",
                                 f"#dl-{asked['id']} button") == 0  # nothing left to do
    status, body = api(ui_run, "GET", f"/v1/downloads/{asked['id']}")
    assert (body["state"], body["reason"]) == ("rejected", "use the Q5 file")
    assert_no_console_errors(driver)


def test_an_operator_is_offered_no_approval_and_the_pages_fit_a_phone(browser, ui_run, upstream, downloads_allowed):
    ask(ui_run, upstream, "pending.gguf", 64 << 10)
    for size, label in SIZES:
        driver = browser(*size)
        sign_in(driver, ui_run.base, ui_run.tokens["operator"], "/ui/downloads")
        assert driver.find_elements(By.CSS_SELECTOR, "button[name=cancel]")
        assert not driver.find_elements(By.CSS_SELECTOR, "button[name=approve], button[name=reject]")
        options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#nd-source option")]
        assert options == ["local"]
        assert_fits(driver)
        screenshot(driver, f"downloads-{label}")
        assert_no_console_errors(driver)
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                           {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    for name in ("downloads", "nodes"):
        driver.get(f"{ui_run.base}/ui/{name}")
        assert driver.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(18, 22, 28)"
        screenshot(driver, f"{name}-dark-390x844")
    assert_no_console_errors(driver)


def assert_fits(driver) -> None:
    """Nothing wider than the window: a phone scrolls down, never sideways (tables scroll in their card)."""
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{driver.current_url} is {overflow}px wider than the window"


def element(driver, element_id: str) -> dict:
    """An element's class, data-status and text now, read in one go (live.js replaces what changed)."""
    return driver.execute_script("""
        const el = document.getElementById(arguments[0]);
        return el && {cls: el.className, status: el.dataset.status || null, text: el.innerText};
    """, element_id)


def test_a_node_report_changes_its_cell_without_a_reload(browser, ui_run):
    status, artifact = api(ui_run, "POST", "/v1/imports?model=grid&version=1&filename=grid.gguf",
                           data=gguf_bytes(n_floats=1024))
    assert status == 201, artifact
    version_id = artifact["model_version_id"]
    status, reg = api(ui_run, "POST", "/v1/nodes", "operator",
                      body={"name": f"gpu-{uuid.uuid4().hex[:4]}", "facts": {"runtimes": ["files"]}})
    assert status == 201, reg
    node_id, node_token = reg["node"]["id"], reg["config"]["token"]
    status, load = api(ui_run, "POST", f"/v1/nodes/{node_id}/loads", body={"model_version_id": version_id})
    assert status == 201, load

    driver = browser(*LAPTOP)
    sign_in(driver, ui_run.base, ui_run.tokens["reader"], "/ui/nodes")
    cell_id = f"cell-{node_id}-{version_id}"
    assert element(driver, cell_id)["status"] == "none" and "load pending" in element(driver, cell_id)["text"]
    driver.execute_script("window.notReloaded = true;")
    for status_, details in (("loading", {"bytes_done": 2048}), ("available", {"runtime": "files"})):
        status, body = api(ui_run, "POST", f"/v1/nodes/{node_id}/availability", token=node_token,
                           body={"model_version_id": version_id, "status": status_, "details": details})
        assert status == 200, body
        wait_for(driver, lambda d: element(d, cell_id)["status"] == status_, 10)
    assert "load pending" not in element(driver, cell_id)["text"]
    assert element(driver, f"load-{load['id']}")["cls"] == "load-available"
    assert driver.execute_script("return window.notReloaded === true;")
    status, _ = api(ui_run, "POST", f"/v1/nodes/{node_id}/availability", token=node_token,
                    body={"model_version_id": version_id, "status": "failed", "details": {"error": "disk full"}})
    wait_for(driver, lambda d: "node-failed" in element(d, f"node-{node_id}")["cls"], 10)
    assert "disk full" in element(driver, cell_id)["text"]
    for size, label in SIZES:
        driver.set_window_size(*size)
        assert_fits(driver)
        screenshot(driver, f"nodes-{label}")
    assert_no_console_errors(driver)


def test_live_updates_stop_while_the_tab_is_hidden(browser, ui_run):
    driver = browser(*LAPTOP)
    sign_in(driver, ui_run.base, ui_run.tokens["reader"], "/ui/nodes")
    polls = lambda d: int(d.execute_script("return Number(document.documentElement.dataset.livePolls || 0);"))
    wait_for(driver, lambda d: polls(d) >= 2, 5)  # about once a second
    page = driver.current_window_handle
    before = polls(driver)
    driver.switch_to.new_window("tab")  # the dashboard's tab goes to the background: hidden
    driver.get(f"{ui_run.base}/ui/signin")
    time.sleep(6)
    driver.switch_to.window(page)  # visible again: one refresh at once, then once a second
    # at most: one under way as it was hidden, one more if the switch was slow, the one on showing
    assert polls(driver) - before <= 3, "live.js kept polling while the tab was hidden"
    back = polls(driver)
    wait_for(driver, lambda d: polls(d) >= back + 2, 5)
    assert_no_console_errors(driver)
