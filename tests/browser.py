"""Headless Debian Chromium driven by Selenium, and the DOM of Snakemake 9's HTML report, for tests only.

Chromium and its WebDriver come from Debian's ``chromium`` and ``chromium-driver`` packages (``/usr/bin/chromium``,
``/usr/bin/chromedriver``); when either is missing they are installed with apt-get, as root on Debian only
(``apt-get install`` first, ``apt-get update`` only if that fails), as tests/slurm/cluster.py does for SLURM.
Selenium is given both paths, so its own driver manager (which would download a browser) never runs.

``snakemake --report report.html`` writes one self-contained file: a React app (Snakemake's
``report/html_reporter/template``) with every result embedded as a data URI in the global ``results``
(path -> entry: ``mime_type``, ``labels``, ``caption``, ``data_uri``) and ``categories`` (category ->
subcategory -> paths). Its DOM, read from those components rather than guessed:

- the left ``<nav>`` holds menus whose items are ``<a><svg/><span>label</span></a>``: on the landing page
  "Workflow", "Statistics", "About", then one item per category ("Figures", "Tables"); a category's page lists its
  subcategories the same way;
- a subcategory's page is a ``<table>`` in the nav: one row per entry (labels, or the file path when a result
  has no labels), whose last cell holds ``<div role="group">`` with the view button first and the result-info
  button second (React passes the Button's ``iconName`` prop through, so they carry ``iconname="eye"`` and
  ``iconname="information-circle"``); results with exactly two values of a second label (our tables' CSV /
  HTML) get one row and a radio toggle above the table, ``<fieldset><label>CSV</label><label>HTML</label>``,
  set to the first value in sort order;
- a view button opens images and HTML in the report (``href="#"``) and offers anything else (CSV) as a download
  (``href`` = the data URI);
- the view button of an image puts ``<img src=data_uri>`` into the content pane (the ``div.grow`` beside the
  nav); of an HTML file, an ``<iframe src=data_uri>``;
- the breadcrumbs (``nav ol``) lead back: home icon, "Results", the category, the subcategory.
"""

from __future__ import annotations

import base64
import contextlib
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from debian import apt_install
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

APT_PACKAGES = ("chromium", "chromium-driver")
COMMANDS = {"chromium": "chromium", "chromedriver": "chromium-driver"}
# As root, Chromium needs --no-sandbox; without the background-networking flags it tries Google's hosts at every
# start, which this project's machines refuse (no network but package registries).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--force-device-scale-factor=1",
)
WAIT_S = 30
# Recorded before any page script runs: uncaught exceptions and rejected promises, which console logs can miss.
ERROR_RECORDER = """
window.__pageErrors = [];
window.addEventListener("error", e => window.__pageErrors.push(`${e.message} (${e.filename}:${e.lineno})`));
window.addEventListener("unhandledrejection", e => window.__pageErrors.push(`unhandled rejection: ${e.reason}`));
"""
# What the browser painted: the <img> drawn onto a canvas and read back (a data: image does not taint it).
PIXEL_STATS = """
const img = arguments[0];
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth;
canvas.height = img.naturalHeight;
const context = canvas.getContext("2d");
context.drawImage(img, 0, 0);
const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
let r = 0, g = 0, b = 0, a = 0, inked = 0;
for (let i = 0; i < data.length; i += 4) {
    r += data[i]; g += data[i + 1]; b += data[i + 2]; a += data[i + 3];
    if (data[i + 3] > 0 && Math.min(data[i], data[i + 1], data[i + 2]) < 250) inked += 1;
}
const n = data.length / 4;
return {width: canvas.width, height: canvas.height, mean: [r / n, g / n, b / n, a / n], inked: inked / n};
"""


class BrowserUnavailable(RuntimeError):
    """Chromium is missing and this machine cannot install it (not root, not Debian); the message says why."""


class BrowserSetupError(RuntimeError):
    """Installing Chromium with apt-get failed; the message holds apt-get's output."""


def _missing() -> list[str]:
    return [command for command in COMMANDS if shutil.which(command) is None]


def install_blocker() -> str | None:
    """Why Chromium cannot be installed here (None if it can): apt-get as root on Debian is required."""
    if platform.system() != "Linux":
        return f"not Linux (this is {platform.system()})"
    if os.geteuid() != 0:
        return "not root (apt-get needs root to install Debian's chromium and chromium-driver)"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "not Debian (or a derivative) with apt-get, which the test installs chromium and chromium-driver with"
    return None


def ensure_chromium(log=print) -> tuple[str, str]:
    """The paths of chromium and chromedriver, installed from Debian first if either is missing."""
    if _missing():
        blocker = install_blocker()
        if blocker:
            missing = " and ".join(_missing())
            raise BrowserUnavailable(f"{missing} not installed, and this machine cannot install them: {blocker}")
        apt_install(APT_PACKAGES, log, BrowserSetupError)
        if _missing():
            raise BrowserSetupError(f"after installing {' '.join(APT_PACKAGES)}, still missing: {_missing()}")
    return shutil.which("chromium"), shutil.which("chromedriver")


@contextlib.contextmanager
def headless_chromium(width: int = 1600, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """A headless Chromium (new empty profile, viewport ``width`` x ``height``) recording page errors."""
    chromium, chromedriver = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="ffmerge-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # Chromium's shared-memory files (in TMPDIR with --disable-dev-shm-usage) stay in the profile's folder
        service = Service(executable_path=chromedriver, env={**os.environ, "TMPDIR": profile})
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_RECORDER})
            yield driver
        finally:
            driver.quit()


def data_uri_bytes(uri: str) -> bytes:
    """The payload of a base64 ``data:`` URI (Snakemake's: ``data:image/png;charset=utf8;filename=...;base64,``)."""
    header, _, payload = uri.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header[:200]
    return base64.b64decode(payload)


class SnakemakeReport:
    """One ``snakemake --report`` HTML file open in ``driver``, navigated as a reader would, by clicks."""

    def __init__(self, driver: webdriver.Chrome, path: Path):
        self.driver = driver
        self.path = Path(path)

    def open(self) -> None:
        """Load the file and wait until React has rendered the landing menu."""
        self.driver.get(self.path.resolve().as_uri())
        self.wait(lambda d: self.menu_items(), "the report's menu never rendered")

    # ------------------------------------------------------------------ waiting and reading

    def wait(self, condition, message: str, timeout: float = WAIT_S):
        """WebDriverWait on ``condition``, retried when React replaced an element under it."""
        return WebDriverWait(self.driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(
            condition, message
        )

    def page_errors(self) -> list[str]:
        """Uncaught exceptions and rejected promises since the page loaded, plus SEVERE console messages."""
        errors = list(self.driver.execute_script("return window.__pageErrors || ['error recorder missing']"))
        errors += [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]
        return errors

    def js(self, name: str):
        """One of the report's global data objects (``results``, ``categories``, ...), as JSON-able Python."""
        return self.driver.execute_script(f"return {name};")

    def nav(self) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, "#app nav")

    def menu_items(self) -> list[str]:
        """The labels of the nav's menu items (landing page: General + categories; category page: subcategories)."""
        items = self.driver.find_elements(By.CSS_SELECTOR, "#app nav > div ul > li > a > span")
        return [item.text for item in items]

    def click_menu_item(self, label: str) -> None:
        self.nav().find_element(By.XPATH, f".//ul/li/a[span[normalize-space()={_xpath_literal(label)}]]").click()

    def click_breadcrumb(self, label: str) -> None:
        self.nav().find_element(By.XPATH, f".//ol/li/a[normalize-space()={_xpath_literal(label)}]").click()

    def result_rows(self) -> list[WebElement]:
        return self.nav().find_elements(By.CSS_SELECTOR, "table > tbody > tr")

    def content(self) -> WebElement:
        """The content pane beside the nav."""
        return self.driver.find_element(By.CSS_SELECTOR, "#app > div > div.grow")

    # ------------------------------------------------------------------ navigation

    def open_category(self, category: str, subcategories) -> None:
        """From the landing menu (or the category's breadcrumb), open ``category``; wait for its subcategories."""
        self.click_menu_item(category)
        self.wait(lambda d: sorted(self.menu_items()) == sorted(subcategories), f"{category}: subcategories")

    def back_to_category(self, category: str, subcategories) -> None:
        """From a subcategory page, back to ``category``'s list by its breadcrumb."""
        self.click_breadcrumb(category)
        self.wait(lambda d: sorted(self.menu_items()) == sorted(subcategories), f"{category}: back to the list")

    def open_subcategory(self, subcategory: str, rows: int) -> list[WebElement]:
        """From a category page, open ``subcategory`` and wait for its ``rows`` result rows."""
        self.click_menu_item(subcategory)
        return self.wait(lambda d: len(self.result_rows()) == rows and self.result_rows(), f"{subcategory}: rows")

    def view_button(self, row: WebElement) -> WebElement:
        return row.find_element(By.CSS_SELECTOR, "div[role=group] > a[iconname=eye]")

    def view(self, row: WebElement) -> None:
        """Click the row's view (eye) button."""
        self.view_button(row).click()

    def select_toggle(self, value: str) -> None:
        """Set the subcategory's toggle (Snakemake's label toggle above the results table) to ``value``."""
        self.nav().find_element(By.XPATH, f".//fieldset//label[normalize-space()={_xpath_literal(value)}]").click()

    def newly_shown(self, candidates: dict[str, str], seen: set[str]) -> str:
        """Wait until the content pane's <img> shows one of ``candidates`` (data URI -> path) not in ``seen``."""

        def new_src(driver):
            for img in self.content().find_elements(By.TAG_NAME, "img"):
                path = candidates.get(img.get_attribute("src"))
                if path is not None and path not in seen:
                    return img.get_attribute("src")
            return False

        return self.wait(new_src, f"none of {sorted(set(candidates.values()) - seen)} was shown")

    def wait_viewable(self, row: int = 0) -> None:
        """Wait until the row's view button opens its result in the report (``href="#"``), not as a download."""
        self.wait(
            lambda d: self.view_button(self.result_rows()[row]).get_attribute("href").endswith("#"),
            "the view button still offers a download",
        )

    def shown_image(self, src: str) -> WebElement:
        """The content pane's <img> once it shows ``src`` and has finished decoding it."""

        def loaded(driver):
            for img in self.content().find_elements(By.TAG_NAME, "img"):
                if img.get_attribute("src") == src and driver.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth > 0", img
                ):
                    return img
            return False

        return self.wait(loaded, "the image was not shown, or the browser could not decode it")

    def shown_iframe(self, src: str) -> WebElement:
        return self.wait(
            lambda d: next(
                (f for f in self.content().find_elements(By.TAG_NAME, "iframe") if f.get_attribute("src") == src),
                False,
            ),
            "the HTML result was not shown",
        )

    def pixel_stats(self, img: WebElement) -> dict:
        return self.driver.execute_script(PIXEL_STATS, img)


def png_pixel_stats(path: Path) -> dict:
    """The same statistics as PIXEL_STATS, from the PNG file itself (Pillow)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    height, width, _ = rgba.shape
    pixels = rgba.reshape(-1, 4)
    inked = (pixels[:, 3] > 0) & (pixels[:, :3].min(axis=1) < 250)
    return {"width": width, "height": height, "mean": pixels.mean(axis=0).tolist(), "inked": float(inked.mean())}


def _xpath_literal(text: str) -> str:
    if '"' not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"
    return "concat(" + ", '\"', ".join(f'"{part}"' for part in text.split('"')) + ")"
