"""A real headless browser for the web page's tests: Debian's Chromium driven by Selenium through Debian's
chromium-driver (both from `make system-deps`; nothing downloaded: Selenium Manager is never asked).

`chromium()` starts one; where Chromium is missing the test skips locally and fails under CI=true.
`Screenshots` saves PNGs under one folder ($TORCHBOOK_TEST_ARTIFACTS/web, default test-artifacts/web at the
repository's root), which the fixture prints.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def find(candidates: tuple[str, ...], name: str) -> str | None:
    return next((c for c in candidates if Path(c).is_file()), None) or shutil.which(name)


def chromium(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium (Selenium WebDriver), or a skip (a failure under CI=true) when none is installed."""
    binary, driver = find(CHROMIUM, "chromium"), find(DRIVER, "chromedriver")
    if binary is None or driver is None:
        why = "Debian's chromium and chromium-driver are not installed (make system-deps)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver  # only these tests drive a browser
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-extensions", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--metrics-recording-only",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    browser.set_window_size(width, height)
    return browser


def artifacts_folder() -> Path:
    folder = Path(os.environ.get("TORCHBOOK_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Screenshots:
    def __init__(self, browser: Any, folder: Path):
        self.browser, self.folder = browser, folder

    def save(self, name: str) -> Path:
        path = self.folder / f"{name}.png"
        self.browser.save_screenshot(str(path))
        return path
