"""The dashboard in a real chromium (selenium) against a real ``modelcache run`` with its import daemon."""

from __future__ import annotations

from ui_browser import (LAPTOP, PHONE, By, assert_no_console_errors, browser, needs_browser,  # noqa: F401 - fixtures
                        screenshot, sign_in, ui_run)

pytestmark = needs_browser


def test_sign_in_and_see_the_overview(browser, ui_run):
    for size, label in ((LAPTOP, "1280x800"), (PHONE, "390x844")):
        driver = browser(*size)
        sign_in(driver, ui_run.base, ui_run.tokens["admin"])
        assert driver.current_url == f"{ui_run.base}/ui/"
        assert "ui-admin" in driver.find_element(By.CSS_SELECTOR, "header .who").text
        screenshot(driver, f"overview-{label}")
        assert_no_console_errors(driver)
