"""Measure the dataset builder's throughput against the raw generator + student forward pass.

Both numbers come from the same process run, so their ratio (forward_ratio) is the figure to
compare across machines. On 2 shared CPU cores, one throughput measured alone varied up to 2x
between runs.

1. A generator: --generator RUN_OR_RELEASE, or a small run made here from real MNIST (a teacher on
   2,000 images, then a transcription of a few steps at the default architecture: generator
   width 32, latent 100, student width 32, hidden 256). Throughput does not depend on training.
2. Raw forward: latents drawn per block of 256 as the builder does, generator forward, 8-bit
   rounding, student forward in float32, no output. Measured before and after the build; the
   mean is used.
3. Build: `synthgen build-dataset --num-samples ROWS` in this process into a temporary folder,
   timed end to end (loading, every shard, the card). The student labels in float64 there.
4. Sampling of 8 blocks in chunks against whole blocks, alternately: chunk_speedup.
5. With --processes N: the same build under `torchrun --nproc_per_node N`, one torch thread per
   process, timed by the build itself (from loading the generator to the card, without the
   start of Python and its imports).

Records go to benchmarks/results/build.json: images_per_second, forward_ratio and chunk_speedup,
and with --processes images_per_second_processes.

With --augment, both builds apply those transforms before the student labels the images (for
example `mixup`, which blends half of the images in pairs); the raw forward stays without them.

Usage: python scripts/benchmark_build.py [--rows 20000] [--shard-size 5000] [--generator PATH] [--threads T]
                                         [--processes N] [--precision bfloat16] [--augment mixup]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import record, write_records  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logger = logging.getLogger("benchmark")


def make_generator(work: Path, seed: int) -> Path:
    """Train a small teacher on real MNIST and transcribe it for a few steps; return the run folder."""
    from synthgen.config import TeacherTrainConfig, TranscribeConfig
    from synthgen.data import load_image_data, locate_dataset
    from synthgen.teacher import train_teacher
    from synthgen.transcribe import transcribe

    data = locate_dataset("mnist")
    teacher = work / "teacher"
    train = load_image_data(data, "train").subset(2000, seed=seed)
    train_teacher(TeacherTrainConfig(data=str(data), out=str(teacher), epochs=1, seed=seed), train)
    run = work / "run"
    transcribe(TranscribeConfig(teacher=str(teacher), out=str(run), mechanism="gaussian",
                                epsilon=10.0, steps=4, batch_size=64, eval_every=0, seed=seed,
                                ledger=str(work / "ledger.duckdb"), device="cpu"))
    return run


def raw_forward(pipeline, rows: int) -> float:
    """Return images per second of latents + generator + 8-bit rounding + float32 student, in blocks of 256.

    The forward passes run in chunks of CPU_CHUNK images, as the builder runs them, because that is
    the fastest way found for both models on a CPU; the student stays in float32 here.
    """
    import torch

    from synthgen.sampling import BLOCK_SIZE, CPU_CHUNK, block_seed, student_logits

    generator, student = pipeline.generator.eval(), pipeline.student.eval()
    blocks = max(1, rows // BLOCK_SIZE)
    started = time.perf_counter()
    with torch.inference_mode():
        for block in range(blocks):
            rng = torch.Generator().manual_seed(block_seed(0, block))
            latents = torch.randn(BLOCK_SIZE, generator.config.latent_dim, generator=rng)  # (B, latent_dim)
            images = torch.cat([generator(part) for part in latents.split(CPU_CHUNK)])  # (B, C, H, W)
            images = (images.clamp(0, 1) * 255).round() / 255
            student_logits(student, images).softmax(dim=1).max(dim=1)
    return blocks * BLOCK_SIZE / (time.perf_counter() - started)


def chunk_speedup(generator: Path, blocks: int) -> tuple[float, float]:
    """Return images per second of whole-block and chunked sampling, timed alternately block by block.

    Whole-block sampling is DPSDPipeline on 256 images at once, as the builder ran before it used
    chunks; both give the same rows (tests/test_build.py checks it).
    """
    import torch

    from synthgen.generator_source import load_generator
    from synthgen.sampling import BLOCK_SIZE, block_seed, draw_block, prepare_pipeline

    pipeline = prepare_pipeline(load_generator(str(generator)).pipeline, torch.device("cpu"))
    whole = chunked = 0.0
    for block in range(blocks):
        started = time.perf_counter()
        rng = torch.Generator().manual_seed(block_seed(0, block))
        pipeline(num_images=BLOCK_SIZE, generator=rng, output_type="pt", batch_size=BLOCK_SIZE)
        whole += time.perf_counter() - started
        started = time.perf_counter()
        draw_block(pipeline, 0, block)
        chunked += time.perf_counter() - started
    return blocks * BLOCK_SIZE / whole, blocks * BLOCK_SIZE / chunked


def build_in_processes(generator: Path, out: Path, args) -> float:
    """Build the same rows under torchrun in args.processes processes; return images per second of the build."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).resolve().parent / "build_dataset.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
               str(args.processes), "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
               str(generator), "--num-samples", str(args.rows), "--shard-size", str(args.shard_size), "--seed",
               str(args.seed), "--out", str(out), "--device", "cpu", "--threads", "1", "--no-catalog", "--overwrite",
               "--precision", args.precision]
    if args.augment:
        command += ["--augment", args.augment]
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    manifest = json.loads((out / "synthgen_dataset.json").read_text())
    rate = manifest["rows"] / manifest["build_seconds"]
    logger.info("build in %d processes: %.0f images/s", args.processes, rate)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the timed build (default 20000)")
    parser.add_argument("--shard-size", type=int, default=5_000, help="rows per shard (default 5000)")
    parser.add_argument("--generator", help="run or release folder to sample from (default: make a small run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the small run and of the build (default 0)")
    parser.add_argument("--work", help="folder for the small run and the build (default: a temporary folder)")
    parser.add_argument("--threads", type=int, help="torch threads of the raw forward and the build (default: torch's)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                        help="generator precision of the raw forward and the builds (default float32)")
    parser.add_argument("--augment", help="transforms of the builds, as in build-dataset --augment (default: none)")
    parser.add_argument("--processes", type=int, default=0,
                        help="also build with torchrun in this many processes of one thread each (default: no)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    import torch

    from synthgen.build import BuildConfig, build_dataset
    from synthgen.generator_source import load_generator
    from synthgen.sampling import set_generator_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="synthgen-benchmark-build-"))
    try:
        generator = Path(args.generator) if args.generator else make_generator(work, args.seed)
        source = load_generator(str(generator))
        source.pipeline.set_progress_bar_config(disable=True)
        set_generator_precision(source.pipeline.generator, args.precision)

        load_before = os.getloadavg()[0]
        raw_before = raw_forward(source.pipeline, min(args.rows, 10_240))
        logger.info("raw generator + student forward: %.0f images/s", raw_before)
        out = work / "dataset"
        started = time.perf_counter()
        result = build_dataset(BuildConfig(generator=str(generator), num_samples=args.rows, shard_size=args.shard_size,
                                           seed=args.seed, out=str(out), overwrite=out.exists(), device="cpu",
                                           threads=args.threads, record=False, precision=args.precision,
                                           augment=args.augment or "none"))
        build_rate = result.rows / (time.perf_counter() - started)
        raw_after = raw_forward(source.pipeline, min(args.rows, 10_240))
        raw = (raw_before + raw_after) / 2
        logger.info("build: %.0f images/s; raw forward after the build: %.0f images/s; ratio %.2f", build_rate,
                    raw_after, build_rate / raw)

        whole_rate, chunked_rate = chunk_speedup(generator, blocks=8)
        logger.info("sampling with the float64 student: whole blocks %.0f images/s, chunks %.0f images/s",
                    whole_rate, chunked_rate)

        config = source.pipeline.generator.config
        common = dict(
            rows=args.rows, shard_size=args.shard_size, image_shape=list(source.image_shape),
            generator={key: config[key] for key in ("latent_dim", "width", "image_size", "channels")},
            student={key: source.pipeline.student.config[key] for key in ("width", "hidden")},
            threads=torch.get_num_threads(), raw_images_per_second=round(raw, 1),
            raw_images_per_second_before_after=[round(raw_before, 1), round(raw_after, 1)],
            # Other work on a shared machine lowers both throughputs; the ratio is less affected.
            load_average_before_after=[round(load_before, 2), round(os.getloadavg()[0], 2)],
            cpu_cores=len(os.sched_getaffinity(0)), precision=args.precision, augment=args.augment,
        )
        records = [
            record("build", "images_per_second", round(build_rate, 1), **common,
                   note="labelled images written into parquet per second, end to end in one process: loading, "
                        "PNG encoding, shards and card"),
            record("build", "forward_ratio", round(build_rate / raw, 3), **common,
                   note="build images/s divided by the raw generator + float32 student forward images/s measured in "
                        "the same run (mean of before and after the build)"),
        ]
        records.append(record(
            "build", "chunk_speedup", round(chunked_rate / whole_rate, 3), **common,
            whole_block_images_per_second=round(whole_rate, 1), chunked_images_per_second=round(chunked_rate, 1),
            note="sampling speed with forward passes in chunks of 32 images over whole blocks of 256 (the same rows), "
                 "8 blocks each, timed alternately"))
        if args.processes > 1:
            rate = build_in_processes(generator, work / "dataset-processes", args)
            records.append(record(
                "build", "images_per_second_processes", round(rate, 1), **{**common, "threads": 1},
                processes=args.processes,
                note=f"labelled images written into parquet per second by torchrun with {args.processes} processes "
                     "of one torch thread each, timed by the build from loading the generator to the card"))
        # Throughput depends on the CPU (bfloat16 runs fast only with AMX or AVX-512 BF16), so records
        # of another machine are kept beside this one's.
        path = write_records("build", records,
                             replace_keys=("metric", "precision", "processes", "augment", "hardware"))
        logger.info("wrote %s", path)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
