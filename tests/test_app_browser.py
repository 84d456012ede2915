"""The synthgen app in a real headless Chromium, served by `synthgen app` on a free loopback port.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (test extra). Without
them the test is skipped with the reason, unless SYNTHGEN_REQUIRE_BROWSER=1 (set by .ci/run),
which turns the skip into a failure. Screenshots go to test-artifacts/app/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .app_data import app_data
from .dataset_builds import free_port

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-artifacts" / "app"
PAGE_TIMEOUT = 180  # seconds; the first page of a fresh server imports torch and loads the generator
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1600"]


def _missing_browser() -> str | None:
    """Return why the browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is missing: pip install -e '.[test]'"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "Chromium is missing: apt-get install -y chromium chromium-driver"
    if not shutil.which("chromedriver"):
        return "chromedriver is missing: apt-get install -y chromium-driver"
    return None


@pytest.fixture(scope="module")
def browser_available():
    reason = _missing_browser()
    if reason is None:
        return
    if os.environ.get("SYNTHGEN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SYNTHGEN_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def data(small_teacher, mnist_small, tmp_path_factory):
    return app_data(small_teacher, mnist_small, tmp_path_factory)


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"synthgen app exited with status {server.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"synthgen app did not answer {url}/_stcore/health within {timeout:g} s: "
                       f"{log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def app_url(browser_available, data, tmp_path_factory):
    """Serve the app with `synthgen app` on a free loopback port; stop it afterwards."""
    folder = tmp_path_factory.mktemp("app-server")
    port = free_port()
    env = {**os.environ, "SYNTHGEN_CATALOG": str(data.catalog), "SYNTHGEN_LEDGER": str(folder / "ledger.duckdb"),
           "HF_HOME": str(folder / "hf-home"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "NO_PROXY": "127.0.0.1,localhost"}
    command = Path(sys.executable).parent / "synthgen"
    argv = [str(command)] if command.is_file() else [sys.executable, "-m", "synthgen"]
    log = folder / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen([*argv, "app", "--port", str(port)], env=env, stdout=output,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def driver(browser_available):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    profile = tempfile.mkdtemp(prefix="synthgen-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # SE_OFFLINE keeps Selenium Manager from looking up drivers online; the paths above are local.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        try:
            yield browser
        finally:
            browser.quit()
            shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, url: str, expected: list[str], name: str) -> str:
    """Open a page, wait until every expected text is visible and the app is idle, and save a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)

    def ready(browser) -> bool:
        text = browser.find_element(By.TAG_NAME, "body").text
        running = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        return all(item in text for item in expected) and not running

    try:
        WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=0.5).until(ready)
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    return driver.find_element(By.TAG_NAME, "body").text


def test_pages_in_chromium(app_url, driver, data):
    from selenium.webdriver.common.by import By

    report = json.loads((data.spread_dir / "privacy_report.json").read_text())
    manifest = json.loads((data.dataset / "synthgen_dataset.json").read_text())
    guarantee = f"({report['epsilon']:.4g}, {report['delta']:g})-DP"
    pages = [
        ("", ["Generators", "Pull a Hub release", guarantee]),  # the default page is served at /
        ("samples", ["Samples", guarantee, "seed 0: one row per class"]),
        ("privacy-card", ["Privacy card", "The card agrees with the recomputation",
                          f"epsilon {report['epsilon']:.6g}"]),
        ("datasets", ["Datasets", f"{manifest['rows']} rows, classes {', '.join(data.class_names)}",
                      "Class histogram"]),
        ("runs", ["Runs", "Training curves", "Privacy and utility across runs and releases"]),
    ]
    for path, expected in pages:
        text = open_page(driver, f"{app_url}/{path}", expected, path or "generators")
        assert "Page not found" not in text, path
        assert "Traceback" not in text, path
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), path
        assert "failed" not in text, f"{path} shows an error: {text[:2000]}"

    # The samples grid is a real image the browser decoded, and its class filter lists every class.
    open_page(driver, f"{app_url}/samples", ["seed 0: one row per class"], "samples")
    widths = driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=\"stImage\"] img')).map(i => i.naturalWidth)")
    assert widths
    assert max(widths) > 500  # 8 images per class by default, 88 pixels apart, after the label column
    class_filter = driver.find_element(By.CSS_SELECTOR, '[data-testid="stMultiSelect"]').text.splitlines()
    assert class_filter[0] == "Classes"
    assert class_filter[1:] == data.class_names
