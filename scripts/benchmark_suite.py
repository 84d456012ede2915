"""Benchmark suite: utility and speed in one command, rendered beside the published anchors.

Full mode (hours on 2 CPU cores; never in CI) reuses the single benchmarks:

1. `scripts/benchmark_transcribe.py --dataset D --seed S` for MNIST and Fashion-MNIST and seeds
   0, 1, 2: the non-private teacher, the noise-free engine, one teacher at teacher-level
   epsilon 1 and 10 with the gaussian and noisy-label mechanisms, and a DP-SGD teacher at
   example-level epsilon 1 and 10 (also the DP-SGD baseline) transcribed as post-processing;
2. train-on-synthetic accuracy of every private run: 60,000 images built from its generator,
   labelled by its student, a fresh classifier trained on them only (epoch selected on
   synthetic validation data) and scored on the real test split (`synthetic.json`);
3. `scripts/benchmark_ensemble.py` (MNIST, example-level teacher ensemble at the same epsilons,
   and the stacked-ensemble against Python-loop speedup), `scripts/benchmark_build.py` and
   `scripts/benchmark_hub.py` for the throughput figures;
4. steps and queries per second of every transcription, from its privacy report (`speed.json`);
5. `utility.json`: mean and standard deviation over the seeds of every accuracy;
6. the per-class sample grid of each seed-0 run copied to docs/benchmarks/, then
   `scripts/render_benchmarks.py` (tables, privacy-utility plots, docs/benchmarks.md).

Quick mode (`--quick`, meant to finish in under 10 minutes on 2 CPU cores) runs small versions
of steps 1, 2, 4, 5 and 6 in this process, on one dataset and one seed. It trains a teacher on a
subset of the training set, runs short transcriptions and builds a small synthetic set. It checks
that the machinery works and writes valid records, by default into runs/benchmark-suite-quick/
(records, plots and a rendered page) and never into benchmarks/results/. Its numbers are not for
the record.

Usage:
    python scripts/benchmark_suite.py --quick
    python scripts/benchmark_suite.py                  # full: hours
    python scripts/benchmark_suite.py --skip-runs      # full: only steps 2, 4, 5, 6 on finished runs
    python scripts/benchmark_suite.py --skip-runs --no-synthetic --seeds 0   # tables from finished runs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_common import RESULTS, ROOT, record, record_errors, write_records  # noqa: E402

import render_benchmarks  # noqa: E402
from benchmark_transcribe import SCATTER_RECIPES, scatter_head  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
logger = logging.getLogger("benchmark_suite")

DELTA = 1e-5
ACCURACY_METRICS = ("teacher_accuracy", "student_accuracy", "synthetic_accuracy")
# Architecture of the DP-SGD teacher and of the student transcribed from it, as in
# scripts/benchmark_transcribe.py, so that the DP-SGD baseline and the student share it.
DP_WIDTH = 16
DP_HIDDEN = 64


# ---------------------------------------------------------------- shared by both modes


def synthetic_accuracy(run_dir: Path, real_data: str, rows: int, epochs: int, seed: int, work: Path) -> float:
    """Build `rows` synthetic images from a finished run and return the real test accuracy of a
    fresh classifier trained on them only."""
    from synthgen.build import BuildConfig, build_dataset
    from synthgen.evaluate import EvaluateConfig, evaluate_synthetic

    out = work / f"synthetic-{run_dir.name}"
    if out.exists():
        shutil.rmtree(out)
    build_dataset(BuildConfig(generator=str(run_dir), num_samples=rows, seed=seed, shard_size=max(rows, 1),
                              out=str(out), record=False))
    result = evaluate_synthetic(EvaluateConfig(dataset=str(out), real_test=real_data, epochs=epochs, seed=seed,
                                               seeds=1, results="", record=False))
    shutil.rmtree(out, ignore_errors=True)
    return result.test_accuracy


def run_fields(report: dict) -> dict:
    """Return the record fields that describe a run's privacy, from its privacy report."""
    return {"unit": report.get("unit"), "epsilon": report.get("epsilon"), "delta": report.get("delta"),
            "mechanism": report["mechanism"]["name"]}


def speed_records(report: dict, dataset: str, seed: int, **fields) -> list[dict]:
    """Return transcribe_seconds, steps_per_second and queries_per_second of one finished run."""
    seconds = max(float(report["wall_seconds"]), 1e-9)
    # The method names the run's settings, so that runs of one teacher with other settings keep
    # their own speed records.
    common = dict(dataset=dataset, seed=seed, steps=report["steps"], queries=report["queries"],
                  method="synthgen" + run_tag(report, dataset), **fields)
    return [
        record("speed", "transcribe_seconds", round(seconds, 1), **common),
        record("speed", "steps_per_second", round(report["steps"] / seconds, 3), **common),
        record("speed", "queries_per_second", round(report["queries"] / seconds, 1), **common),
    ]


def target_epsilon(epsilon: float | None, targets: list[float]) -> float | None:
    """Return the target a run's spent epsilon was calibrated to: the target within 5% at or above it.

    Calibration spends at most the target, and slightly less in practice (0.9993 for 1). Seeds of
    one setting therefore differ in the last digits, and the target groups them.
    """
    if epsilon is None:
        return None
    for target in targets:
        if target * 0.95 <= epsilon <= target * (1 + 1e-6):
            return target
    return epsilon


def aggregate(records: list[dict], targets: list[float]) -> list[dict]:
    """Return one utility record per accuracy and setting: mean and standard deviation over seeds.

    The record's epsilon is the largest spent over the seeds, and `target_epsilon` the target.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for entry in records:
        if entry["metric"] in ACCURACY_METRICS:
            key = tuple(json.dumps(entry.get(name)) for name in ("dataset", "metric", "method", "mechanism", "unit",
                                                                   "delta"))
            groups[key + (target_epsilon(entry["epsilon"], targets),)].append(entry)
    summary = []
    for key, entries in groups.items():
        values = [float(e["value"]) for e in entries]
        seeds = sorted({e.get("seed") for e in entries}, key=str)
        spent = [e["epsilon"] for e in entries if e["epsilon"] is not None]
        first = entries[0]
        if len(entries) == 1:  # one record, perhaps already a mean over seeds (the ensemble benchmark writes those)
            spread, seed_count = first.get("spread"), first.get("seeds") or 1
        else:
            spread, seed_count = round(statistics.stdev(values), 2), len(values)
        # The mean keeps where its seeds were measured, not where this summary was computed.
        sources = {name: "; ".join(sorted({str(e.get(name)) for e in entries})) for name in ("commit", "hardware")}
        summary.append(record(
            "utility", first["metric"], round(statistics.fmean(values), 2), **sources,
            spread=spread, seeds=seed_count,
            dataset=first["dataset"], method=first["method"], mechanism=first["mechanism"], unit=first["unit"],
            epsilon=max(spent) if spent else None, target_epsilon=key[-1], delta=first["delta"], seed_values=seeds,
            note="mean and standard deviation over seeds; accuracy on the real test split (evaluation on "
                 "private data)",
        ))
    return sorted(summary, key=lambda e: json.dumps([e["dataset"], e["metric"], e["method"], e["mechanism"],
                                                     e["unit"], e["epsilon"]]))


def run_tag(report: dict, dataset: str) -> str:
    """Return the suffix that distinguishes a run's teacher and generator settings, e.g. "-scatter-20ep-adv0-g4"."""
    # Scattering teachers share mechanism, unit and epsilon with the pixel DP teacher; name them apart.
    teacher = report.get("teacher_dp") or {}
    tag = f"-scatter-{teacher['epochs']}ep" if teacher.get("frontend") == "scatter" else ""
    # A teacher trained at a learning rate that no recipe of its length uses (--scatter-lr) gets
    # the rate in its name, so that its runs do not replace those of the recipe.
    if tag:
        rates = {recipe[dataset][1] for name, recipe in SCATTER_RECIPES.items()
                 if dataset in recipe and recipe[dataset][2] == teacher.get("epochs")
                 and scatter_head(name) == teacher.get("head", "dense")}
        if teacher.get("learning_rate") not in rates:
            tag += f"-lr{teacher.get('learning_rate'):g}"
    # Runs of one teacher with other generator losses make very different images: name the
    # settings that differ from the defaults (no image prior, adversarial weight 1, 1 generator step).
    hyperparameters = (report.get("public_facts") or {}).get("hyperparameters", {})
    prior = hyperparameters.get("stroke_prior_weight")
    silhouette = hyperparameters.get("silhouette_prior_weight")
    adversarial = hyperparameters.get("adversarial_weight", 1.0)
    generator_steps = hyperparameters.get("generator_steps", 1)
    tag += f"-stroke-prior{prior:g}" if prior else ""
    tag += f"-silhouette-prior{silhouette:g}" if silhouette else ""
    tag += f"-adv{adversarial:g}" if adversarial != 1.0 else ""
    tag += f"-g{generator_steps}" if generator_steps != 1 else ""
    return tag


def copy_grid(run_dir: Path, plots: Path, dataset: str, fields: dict) -> None:
    """Copy a run's per-class sample grid into the plots folder under a name that says what it is."""
    grid = run_dir / "samples.png"
    if not grid.is_file():
        return
    epsilon = "none" if fields["epsilon"] is None else f"eps{fields['epsilon']:.2g}"
    unit = fields["unit"] or "not-private"
    tag = run_tag(json.loads((run_dir / "privacy_report.json").read_text()), dataset)
    plots.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid, plots / f"samples-{dataset}-{fields['mechanism']}-{unit}-{epsilon}{tag}.png")


def check_records(records: list[dict]) -> None:
    problems = [(entry.get("metric"), error) for entry in records for error in record_errors(entry)]
    if problems:
        raise SystemExit(f"invalid result records: {problems[:10]}")


def finish(args, records: dict[str, list[dict]]) -> None:
    """Check and write the records, then render the plots and the page."""
    for name, entries in records.items():
        if not entries:
            continue
        check_records(entries)
        keys = ("metric", "unit", "mechanism", "epsilon", "method", "dataset", "seed")
        path = write_records(name, entries, replace_keys=keys, results_dir=args.results)
        logger.info("wrote %d records to %s", len(entries), path)
    if args.no_render:
        return
    for path in render_benchmarks.write_plots(args.results, args.plots):
        logger.info("wrote %s", path)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(render_benchmarks.render(args.results, args.plots, args.doc))
    logger.info("wrote %s", args.doc)


# ---------------------------------------------------------------- quick mode


def quick(args) -> dict[str, list[dict]]:
    """Run the small in-process version of the suite; see the module docstring."""
    from synthgen.config import TeacherTrainConfig, TranscribeConfig
    from synthgen.data import load_image_data
    from synthgen.teacher import train_teacher, train_teacher_dp
    from synthgen.transcribe import transcribe

    runs: list[dict] = []
    speed: list[dict] = []
    for dataset in args.datasets:
        data = data_path(args, dataset)
        train = load_image_data(data, "train").subset(args.train_limit, seed=0)
        test = load_image_data(data, "test")
        for seed in args.seeds:
            work = args.work / f"{dataset}-seed{seed}"
            work.mkdir(parents=True, exist_ok=True)
            ledger = str(work / "ledger.duckdb")
            tag = dict(dataset=dataset, seed=seed)
            transcriptions = []  # (name, teacher, settings)
            if "teacher-level" in args.cases:
                teacher_dir = work / "teacher"
                if not (teacher_dir / "synthgen_teacher.json").is_file():
                    config = TeacherTrainConfig(data=data, out=str(teacher_dir), epochs=1, seed=seed)
                    teacher = train_teacher(config, train, test)
                    accuracy = teacher.meta.test_accuracy
                else:
                    accuracy = json.loads((teacher_dir / "synthgen_teacher.json").read_text())["test_accuracy"]
                runs.append(record("suite", "teacher_accuracy", accuracy, method="synthgen-teacher", **tag,
                                   note=f"non-private teacher on {len(train)} training images"))
                for mechanism in args.mechanisms:
                    for epsilon in args.epsilons:
                        transcriptions.append((f"teacher-{mechanism}-eps{epsilon:g}", teacher_dir,
                                               dict(mechanism=mechanism, epsilon=epsilon)))
            if "dp-teacher" in args.cases:
                for epsilon in args.epsilons:
                    dp_dir = work / f"dp-sgd-teacher-eps{epsilon:g}"
                    if not (dp_dir / "synthgen_teacher.json").is_file():
                        config = TeacherTrainConfig(data=data, out=str(dp_dir), dp=True, epsilon=epsilon, delta=DELTA,
                                                    epochs=1, batch_size=256, lr=2e-3, width=DP_WIDTH,
                                                    hidden=DP_HIDDEN, seed=seed, ledger=ledger)
                        accuracy = train_teacher_dp(config, train, test).meta.test_accuracy
                    else:
                        accuracy = json.loads((dp_dir / "synthgen_teacher.json").read_text())["test_accuracy"]
                    runs.append(record("suite", "teacher_accuracy", accuracy, method="opacus-dp-sgd",
                                       mechanism="dp-sgd", unit="example", epsilon=epsilon, delta=DELTA, **tag,
                                       note="DP-SGD teacher: the DP-SGD baseline, same architecture as the student"))
                    transcriptions.append((f"dp-teacher-eps{epsilon:g}", dp_dir,
                                           dict(mechanism="dp-teacher", student_width=DP_WIDTH,
                                                student_hidden=DP_HIDDEN, student_norm="group")))
            for name, teacher_dir, settings in transcriptions:
                run_dir = work / name
                report_path = run_dir / "privacy_report.json"
                if not report_path.is_file():
                    shutil.rmtree(run_dir, ignore_errors=True)
                    transcribe(TranscribeConfig(
                        teacher=str(teacher_dir), out=str(run_dir), eval_data=data, eval_limit=args.eval_limit,
                        delta=DELTA, steps=args.steps, batch_size=args.batch_size, replay_batch=args.batch_size,
                        eval_every=0, checkpoint_every=args.steps, seed=seed, ledger=ledger, **settings))
                report = json.loads(report_path.read_text())
                fields = run_fields(report)
                runs.append(record("suite", "student_accuracy", report["evaluation"]["student_accuracy"], **fields,
                                   **tag, steps=report["steps"], queries=report["queries"],
                                   note=f"real test split, first {args.eval_limit} images (evaluation on private "
                                        "data)"))
                if args.no_synthetic:
                    continue
                accuracy = synthetic_accuracy(run_dir, data, args.synthetic_rows, args.synthetic_epochs, seed, work)
                runs.append(record("suite", "synthetic_accuracy", accuracy, **fields, **tag,
                                   note=f"fresh classifier on {args.synthetic_rows} synthetic images only"))
                speed.extend(speed_records(report, dataset, seed, **fields))
                if seed == args.seeds[0]:
                    copy_grid(run_dir, args.plots, dataset, fields)
    return {"suite-runs": runs, "speed": speed, "utility": aggregate(runs, args.epsilons)}


# ---------------------------------------------------------------- full mode


def transcribe_out(dataset: str, seed: int) -> Path:
    """Return the run folder scripts/benchmark_transcribe.py uses by default."""
    if (dataset, seed) == ("mnist", 0):
        return ROOT / "runs" / "benchmark-transcribe"
    return ROOT / "runs" / f"benchmark-transcribe-{dataset}-seed{seed}"


def run_script(arguments: list[str]) -> None:
    command = [sys.executable, *arguments]
    logger.info("running %s", " ".join(command))
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    logger.info("finished in %.0f s: %s", time.time() - started, arguments[0])


def full(args) -> dict[str, list[dict]]:
    """Run the single benchmarks, then measure and aggregate what they left; see the module docstring."""
    epsilons = ",".join(f"{e:g}" for e in args.epsilons)
    if not args.skip_runs:
        for dataset in args.datasets:
            for seed in args.seeds:
                run_script([str(SCRIPTS / "benchmark_transcribe.py"), "--dataset", dataset, "--seed", str(seed),
                            "--epsilons", epsilons])
        run_script([str(SCRIPTS / "benchmark_ensemble.py"), "--epsilons", epsilons])
        run_script([str(SCRIPTS / "benchmark_build.py")])
        run_script([str(SCRIPTS / "benchmark_hub.py")])

    synthetic: list[dict] = []
    speed: list[dict] = []
    for dataset in args.datasets:
        data = data_path(args, dataset)
        for seed in args.seeds:
            folder = transcribe_out(dataset, seed)
            for report_path in sorted(folder.glob("*/privacy_report.json")):
                run_dir = report_path.parent
                report = json.loads(report_path.read_text())
                fields = run_fields(report)
                tag = dict(dataset=dataset, seed=seed)
                speed.extend(speed_records(report, dataset, seed, **fields))
                if seed == args.seeds[0]:
                    copy_grid(run_dir, args.plots, dataset, fields)
                if fields["unit"] is None:
                    continue  # the noise-free engine: not a private result
                if args.no_synthetic:
                    continue
                accuracy = synthetic_accuracy(run_dir, data, args.synthetic_rows, args.synthetic_epochs, seed,
                                              args.work)
                synthetic.append(record("synthetic", "synthetic_accuracy", accuracy, **fields, **tag,
                                        note=f"fresh classifier on {args.synthetic_rows} synthetic images only, "
                                             "epoch selected on synthetic validation data"))
    measured = []
    for name in ("transcribe", "ensemble"):
        path = args.results / f"{name}.json"
        measured += json.loads(path.read_text()) if path.is_file() else []
    # Records without a seed field (the ensemble benchmark runs seed 0 only) count as one seed.
    per_seed = [e for e in measured if e.get("dataset") in args.datasets and e.get("seed", 0) in args.seeds]
    return {"synthetic": synthetic, "speed": speed, "utility": aggregate(per_seed + synthetic, args.epsilons)}


# ---------------------------------------------------------------- entry point


def data_path(args, dataset: str) -> str:
    from synthgen.data import locate_dataset

    return args.data.get(dataset) or str(locate_dataset(dataset))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run in this process (under 10 minutes)")
    parser.add_argument("--datasets", help="comma-separated (default: mnist for --quick, mnist,fashion-mnist)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 0 for --quick, 0,1,2)")
    parser.add_argument("--epsilons", default="1,10", help="comma-separated target epsilons at delta 1e-5")
    parser.add_argument("--cases", default="teacher-level,dp-teacher",
                        help="quick mode: comma-separated cases, teacher-level and/or dp-teacher")
    parser.add_argument("--mechanisms", default="gaussian,noisy-label",
                        help="quick mode: comma-separated mechanisms of the teacher-level case")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                        help="use PATH (IDX folder) for dataset NAME instead of the located copy; repeatable")
    parser.add_argument("--work", type=Path, help="folder for runs and teachers (default runs/benchmark-suite[-quick])")
    parser.add_argument("--results", type=Path, help="records folder (default: benchmarks/results, or "
                                                     "WORK/results for --quick)")
    parser.add_argument("--plots", type=Path, help="PNG folder (default docs/benchmarks, or WORK/plots for --quick)")
    parser.add_argument("--doc", type=Path, help="page to render (default docs/benchmarks.md, or "
                                                 "WORK/benchmarks.md for --quick)")
    parser.add_argument("--no-render", action="store_true", help="write the records only")
    parser.add_argument("--skip-runs", action="store_true", help="full mode: reuse finished runs, run no benchmark")
    parser.add_argument("--no-synthetic", action="store_true",
                        help="skip the train-on-synthetic step (with 60,000 images about 20 minutes per run on 2 CPU cores)")
    parser.add_argument("--train-limit", type=int, default=2000, help="quick: training images of the teachers")
    parser.add_argument("--steps", type=int, default=20, help="quick: transcription iterations")
    parser.add_argument("--batch-size", type=int, default=64, help="quick: synthetic images per iteration")
    parser.add_argument("--eval-limit", type=int, default=1000, help="quick: test images for student accuracy")
    parser.add_argument("--synthetic-rows", type=int, help="synthetic images per run (default 60000, quick 1000)")
    parser.add_argument("--synthetic-epochs", type=int, help="classifier epochs on them (default 10, quick 2)")
    args = parser.parse_args(argv)

    args.datasets = (args.datasets or ("mnist" if args.quick else "mnist,fashion-mnist")).split(",")
    try:
        args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
        args.epsilons = [float(e) for e in args.epsilons.split(",")]
    except ValueError as error:
        parser.error(f"--seeds and --epsilons take comma-separated numbers: {error}")
    if any(not (math.isfinite(e) and e > 0) for e in args.epsilons):
        parser.error(f"every epsilon must be a positive number, got {args.epsilons}")
    args.cases = args.cases.split(",")
    args.mechanisms = args.mechanisms.split(",")
    if not set(args.mechanisms) <= {"gaussian", "noisy-label"}:
        parser.error(f"--mechanisms takes gaussian and/or noisy-label, got {args.mechanisms}")
    unknown = sorted(set(args.cases) - {"teacher-level", "dp-teacher"})
    if unknown:
        parser.error(f"unknown case(s) {unknown}; use teacher-level and/or dp-teacher")
    pairs = [item.split("=", 1) for item in args.data]
    if any(len(pair) != 2 or not pair[1] for pair in pairs):
        parser.error(f"--data takes NAME=PATH, got {args.data}")
    args.data = dict(pairs)
    for name in ("train_limit", "steps", "batch_size", "eval_limit"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    work_default = "runs/benchmark-suite-quick" if args.quick else "runs/benchmark-suite"
    args.work = (args.work or ROOT / work_default).resolve()
    args.results = (args.results or (args.work / "results" if args.quick else RESULTS)).resolve()
    args.plots = (args.plots or (args.work / "plots" if args.quick else render_benchmarks.PLOTS)).resolve()
    args.doc = (args.doc or (args.work / "benchmarks.md" if args.quick else render_benchmarks.DOC)).resolve()
    args.synthetic_rows = args.synthetic_rows or (1000 if args.quick else 60_000)
    args.synthetic_epochs = args.synthetic_epochs or (2 if args.quick else 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records = quick(args) if args.quick else full(args)
    finish(args, records)
    logger.info("suite finished in %.0f s; records in %s, page %s", time.time() - started, args.results, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
