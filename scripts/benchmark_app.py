"""Measure the app's Samples page: the time from a slider change to a new 10 x 10 per-class grid.

The app runs in-process under Streamlit's AppTest with torch limited to 2 threads. A timed step
sets the "Images per class" slider from 9 to 10 and reruns the page. The cached pipeline then
draws until every class has 10 images, and the page renders the grid PNG, the zip and parquet
downloads and the summary table. The browser's part (websocket transfer, image decoding) is not
included. Records go to benchmarks/results/app.json:

- slider_to_grid_seconds: median over --repeats slider changes, with the standard deviation;
- slider_to_grid_uncached_seconds: the same change after dropping the cached pipeline, so the
  generator is loaded again (what every change would cost without st.cache_resource), median
  and standard deviation over the same number of changes;
- generator_load_seconds: loading the local generator folder alone, what the cache saves per
  change (a Hub release would be pulled again on top of that);
- slider_to_grid_browser_seconds (with --browser): the same change end to end, in headless
  Chromium against `synthgen app`, until the new grid image is decoded and the run is over.

Every record carries the machine's 1-minute load average before and after: on a shared machine a
load above the core count slows every number here.

The generator has the default MNIST architecture (latent 100, generator width 32, student width
32, hidden 256). Its student is replaced by one whose labels spread over the classes (as in
tests/dataset_builds.py), because a briefly trained student labels most images as a few classes
and cannot fill a 10 x 10 grid. The time depends on the model sizes, not on their training.

Usage: python scripts/benchmark_app.py [--run-dir RUN] [--repeats 5] [--browser]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(tempfile.mkdtemp(prefix="synthgen-bench-app-"))
os.environ.update({"HF_HOME": str(WORK / "hf-home"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                   "SYNTHGEN_CATALOG": str(WORK / "catalog.duckdb"), "SYNTHGEN_LEDGER": str(WORK / "ledger.duckdb")})
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import record, write_records  # noqa: E402

logger = logging.getLogger("benchmark")
THREADS = 2
GRID = 10  # classes and images per class


def make_run() -> Path:
    """Train a teacher briefly on real MNIST and transcribe it for a few steps with the default architecture."""
    from synthgen.config import TeacherTrainConfig, TranscribeConfig
    from synthgen.data import load_image_data, locate_dataset
    from synthgen.teacher import train_teacher
    from synthgen.transcribe import transcribe

    mnist = locate_dataset("mnist", fetch=False)
    teacher = WORK / "teacher"
    train_teacher(TeacherTrainConfig(data=str(mnist), out=str(teacher), epochs=1, batch_size=64),
                  load_image_data(mnist, "train").subset(2000, seed=0), None)
    run_dir = WORK / "run"
    transcribe(TranscribeConfig(teacher=str(teacher), out=str(run_dir), eval_data=str(mnist), eval_limit=500,
                                mechanism="gaussian", epsilon=10.0, delta=1e-5, steps=5, batch_size=64, eval_every=0,
                                checkpoint_every=5, replay_size=256, replay_batch=64, device="cpu"))
    return run_dir


def grid_counts(app) -> list[int]:
    summary = app.dataframe[0].value
    return list(summary["images"])


def change_slider(app, value: int) -> float:
    started = time.perf_counter()
    app.slider[0].set_value(value).run()
    seconds = time.perf_counter() - started
    if app.exception or app.error:
        raise RuntimeError(f"the Samples page failed: {[e.value for e in [*app.exception, *app.error]]}")
    return seconds


def measure_in_browser(generator: Path, repeats: int) -> list[float]:
    """Serve the app with `synthgen app` and time slider changes in headless Chromium, until the new grid is shown.

    A timed change presses the right arrow on the focused slider (9 to 10) and ends when the grid
    image has a new source, is decoded, and the app reports that its script run is over.
    """
    import subprocess
    import urllib.request

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from synthgen.catalog import Catalog
    from tests.dataset_builds import free_port

    with Catalog(os.environ["SYNTHGEN_CATALOG"]) as catalog:
        catalog.record_run(generator)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    log = open(WORK / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "synthgen", "app", "--port", str(port)], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1600", f"--user-data-dir={WORK / 'chromium'}"):
        options.add_argument(flag)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look up drivers online
    driver = None
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read().strip() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        driver.get(f"{url}/samples")
        source_script = ("const image = document.querySelector('[data-testid=\"stImage\"] img');"
                         "return image && image.complete && image.naturalWidth > 0 ? image.src : null;")

        def settled(previous):
            def check(browser):
                source = browser.execute_script(source_script)
                busy = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
                return source if source and source != previous and not busy else False
            return check

        source = WebDriverWait(driver, 600, 0.05).until(settled(None))
        # The slider is a visually hidden range input, so keys go to it through the focus.
        slider = driver.find_element(By.CSS_SELECTOR, '[data-testid="stSlider"] input[type="range"]')

        def press(key) -> None:
            driver.execute_script("arguments[0].focus();", slider)
            ActionChains(driver).send_keys(key).perform()

        for _ in range(int(slider.get_property("value")), GRID):
            press(Keys.ARROW_RIGHT)
            source = WebDriverWait(driver, 600, 0.05).until(settled(source))
        seconds = []
        for _ in range(repeats):
            press(Keys.ARROW_LEFT)
            source = WebDriverWait(driver, 600, 0.05).until(settled(source))
            started = time.perf_counter()
            press(Keys.ARROW_RIGHT)
            source = WebDriverWait(driver, 600, 0.05).until(settled(source))
            seconds.append(time.perf_counter() - started)
            if slider.get_property("value") != str(GRID):
                raise RuntimeError(f"the slider shows {slider.get_property('value')}, expected {GRID}")
        return seconds
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="finished run folder with the default architecture (default: make one)")
    parser.add_argument("--repeats", type=int, default=5, help="timed slider changes (default 5)")
    parser.add_argument("--browser", action="store_true",
                        help="also time the change end to end in headless Chromium (needs chromium, chromium-driver "
                             "and selenium)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import streamlit as st
    import torch
    from streamlit.testing.v1 import AppTest

    from synthgen.app_support import GeneratorChoice, load_choice
    from tests.dataset_builds import spread_label_release

    torch.set_num_threads(THREADS)
    run_dir = Path(args.run_dir) if args.run_dir else make_run()
    generator = spread_label_release(run_dir, WORK / "spread")
    choice = GeneratorChoice("folder", str(generator.resolve()))

    app = AppTest.from_file(str(ROOT / "app" / "synthgen_app.py"), default_timeout=600)
    app.session_state["generators_opened"] = [choice.key]
    app.session_state["generator_pending"] = choice.key
    app.run()
    app.switch_page("views/samples.py")
    app.run()

    # Cached and uncached changes alternate, so that drift in the machine's load hits both alike.
    cached, uncached = [], []
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        change_slider(app, GRID - 1)
        cached.append(change_slider(app, GRID))
        counts = grid_counts(app)
        if counts != [GRID] * GRID:
            raise RuntimeError(f"expected a {GRID} x {GRID} grid, got images per class {counts}")
        change_slider(app, GRID - 1)
        st.cache_resource.clear()
        uncached.append(change_slider(app, GRID))
    loads = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        load_choice(choice)
        loads.append(time.perf_counter() - started)
    browser = measure_in_browser(generator, args.repeats) if args.browser else []
    load_after = os.getloadavg()[0]
    logger.info("slider to grid: median %.3f s cached, %.3f s after dropping the cached pipeline%s; load average "
                "%.1f before, %.1f after", statistics.median(cached), statistics.median(uncached),
                f", {statistics.median(browser):.3f} s in Chromium" if browser else "", load_before, load_after)

    machine = (f"1-minute load average {load_before:.1f} before and {load_after:.1f} after on "
               f"{len(os.sched_getaffinity(0))} cores")
    in_process = (f"AppTest in-process, torch with {THREADS} threads; a {GRID} x {GRID} grid of the default MNIST "
                  f"architecture, page rendering and downloads included, browser rendering not; {machine}")
    end_to_end = (f"headless Chromium and `synthgen app` on the same machine, from the key press on the slider to "
                  f"the decoded new grid image and the end of the script run; {machine}")
    fields = {"seeds": 1, "repeats": args.repeats, "load_average": [round(load_before, 1), round(load_after, 1)]}
    measured = [("slider_to_grid_seconds", cached, in_process), ("slider_to_grid_uncached_seconds", uncached, in_process),
                ("generator_load_seconds", loads, in_process)]
    if browser:
        measured.append(("slider_to_grid_browser_seconds", browser, end_to_end))
    records = [
        record("app", metric, round(statistics.median(values), 3), spread=round(statistics.stdev(values), 3)
               if len(values) > 1 else None, note=note, **fields)
        for metric, values, note in measured
    ]
    path = write_records("app", records)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
