"""Headless Chromium for the console's browser tests, driven by Selenium.

The browser and its driver are Debian's ``chromium`` and ``chromium-driver`` packages
(``make test`` installs them when missing, see the Makefile's ``browser`` target). The
driver's path is given explicitly, so Selenium Manager never runs and nothing downloads
a browser build. ``Browser`` adds what the tests need on top of the WebDriver: waits
that poll with a bound (never a fixed sleep), full-page screenshots, the browser's
console log (every SEVERE entry is a failure), and a download folder.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH = 1280
HEIGHT = 900
DEFAULT_WAIT = 15.0

T = TypeVar("T")


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make install puts it in .venv, the test extra)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return (
                f"{path} is missing: install Debian's {package} package "
                "(`make test` does so when run as root)"
            )
    return None


class BrowserError(AssertionError):
    pass


class Browser:
    """One headless Chromium window, 1280 px wide."""

    def __init__(self, download_dir: Path, failure_dir: Path | None = None) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        # Belt and braces: Selenium Manager is not needed with an explicit driver path,
        # and must never fetch anything if some code path reached it.
        os.environ.setdefault("SE_OFFLINE", "true")
        self.download_dir = download_dir
        # Where a timed-out wait leaves its screenshot (default: $TMPDIR).
        self.failure_dir = failure_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        download_dir.mkdir(parents=True, exist_ok=True)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in (
            "--headless=new",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-dev-shm-usage",
            "--disable-gpu",
            f"--window-size={WIDTH},{HEIGHT}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--lang=en-US",
        ):
            options.add_argument(argument)
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(download_dir),
                "download.prompt_for_download": False,
            },
        )
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=str(CHROMEDRIVER))
        self.driver = webdriver.Chrome(options=options, service=service)
        self.driver.set_window_size(WIDTH, HEIGHT)
        self.driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior",
            {"behavior": "allow", "downloadPath": str(download_dir)},
        )
        self.logs: list[dict[str, Any]] = []
        self._severe_seen = 0  # SEVERE entries already returned by new_severe()

    def close(self) -> None:
        self.driver.quit()

    # ----------------------------------------------------------------- pages

    def open(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, check: Callable[[], T | None], what: str, timeout: float = DEFAULT_WAIT) -> T:
        """Poll ``check`` (bounded) until it returns something truthy, and return it."""
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )

        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                value = check()
                if value:
                    return value
            except (NoSuchElementException, StaleElementReferenceException) as exc:
                last_error = exc
            if time.monotonic() > deadline:
                failure = self.screenshot(self.failure_dir / "console-wait-failure.png")
                raise BrowserError(
                    f"timed out after {timeout}s waiting for {what} "
                    f"(last error: {last_error}; screenshot {failure}; "
                    f"console: {self.read_logs()})"
                )
            time.sleep(0.05)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def element(self, css: str, timeout: float = DEFAULT_WAIT) -> Any:
        """The first element matching ``css`` once it is displayed."""

        def shown() -> Any:
            for el in self.find_all(css):
                if el.is_displayed():
                    return el
            return None

        return self.wait(shown, f"an element {css!r}", timeout)

    def button(self, text: str, within: str = "body", timeout: float = DEFAULT_WAIT) -> Any:
        """The displayed button whose text is ``text``, inside ``within``."""

        def shown() -> Any:
            for el in self.find_all(f"{within} button"):
                if el.is_displayed() and el.text.strip() == text:
                    return el
            return None

        return self.wait(shown, f"a button {text!r} in {within!r}", timeout)

    def click(self, css: str) -> None:
        self.element(css).click()

    def type(self, css: str, text: str, *, clear: bool = True) -> Any:
        el = self.element(css)
        if clear:
            el.clear()
        el.send_keys(text)
        return el

    def text(self, css: str) -> str:
        return str(self.element(css).text)

    def go(self, view: str, ready: str) -> None:
        """Open a view from the sidebar and wait for ``ready`` (a CSS selector)."""
        self.click(f'.sidebar a[data-path="{view}"]')
        self.wait(
            lambda: (
                self.find(f'.sidebar a[data-path="{view}"]').get_attribute("aria-current") == "page"
            ),
            f"the {view} view",
        )
        self.element(ready)

    # ---------------------------------------------------------- screenshots

    def screenshot_bytes(self) -> bytes:
        """The whole page (beyond the viewport), as PNG: the page's width and height, at
        least the window's inner size (scrollbar included: the page is laid out at that
        width; the height is less than ``--window-size``'s)."""
        metrics = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        inner = self.js("return [window.innerWidth, window.innerHeight]")
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": max(inner[0], size["width"]),
                    "height": max(inner[1], size["height"]),
                    "scale": 1,
                },
            },
        )
        return base64.b64decode(shot["data"])

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.screenshot_bytes())
        return path

    # -------------------------------------------------------------- console

    def read_logs(self) -> list[dict[str, Any]]:
        """The browser console's entries since the last read (kept in ``self.logs``)."""
        entries = list(self.driver.get_log("browser"))
        self.logs.extend(entries)
        return entries

    def severe(self) -> list[str]:
        """Every SEVERE console entry so far (errors, failed loads, CSP violations)."""
        self.read_logs()
        return [str(e.get("message")) for e in self.logs if e.get("level") == "SEVERE"]

    def new_severe(self) -> list[str]:
        """The SEVERE console entries since the last call (each is returned once)."""
        found = self.severe()
        fresh = found[self._severe_seen :]
        self._severe_seen = len(found)
        return fresh

    # ------------------------------------------------------------ downloads

    def downloaded(self, suffix: str, timeout: float = DEFAULT_WAIT) -> Path:
        """The one finished download whose name ends with ``suffix``."""

        def done() -> Path | None:
            found = [p for p in self.download_dir.iterdir() if p.name.endswith(suffix)]
            return found[0] if len(found) == 1 else None

        return self.wait(done, f"a downloaded *{suffix}", timeout)

    def clear_downloads(self) -> None:
        shutil.rmtree(self.download_dir, ignore_errors=True)
        self.download_dir.mkdir(parents=True)
