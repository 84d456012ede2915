"""Measure publishing and pulling a generator release, and DPSDPipeline sampling throughput.

The Hub is the local Hub-compatible test server (tests/hub_server.py) on 127.0.0.1, so the
push and pull times are the client-side work (staging, card, checks, hashing, cache install,
loading) without network transfer. Records go to benchmarks/results/hub.json:

- benchmark "hub": push_seconds, pull_seconds (cold cache), pull_offline_seconds (from the cache);
- benchmark "pipeline": images_per_second of DPSDPipeline, per output type.

Without --run-dir the script makes a run with the default MNIST architecture (generator width
32, latent 100, student width 32, hidden 256) from a teacher trained briefly on a subset of
real MNIST. These timings depend on the model sizes, not on how well the models are trained.

Usage: python scripts/benchmark_hub.py [--run-dir RUN] [--repeats 5] [--images 4096] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(tempfile.mkdtemp(prefix="synthgen-bench-hub-"))
TOKEN = "hf_benchmark_token"
# huggingface_hub reads these when first imported: set them before anything imports it, so that
# no request can leave the loopback server.
os.environ.update({"HF_HOME": str(WORK / "hf-home"), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
                   "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost"})
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from tests.hub_server import LocalHub  # noqa: E402

HUB = LocalHub(valid_tokens={TOKEN}).start()
os.environ["HF_ENDPOINT"] = HUB.url

from bench_common import record, write_records  # noqa: E402

logger = logging.getLogger("benchmark")


def make_run(args) -> Path:
    """Train a teacher briefly on real MNIST and transcribe it with the default architecture."""
    from synthgen.config import TeacherTrainConfig, TranscribeConfig
    from synthgen.data import load_image_data, locate_dataset
    from synthgen.teacher import train_teacher
    from synthgen.transcribe import transcribe

    mnist = locate_dataset("mnist", fetch=False)  # no download: this script talks to 127.0.0.1 only
    train = load_image_data(mnist, "train").subset(2000, seed=0)
    teacher_dir = WORK / "teacher"
    teacher_config = TeacherTrainConfig(data=str(mnist), out=str(teacher_dir), epochs=1, batch_size=64)
    train_teacher(teacher_config, train, None)
    run_dir = WORK / "run"
    config = TranscribeConfig(teacher=str(teacher_dir), out=str(run_dir), eval_data=str(mnist), eval_limit=1000,
                              mechanism="gaussian", epsilon=10.0, delta=1e-5, steps=args.steps, batch_size=64,
                              eval_every=0, checkpoint_every=args.steps, replay_size=1024, replay_batch=64,
                              ledger=str(WORK / "ledger.duckdb"), device="cpu")
    transcribe(config)
    return run_dir


def timed(function, repeats: int) -> list[float]:
    seconds = []
    for index in range(repeats):
        started = time.perf_counter()
        function(index)
        seconds.append(time.perf_counter() - started)
    return seconds


def summary(values: list[float]) -> tuple[float, float | None]:
    return statistics.median(values), (statistics.stdev(values) if len(values) > 1 else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="finished run to publish (default: make one, see the module docstring)")
    parser.add_argument("--steps", type=int, default=20, help="transcription iterations of the run made here")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per metric; median and stdev reported")
    parser.add_argument("--images", type=int, default=4096, help="images per throughput measurement")
    parser.add_argument("--batch-size", type=int, default=256, help="DPSDPipeline batch size")
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1024 images: checks the script runs")
    parser.add_argument("--keep", action="store_true", help=f"keep the work folder {WORK} (run, caches)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.images, args.steps = 2, 1024, 5
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "huggingface_hub", "diffusers", "synthgen.hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    from synthgen.hub import pull, push

    try:
        run_dir = Path(args.run_dir) if args.run_dir else make_run(args)
        report = json.loads((run_dir / "privacy_report.json").read_text())
        privacy = {"unit": report["unit"], "mechanism": report["mechanism"]["name"], "epsilon": report["epsilon"],
                   "delta": report["delta"]}
        weights = sum(path.stat().st_size for path in run_dir.glob("*/diffusion_pytorch_model.safetensors"))
        generator_config = report["public_facts"]["generator"]
        common = {"repeats": args.repeats, "weights_bytes": weights, "seeds": 1,
                  "generator": {k: generator_config[k] for k in ("latent_dim", "width", "image_size", "channels")},
                  "threads": torch.get_num_threads()}
        hub_note = ("local Hub-compatible test server on 127.0.0.1 (tests/hub_server.py): client-side time, no "
                    "network transfer")
        records = []

        push(run_dir, "bench/warm-up")  # imports and first-call costs are not part of a push
        push_seconds = timed(lambda i: push(run_dir, f"bench/release-{i}"), args.repeats)
        pull_seconds = timed(lambda i: pull(f"bench/release-{i}", cache_dir=WORK / f"cache-{i}"), args.repeats)
        os.environ["HF_HUB_OFFLINE"] = "1"  # synthgen reads it per call; the cache from the pulls above serves
        requests_before = HUB.request_count()
        offline_seconds = timed(lambda i: pull(f"bench/release-{i}", cache_dir=WORK / f"cache-{i}"), args.repeats)
        if HUB.request_count() != requests_before:
            raise RuntimeError("an offline pull sent requests to the Hub")
        for metric, values in (("push_seconds", push_seconds), ("pull_seconds", pull_seconds),
                               ("pull_offline_seconds", offline_seconds)):
            value, spread = summary(values)
            records.append(record("hub", metric, round(value, 4), spread=round(spread, 4) if spread else None,
                                  note=hub_note, **privacy, **common))

        pipeline = pull("bench/release-0", cache_dir=WORK / "cache-0").pipeline
        for output_type in ("pt", "pil"):
            pipeline(num_images=args.batch_size, generator=torch.Generator().manual_seed(0), output_type=output_type)
            rates = [args.images / seconds for seconds in timed(
                lambda i: pipeline(num_images=args.images, generator=torch.Generator().manual_seed(i),
                                   output_type=output_type, batch_size=args.batch_size), args.repeats)]
            value, spread = summary(rates)
            records.append(record("pipeline", "images_per_second", round(value, 1),
                                  spread=round(spread, 1) if spread else None, output_type=output_type,
                                  image_size="x".join(map(str, report["public_facts"]["image_shape"])),
                                  batch_size=args.batch_size, images=args.images, **privacy, **common))
        path = write_records("hub", records, replace_keys=("benchmark", "metric", "output_type", "dataset"))
        for entry in records:
            name = entry["metric"]
            if "output_type" in entry:
                name += f" [{entry['output_type']}]"
            logger.info("%s %s: %s (spread %s)", entry["benchmark"], name, entry["value"], entry["spread"])
        logger.info("wrote %d records to %s", len(records), path)
    finally:
        HUB.stop()
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
