"""Browser tests' tools: a real chromium driven by selenium, and a real ``modelcache run`` to point it at.

- ``browser`` (a fixture factory): a headless chromium (Debian's ``chromium`` + ``chromium-driver``) at a
  window size, e.g. ``browser(*LAPTOP)`` or ``browser(*PHONE)`` (``javascript=False``: with scripts off);
  quit at the end of the test.
- ``needs_browser``: skips, saying why, where no chromium or chromedriver is installed (``.ci/run``
  installs both).
- ``screenshot(driver, name)``: a PNG under ``test-screenshots/`` (gitignored) for a person to look at.
- ``assert_no_console_errors(driver)``: nothing logged at SEVERE in the page's console since the last call.
- ``sign_in(driver, base, token)``: the sign-in form filled and sent like a person would.
- ``ui_run`` (module-scoped fixture): one ``modelcache run`` (server + import daemon) per test module on a
  fresh database, with an admin, an operator and a reader token made before it starts. Selenium's calls
  block, so the server must not share the test's event loop: it is a process of its own.

A test module uses them with ``from ui_browser import browser, ui_run`` (pytest finds imported fixtures).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from modelcache.auth import Role, Subject
from modelcache.db import Database
from modelcache.tokens import create_token

CHROMIUM = os.environ.get("MODELCACHE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MODELCACHE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-screenshots"
LAPTOP = (1280, 800)
PHONE = (390, 844)

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
except ImportError:  # the test extras were not installed: needs_browser skips, saying so
    webdriver = By = expected_conditions = WebDriverWait = None


def _why_no_browser() -> str | None:
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"no browser: {path} is missing (apt-get install {package})"
    return None


needs_browser = pytest.mark.skipif(_why_no_browser() is not None, reason=_why_no_browser() or "")


@pytest.fixture
def browser():
    """``browser(width, height)``: a new headless chromium with that window size."""
    drivers = []

    def make(width: int, height: int, javascript: bool = True):
        options = webdriver.ChromeOptions()
        if not javascript:  # as a browser with scripts turned off sees the pages
            options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_window_size(width, height)
        driver.implicitly_wait(0)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


def screenshot(driver, name: str, full_page: bool = True) -> Path:
    """Save the page as ``test-screenshots/<name>.png``; with ``full_page`` the window grows to the page's
    height first (and back after), so the whole page is in the picture."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    size = driver.get_window_size()
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], max(size["height"], min(height, 6000)))
    try:
        driver.save_screenshot(str(path))
    finally:
        if full_page:
            driver.set_window_size(size["width"], size["height"])
    return path


def assert_no_console_errors(driver) -> None:
    """No SEVERE entry in the browser console since the last look (the log is drained by reading it)."""
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, "console errors:\n" + "\n".join(e["message"] for e in errors)


def wait_for(driver, condition, timeout: float = 10):
    """``condition`` once it holds. An element found in the instant before the page changed under it (a
    form's redirect landing, live.js swapping a row) is looked for again, not taken for a failure."""

    def settled(d):
        try:
            return condition(d)
        except WebDriverException as exc:
            if isinstance(exc, StaleElementReferenceException) or "does not belong to the document" in str(exc.msg):
                return False
            raise

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(settled)


def sign_in(driver, base: str, token: str, path: str = "/ui/") -> None:
    driver.get(f"{base}{path}")
    wait_for(driver, expected_conditions.presence_of_element_located((By.NAME, "token")))
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form[action='/ui/signin'] button[type=submit]").click()
    wait_for(driver, expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "header .who")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_databases = itertools.count()


@dataclass
class UiRun:
    """A running ``modelcache run``: its address, data and import dirs, dsn and tokens by role."""

    base: str
    data_dir: Path
    import_dir: Path
    dsn: str
    log: Path
    proc: subprocess.Popen
    tokens: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


async def _make_tokens(dsn: str) -> dict[str, str]:
    db = Database(dsn)
    await db.open()
    try:
        made = {}
        for role in ("admin", "operator", "reader"):
            made[role], _ = await create_token(db, name=f"ui-{role}", role=Role(role), subject=Subject.local())
        return made
    finally:
        await db.close()


@pytest.fixture(scope="module")
def ui_run(request, tmp_path_factory, pg_admin_dsn, template_dsn):
    """One ``modelcache run`` (server and import daemon) for the module, on a database of its own.

    A module that defines a module-scoped fixture ``ui_config`` (TOML text, e.g. ``[sources.<id>]``
    tables) has the run started with it as its config file."""
    name = f"mc_ui_{os.getpid()}_{next(_databases)}"
    template = psycopg.conninfo.conninfo_to_dict(template_dsn)["dbname"]
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    dsn = psycopg.conninfo.make_conninfo(pg_admin_dsn, dbname=name)
    tokens = asyncio.run(_make_tokens(dsn))
    root = tmp_path_factory.mktemp("ui-run")
    data, port = root / "data", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    env.update(MODELCACHE_SYNCD_SETTLE_SECONDS="0.3")
    config: list[str] = []
    try:
        text = request.getfixturevalue("ui_config")
    except pytest.FixtureLookupError:
        text = ""
    if text:
        (root / "modelcache.toml").write_text(text)
        config = ["--config", str(root / "modelcache.toml")]
    log = root / "run.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "modelcache", "run", *config, "--dsn", dsn,
                                 "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    run = UiRun(f"http://127.0.0.1:{port}", data, data / "import", dsn, log, proc, tokens)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, run.log_text()
            try:
                with urllib.request.urlopen(f"{run.base}/readyz", timeout=2) as r:
                    if r.status == 200 and run.import_dir.is_dir():
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, run.log_text()
            time.sleep(0.1)
        yield run
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(data / "blobs", ignore_errors=True)
