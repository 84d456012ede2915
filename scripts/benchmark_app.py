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
  change (a Hub release would be pulled again on top of that).

Both records carry the machine's 1-minute load average before and after: on a shared machine a
load above the core count slows every number here.

The generator has the default MNIST architecture (latent 100, generator width 32, student width
32, hidden 256). Its student is replaced by one whose labels spread over the classes (as in
tests/dataset_builds.py), because a briefly trained student labels most images as a few classes
and cannot fill a 10 x 10 grid; the time depends on the model sizes, not on its training.

Usage: python scripts/benchmark_app.py [--run-dir RUN] [--repeats 5]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="finished run folder with the default architecture (default: make one)")
    parser.add_argument("--repeats", type=int, default=5, help="timed slider changes (default 5)")
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
    load_after = os.getloadavg()[0]
    logger.info("slider to grid: median %.3f s cached, %.3f s after dropping the cached pipeline; load average "
                "%.1f before, %.1f after", statistics.median(cached), statistics.median(uncached), load_before,
                load_after)

    note = (f"AppTest in-process, torch with {THREADS} threads; a {GRID} x {GRID} grid of the default MNIST "
            "architecture, page rendering and downloads included, browser rendering not; 1-minute load average "
            f"{load_before:.1f} before and {load_after:.1f} after on {len(os.sched_getaffinity(0))} cores")
    fields = {"seeds": 1, "repeats": args.repeats, "note": note,
              "load_average": [round(load_before, 1), round(load_after, 1)]}
    records = [
        record("app", metric, round(statistics.median(values), 3), spread=round(statistics.stdev(values), 3)
               if len(values) > 1 else None, **fields)
        for metric, values in (("slider_to_grid_seconds", cached), ("slider_to_grid_uncached_seconds", uncached),
                               ("generator_load_seconds", loads))
    ]
    path = write_records("app", records)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
