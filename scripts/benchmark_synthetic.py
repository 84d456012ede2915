"""Train on synthetic, test on real: the synthetic_accuracy of a transcription run's generator.

1. Build --samples rows (default 60,000, seed 0) from RUN's generator and student. A DP run goes
   through `synthgen build-dataset` (the product path). The builder rejects a non-private run,
   so the rows of such a control run are written with `synthgen.build.write_rows`, which gives
   the same rows without the card and the privacy check.
2. Run `synthgen evaluate synthetic` (its Python API, `evaluate_synthetic`) on those rows with the
   real test split: a fixed classifier trained only on the synthetic rows, the epoch chosen on a
   synthetic validation split, the real test split scored once per seed.
3. Record synthetic_accuracy in benchmarks/results/synthetic_utility.json with the run's unit,
   epsilon, delta and mechanism taken from its privacy report, and the student's accuracy from the
   same report for comparison.

Usage:
    python scripts/benchmark_synthetic.py RUN --real-test mnist [--samples 60000] [--seeds 1] [--epochs 10]
        [--augment affine --method NAME] [--targets soft [--temperature 4]]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPLACE_KEYS, record, write_records  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logger = logging.getLogger("benchmark")


def build_rows(run: Path, report: dict, out: Path, samples: int, seed: int, threads: int | None,
               augment: str = "none") -> float:
    """Build `samples` rows from `run` into `out`; return the build's seconds."""
    import torch

    from synthgen.build import DATA_DIR, BuildConfig, build_dataset, write_rows
    from synthgen.generator_source import local_digest
    from synthgen.models import Classifier, Generator
    from synthgen.pipeline import DPSDPipeline
    from synthgen.sampling import prepare_pipeline

    started = time.perf_counter()
    # `out` is this benchmark's own folder, and a control run may have left rows there without a
    # manifest, which the builder would not overwrite.
    shutil.rmtree(out, ignore_errors=True)
    if report.get("private"):
        build_dataset(BuildConfig(generator=str(run), num_samples=samples, seed=seed, out=str(out), device="cpu",
                                  threads=threads, record=False, augment=augment))
    else:
        logger.info("%s is not private (mechanism %s): writing its rows without the builder's privacy check", run,
                    (report.get("mechanism") or {}).get("name"))
        if threads:
            torch.set_num_threads(threads)
        pipeline = DPSDPipeline(generator=Generator.from_pretrained(run / "generator", use_safetensors=True),
                                student=Classifier.from_pretrained(run / "student", use_safetensors=True))
        pipeline = prepare_pipeline(pipeline, torch.device("cpu"))
        provenance = {"generator": str(run), "generator_commit": local_digest(run)}
        write_rows(out / DATA_DIR, pipeline, seed, samples, 10_000, pipeline.class_names, provenance,
                   augment=augment)
    return time.perf_counter() - started


def real_test_path(value: str) -> str:
    from synthgen.data import locate_dataset

    return str(locate_dataset(value)) if value in ("mnist", "fashion-mnist") else value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="transcription run folder with generator/, student/ and privacy_report.json")
    parser.add_argument("--real-test", required=True,
                        help="real data with a test split: 'mnist', 'fashion-mnist' or a path (IDX, parquet, folders)")
    parser.add_argument("--dataset-name", help="name of the real data in the record (default: --real-test's name)")
    parser.add_argument("--samples", type=int, default=60_000, help="synthetic rows to build (default 60000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic rows (default 0)")
    parser.add_argument("--seeds", type=int, default=1, help="classifiers trained, seeds 0..N-1 (default 1)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each classifier (default 10)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--work", help="folder for the synthetic rows, kept afterwards (default: a temporary folder)")
    parser.add_argument("--note", default="", help="text added to the record's note")
    parser.add_argument("--augment", default="none",
                        help="transforms before labelling, as `synthgen build-dataset --augment` (default none); "
                             "stored in the record's augment field")
    parser.add_argument("--targets", default="hard", choices=("hard", "soft"),
                        help="what the classifier learns, as `synthgen evaluate synthetic --targets` (default hard); "
                             "soft is stored in the record's targets field")
    parser.add_argument("--temperature", type=float, default=4.0, help="distillation temperature of --targets soft")
    parser.add_argument("--method", default="synthgen",
                        help="method name of the record; runs of one teacher with other settings need their own")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    run = Path(args.run).expanduser().resolve()
    report_path = run / "privacy_report.json"
    if not report_path.is_file():
        parser.error(f"{report_path} not found; give a finished transcription run folder")
    if args.samples < 2:
        parser.error(f"--samples must be >= 2, got {args.samples}")
    from synthgen.sampling import SamplingError, parse_augment

    try:
        augment = parse_augment(args.augment)
    except SamplingError as error:
        parser.error(str(error))
    if args.targets == "soft" and not (math.isfinite(args.temperature) and args.temperature > 0):
        parser.error(f"--temperature must be a finite number > 0, got {args.temperature!r}; distillation commonly "
                     "uses 4")
    report = json.loads(report_path.read_text())

    import torch

    from synthgen.evaluate import EvaluateConfig, describe_classifier, evaluate_synthetic, targets_field

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="synthgen-benchmark-synthetic-"))
    try:
        dataset = work / "dataset"
        build_seconds = build_rows(run, report, dataset, args.samples, args.seed, args.threads, args.augment)
        logger.info("built %d rows in %.0f s", args.samples, build_seconds)
        real_test = real_test_path(args.real_test)
        name = args.dataset_name or Path(args.real_test).name.lower()
        started = time.perf_counter()
        config = EvaluateConfig(dataset=str(dataset), real_test=real_test, epochs=args.epochs, seeds=args.seeds,
                                device="cpu", dataset_name=name, results="", record=False, targets=args.targets,
                                temperature=args.temperature)
        result = evaluate_synthetic(config)
        evaluate_seconds = time.perf_counter() - started
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    student = (report.get("evaluation") or {}).get("student_accuracy")
    mechanism = (report.get("mechanism") or {}).get("name")
    learns = ("the student's probabilities as soft targets" if args.targets == "soft" else "labels from the student")
    note = (f"fixed classifier trained only on the synthetic rows ({learns}), epoch chosen on a "
            "synthetic validation split, real test split scored once per seed; evaluation on real data, not covered "
            "by the privacy guarantee")
    entry = record(
        "synthetic_utility", "synthetic_accuracy", round(result.test_accuracy, 2), dataset=name,
        method=args.method,
        unit=report.get("unit"), mechanism=mechanism, epsilon=report.get("epsilon") if report.get("private") else None,
        delta=report.get("delta") if report.get("private") else None,
        spread=round(result.test_accuracy_std, 2) if result.test_accuracy_std is not None else None, seeds=args.seeds,
        run=str(run), samples=args.samples, sample_seed=args.seed, train_rows=result.train_rows,
        validation_rows=result.validation_rows, test_rows=result.test_rows,
        validation_accuracy=round(result.validation_accuracy, 2), per_seed=result.per_seed,
        student_accuracy=student, gap_to_student=round(student - result.test_accuracy, 2) if student else None,
        classifier=describe_classifier(config), epochs=args.epochs, threads=torch.get_num_threads(),
        build_seconds=round(build_seconds, 1), evaluate_seconds=round(evaluate_seconds, 1),
        note=f"{note}{'; ' + args.note if args.note else ''}",
    )
    if augment:
        entry["augment"] = "+".join(augment)
    if args.targets == "soft":
        entry["targets"] = targets_field(config)
    # A record replaces an older one only with the same augmentation, targets (both absent on
    # plain builds with hard labels) and epochs, so a variant never overwrites the plain number of a run.
    path = write_records("synthetic_utility", [entry], replace_keys=REPLACE_KEYS + ("augment", "targets", "epochs"))
    logger.info("synthetic accuracy %.2f%% (student %s%%), %s, epsilon %s; wrote %s", result.test_accuracy, student,
                entry["unit"] or "not private", entry["epsilon"], path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
