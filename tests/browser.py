"""Render a page in headless Chromium (Debian's `chromium` + `chromium-driver`, installed by .ci/run) and screenshot it.

Selenium drives the system's chromedriver: a test tool's own browser download cannot work on this machine.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER_PATHS = ("/usr/bin/chromedriver",)


@dataclass
class Rendered:
    """What the browser ended up showing: the final URL, the page title, its DOM, and the screenshot."""

    url: str
    title: str
    html: str
    screenshot: Path | None


def available() -> str | None:
    """None when headless Chromium can run here, else what is missing (for a skip message)."""
    if not any(Path(p).exists() for p in CHROMIUM_PATHS) and not shutil.which("chromium"):
        return "chromium is not installed (apt-get install -y chromium chromium-driver)"
    if not any(Path(p).exists() for p in DRIVER_PATHS) and not shutil.which("chromedriver"):
        return "chromedriver is not installed (apt-get install -y chromium-driver)"
    return None


def _start(webdriver, options, service):
    """A Chrome session; one retry, because Chromium's first start on a loaded machine can time out."""
    from selenium.common.exceptions import WebDriverException

    try:
        return webdriver.Chrome(options=options, service=service)
    except WebDriverException:
        return webdriver.Chrome(options=options, service=service)


def render(
    url: str,
    *,
    cookies: dict[str, str] | None = None,
    token: str | None = None,
    screenshot: str | Path | None = None,
    wait_for_css: str | None = None,
    in_frame: str | None = None,
    width: int = 1400,
    height: int = 900,
    full_page: bool = True,
    timeout: float = 30,
) -> Rendered:
    """Open `url` with `cookies` set for its host (or `token` as Airflow's `_token` cookie), wait, screenshot.

    `wait_for_css` waits until an element matching it is in the DOM; with `in_frame` (the CSS of
    an iframe, e.g. Airflow's UI showing a plugin view) it waits inside that frame, whose DOM is
    then the one returned. `full_page` grows the window to the document's height first.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    missing = available()
    if missing:
        raise RuntimeError(missing)
    cookies = dict(cookies or {})
    if token:
        cookies.setdefault("_token", token)  # the cookie Airflow's UI sets after login
    options = webdriver.ChromeOptions()
    options.binary_location = next((p for p in CHROMIUM_PATHS if Path(p).exists()), shutil.which("chromium") or "")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    service = Service(executable_path=next((p for p in DRIVER_PATHS if Path(p).exists()), shutil.which("chromedriver")))
    driver = _start(webdriver, options, service)
    try:
        driver.set_page_load_timeout(timeout)
        if cookies:
            # A cookie can only be set for the page's own origin: open a cheap path on it first.
            parts = urlsplit(url)
            driver.get(f"{parts.scheme}://{parts.netloc}/favicon.ico")
            for name, value in cookies.items():
                driver.add_cookie({"name": name, "value": value, "path": "/"})
        driver.get(url)
        if in_frame:
            WebDriverWait(driver, timeout).until(
                expected_conditions.frame_to_be_available_and_switch_to_it((By.CSS_SELECTOR, in_frame))
            )
        if wait_for_css:
            WebDriverWait(driver, timeout).until(
                expected_conditions.presence_of_element_located((By.CSS_SELECTOR, wait_for_css))
            )
        html = driver.page_source
        if in_frame:
            driver.switch_to.default_content()
            full_page = False  # the frame scrolls inside Airflow's page; the window shows what a person sees
        shot = None
        if screenshot is not None:
            shot = Path(screenshot)
            shot.parent.mkdir(parents=True, exist_ok=True)
            if full_page:
                total = int(driver.execute_script("return document.documentElement.scrollHeight"))
                # The window's height includes the browser's own frame: grow it by the page's overflow.
                chrome = driver.get_window_size()["height"] - int(driver.execute_script("return window.innerHeight"))
                driver.set_window_size(width, min(max(total + chrome, height), 8000))
            driver.save_screenshot(str(shot))
        return Rendered(url=driver.current_url, title=driver.title, html=html, screenshot=shot)
    finally:
        driver.quit()
