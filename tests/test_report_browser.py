"""The HTML report people share (``snakemake --report report.html``), opened in a real headless Chromium.

A tiny pipeline (random 4-layer Llama, tests/slurm/tiny.py; permute and drop at 1/2, fine-tuned baseline) runs
through Snakemake to the end, so every figure and table of rules/report.smk exists; then ``snakemake --report``
writes the self-contained report (Snakemake 9: one HTML file holding a React app and every result as a data URI).
Debian's Chromium, driven by Selenium (tests/browser.py, which also documents the report's DOM), then checks:

- the report opens: no uncaught JavaScript error or SEVERE console message, the menu lists the categories
  "Figures" and "Tables", and the workflow description (report/workflow.rst) is shown;
- every figure renders: the Figures category holds exactly the PNGs the run wrote; clicking through each
  subcategory and each row's view button shows an ``<img>`` whose embedded data are the file's bytes, which the
  browser decoded (``naturalWidth`` > 0) to the file's size and pixels (drawn on a canvas and compared with
  Pillow's decoding of the file), visibly on the page, not blank, and with a caption rendered from its .rst;
- every table renders: switched to its HTML format, each opens in the content frame with its title and rows.

Chromium and chromedriver are installed with apt-get when missing (root on Debian); elsewhere the tests skip,
saying so. In CI (``CI=true``) they never skip. ``FFMERGE_REPORT_SCREENSHOTS=folder`` keeps screenshots of the
landing page and of each figure opened.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# the figures of rules/report.smk, relative to results_dir, for the one task "tiny"
FIGURES = {
    "report/figure2_ff_removed.png",
    "report/figure3_params_removed.png",
    "report/figure10_window_scores.png",
    "report/recovery_curves.png",
    "tiny/figures/cka_ff_out.png",
    "tiny/figures/cka_attn_out.png",
}
TABLES = ("table2_windows", "table3_anchors", "table4_int8", "table9_results", "paper_comparison")
# what a caption must not show: reST or Jinja left unrendered, or a docutils error message
CAPTION_RESIDUE = ("``", "**", "{{", "{%", "system-message", "System Message")

pytestmark = pytest.mark.e2e


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_or_fail(message: str) -> None:
    if _in_ci():
        pytest.fail(message + " (CI=true: this test must not be skipped)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    """tests/browser.py, once Selenium imports and Chromium is installed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        _skip_or_fail("selenium is not installed (pip install -e '.[test]')")
    sys.path.insert(0, str(REPO / "tests"))
    import browser as module

    try:
        module.ensure_chromium(print)
    except module.BrowserUnavailable as err:
        _skip_or_fail(f"headless Chromium: {err}")
    except (module.BrowserSetupError, OSError) as err:
        pytest.fail(f"could not install Chromium: {err}", pytrace=False)
    return module


@pytest.fixture(scope="module")
def finished_report(tmp_path_factory) -> dict:
    """A finished tiny run and its ``snakemake --report`` HTML file."""
    sys.path.insert(0, str(REPO / "tests"))
    from slurm.tiny import save_tiny_llama, tiny_config

    root = tmp_path_factory.mktemp("report")
    results = root / "results"
    config = tiny_config(
        save_tiny_llama(root / "tiny-llama"), results, device="cpu", methods=["permute", "drop"], finetune_baseline=True
    )
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [*SNAKEMAKE, "--cores", "2", "--configfile", str(config_path), "-d", str(root / "wd")]
    (root / "tmp").mkdir()  # temp files of Snakemake and its jobs stay in this test's folder
    env = {**os.environ, **OFFLINE_ENV, "TMPDIR": str(root / "tmp")}
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = root / "report.html"
    made = subprocess.run([*command, "--report", str(report)], capture_output=True, text=True, env=env, timeout=600)
    assert made.returncode == 0 and report.is_file(), made.stdout[-3000:] + made.stderr[-3000:]
    print(f"tiny run and report: {time.monotonic() - started:.1f} s")
    return {"report": report, "results": results}


def _screenshots() -> Path | None:
    folder = os.environ.get("FFMERGE_REPORT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return None


def test_report_opens_with_the_workflow_description_and_categories(browser, finished_report):
    with browser.headless_chromium() as driver:
        report = browser.SnakemakeReport(driver, finished_report["report"])
        report.open()
        assert report.menu_items() == ["Workflow", "Statistics", "About", "Figures", "Tables"]
        assert set(report.js("categories")) == {"Figures", "Tables"}
        # the landing page shows report/workflow.rst, rendered with the config's task
        description = report.wait(
            lambda d: "merging feed-forward sublayers" in report.content().text and report.content().text,
            "the workflow description is not shown",
        )
        assert "tiny: causal_lm" in description and "methods permute, drop" in description
        if folder := _screenshots():
            driver.save_screenshot(str(folder / "landing.png"))
        assert report.page_errors() == []


def test_every_figure_in_the_report_renders(browser, finished_report):
    results_dir = finished_report["results"]
    written = {str(p.relative_to(results_dir)) for p in results_dir.rglob("*.png")}
    assert written == FIGURES, "the run wrote other figures than rules/report.smk's: update FIGURES"
    folder = _screenshots()
    with browser.headless_chromium() as driver:
        report = browser.SnakemakeReport(driver, finished_report["report"])
        report.open()
        figures = report.js("categories")["Figures"]
        entries = report.js("results")
        registered = [path for paths in figures.values() for path in paths]
        assert sorted(registered) == sorted(str(results_dir / f) for f in FIGURES), "Figures != the PNGs written"
        report.open_category("Figures", figures)
        shown = set()
        for subcategory, paths in figures.items():
            report.open_subcategory(subcategory, len(paths))
            uris = {entries[path]["data_uri"]: path for path in paths}
            for index in range(len(paths)):
                report.view(report.result_rows()[index])
                src = report.newly_shown(uris, shown)
                path = uris[src]
                shown.add(path)
                img = report.shown_image(src)  # decoded by the browser: complete, naturalWidth > 0
                _check_figure(browser, report, img, src, Path(path), entries[path], subcategory)
                if folder:
                    driver.save_screenshot(str(folder / f"{Path(path).stem}.png"))
            report.back_to_category("Figures", figures)
        assert shown == set(registered)
        assert report.page_errors() == []


def _check_figure(browser, report, img, src: str, path: Path, entry: dict, subcategory: str) -> None:
    assert browser.data_uri_bytes(src) == path.read_bytes(), f"{path}: the report embeds other bytes"
    assert img.is_displayed() and img.size["width"] > 0 and img.size["height"] > 0, f"{path}: not on the page"
    painted, expected = report.pixel_stats(img), browser.png_pixel_stats(path)
    assert (painted["width"], painted["height"]) == (expected["width"], expected["height"]), path
    assert painted["mean"] == pytest.approx(expected["mean"], abs=0.5), f"{path}: painted other pixels"
    assert painted["inked"] == pytest.approx(expected["inked"], abs=1e-3), f"{path}: painted other pixels"
    assert painted["inked"] > 0.01, f"{path}: the figure is blank"
    caption = entry["caption"]
    assert caption and "<strong>" in caption, f"{subcategory}: no caption, or its bold title did not render"
    assert not [r for r in CAPTION_RESIDUE if r in caption], f"{subcategory}: caption not rendered: {caption}"


def test_every_table_in_the_report_renders_as_html(browser, finished_report):
    report_dir = finished_report["results"] / "report"
    with browser.headless_chromium() as driver:
        report = browser.SnakemakeReport(driver, finished_report["report"])
        report.open()
        tables = report.js("categories")["Tables"]
        entries = report.js("results")
        registered = sorted(path for paths in tables.values() for path in paths)
        assert registered == sorted(str(report_dir / f"{t}.{ext}") for t in TABLES for ext in ("csv", "html"))
        report.open_category("Tables", tables)
        for subcategory, paths in tables.items():
            (html_path,) = [Path(p) for p in paths if p.endswith(".html")]
            (row,) = report.open_subcategory(subcategory, 1)  # one row, CSV / HTML as a toggle
            report.select_toggle("HTML")
            # the HTML entry's button opens it in the report; the CSV's was a download link
            report.wait_viewable()
            report.view(report.result_rows()[0])
            src = entries[str(html_path)]["data_uri"]
            assert browser.data_uri_bytes(src) == html_path.read_bytes()
            frame = report.shown_iframe(src)
            assert frame.is_displayed() and frame.size["height"] > 0
            title = html.unescape(re.search(r"<title>(.*?)</title>", html_path.read_text()).group(1))
            driver.switch_to.frame(frame)
            try:
                heading = report.wait(lambda d: d.find_elements("tag name", "h3"), f"{subcategory}: empty frame")
                assert heading[0].text == title, subcategory
                rows = driver.find_elements("css selector", "table tbody tr")
                assert rows or "(no rows)" in driver.find_element("tag name", "body").text, subcategory
            finally:
                driver.switch_to.default_content()
            report.back_to_category("Tables", tables)
        assert report.page_errors() == []
