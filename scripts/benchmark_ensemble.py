"""Measure the example-level ensemble path on real MNIST and record the numbers.

Stages (records go to benchmarks/results/ensemble.json):

- train: K teachers on disjoint shards of the 60,000 training images, stacked
  (teacher_accuracy of the mean teacher and of the plurality vote on the real test set, which
  is the non-private ceiling of the ensemble; teacher_seconds);
- speedup: queries per second of the stacked ensemble against a Python loop over the same K
  teachers as separate modules, one run each on the same images (ensemble_speedup);
- utility: `synthgen transcribe` of the ensemble at each --epsilons value, example-level, with
  the settings given below (student_accuracy, transcribe_seconds).

Usage: python scripts/benchmark_ensemble.py --stages train,speedup,utility --num-teachers 250
       [--epsilons 1,10] [--mechanism noisy-label] [--steps 40 --batch-size 64 ...] [--out DIR]

The ensemble folder under --out is reused by a later invocation, so stages can run separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import record, write_records  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
logger = logging.getLogger("benchmark")
DELTA = 1e-5


def ensemble_dir(args) -> Path:
    return Path(args.out) / f"ensemble-k{args.num_teachers}"


def stage_train(args, data: str, records: list) -> None:
    from synthgen.data import load_image_data
    from synthgen.ensemble import train_ensemble
    from synthgen.ensemble_cli import EnsembleTrainConfig

    out = ensemble_dir(args)
    if not (out / "synthgen_ensemble.json").is_file():
        config = EnsembleTrainConfig(data=data, out=str(out), num_teachers=args.num_teachers, epochs=args.teacher_epochs,
                                     batch_size=args.teacher_batch_size, width=args.teacher_width,
                                     hidden=args.teacher_hidden, seed=args.seed)
        started = time.time()
        train_ensemble(config, load_image_data(data, "train"), load_image_data(data, "test"))
        records.append(record("ensemble", "teacher_seconds", round(time.time() - started, 1), K=args.num_teachers, dataset=args.dataset,
                              method=f"synthgen-ensemble K={args.num_teachers}", note="stacked training of all K teachers, 1 thread"))
    elif args.trained_seconds is not None:
        records.append(record("ensemble", "teacher_seconds", args.trained_seconds, K=args.num_teachers, dataset=args.dataset,
                              method=f"synthgen-ensemble K={args.num_teachers}", note="stacked training of all K teachers, 1 thread, run "
                              "with 'synthgen train-teachers' and timed by /usr/bin/time"))
    accuracy = json.loads((out / "synthgen_ensemble.json").read_text())["teacher_meta"]["training"]["test_accuracy"]
    for aggregate, value in (("mean teacher", accuracy["mean_teacher"]), ("plurality vote", accuracy["vote"])):
        records.append(record("ensemble", "teacher_accuracy", round(value, 2), K=args.num_teachers, dataset=args.dataset,
                              method=f"synthgen-ensemble K={args.num_teachers} ({aggregate})", aggregate=aggregate,
                              note="non-private: evaluation of the private teachers on the real test set"))


def stage_speedup(args, records: list) -> None:
    import torch

    from synthgen.ensemble import StackedEnsemble, _member_config

    config = _member_config((1, 28, 28), 10, [str(i) for i in range(10)], args.teacher_width, args.teacher_hidden)
    ensemble = StackedEnsemble.initialise(config, args.num_teachers, seed=0).eval()
    members = [ensemble.member(k) for k in range(args.num_teachers)]
    images = torch.rand(args.query_batch, 1, 28, 28)
    with torch.no_grad():
        ensemble(images[:8])  # warm-up of both paths
        [member(images[:8]) for member in members]
        started = time.perf_counter()
        stacked = ensemble(images)
        stacked_seconds = time.perf_counter() - started
        started = time.perf_counter()
        looped = torch.stack([member(images) for member in members])
        loop_seconds = time.perf_counter() - started
    torch.testing.assert_close(stacked, looped, rtol=1e-4, atol=1e-4)
    speedup = loop_seconds / stacked_seconds
    logger.info("K=%d, %d images: stacked %.3f s, loop %.3f s, speedup %.2f", args.num_teachers, args.query_batch,
                stacked_seconds, loop_seconds, speedup)
    records.append(record("ensemble", "ensemble_speedup", round(speedup, 2), K=args.num_teachers,
                          batch=args.query_batch, method=f"synthgen-ensemble K={args.num_teachers}",
                          stacked_seconds=round(stacked_seconds, 4), loop_seconds=round(loop_seconds, 4),
                          threads=torch.get_num_threads(),
                          note="one run; stacked vmap over functional_call against a Python loop over K modules. "
                               "Goal >= 5x missed on CPU: the grouped convolutions of the stacked call run no faster "
                               "than K small ones, and the loop's per-module overhead is small next to the "
                               "convolutions; no GPU, where stacking removes K kernel launches, was available"))


# Defaults of the transcription options that reports written before the option existed lack.
OPTION_DEFAULTS = {"query_pool": 1, "student_shift": 0, "pseudo_label_weight": 0.0, "pseudo_label_threshold": 0.95,
                   "procedural_fraction": 0.0}
RECORDED_SETTINGS = ("steps", "batch_size", "student_steps", "top_k", "replay_batch", "student_lr",
                     "adversarial_weight", *OPTION_DEFAULTS)


def reported_settings(report: dict) -> dict:
    """Return the settings in RECORDED_SETTINGS that a run's privacy report states."""
    hyperparameters = {**OPTION_DEFAULTS, **report["public_facts"]["hyperparameters"]}
    return {name: hyperparameters[name] for name in RECORDED_SETTINGS}


def transcribe_once(args, data: str, epsilon: float, seed: int) -> dict:
    """Run one transcription of the ensemble (or read the report of a finished one) and return its report."""
    from synthgen.config import TranscribeConfig
    from synthgen.transcribe import transcribe

    run_dir = Path(args.out) / f"run-k{args.num_teachers}-eps{epsilon:g}-{args.tag}-seed{seed}"
    config = TranscribeConfig(
        teacher=str(ensemble_dir(args)), out=str(run_dir), eval_data=data, mechanism=args.mechanism,
        epsilon=epsilon, delta=DELTA, steps=args.steps, batch_size=args.batch_size,
        student_steps=args.student_steps, top_k=args.top_k, replay_size=args.steps * args.batch_size,
        replay_batch=args.replay_batch, eval_every=args.eval_every, seed=seed, threads=args.threads,
        student_lr=args.student_lr, adversarial_weight=args.adversarial_weight, device="cpu",
        query_pool=args.query_pool, student_shift=args.student_shift, pseudo_label_weight=args.pseudo_label_weight,
        pseudo_label_threshold=args.pseudo_label_threshold, procedural_fraction=args.procedural_fraction,
        ledger=str(Path(args.out) / "ledger.duckdb"),
    )
    report_path = run_dir / "privacy_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        # A finished run is reused only if it ran with these settings, so that its record is named right.
        ran = reported_settings(report)
        differ = [name for name in RECORDED_SETTINGS if ran[name] != getattr(config, name)]
        if differ:
            raise SystemExit(f"{run_dir} contains a finished run with different {', '.join(differ)} than requested; "
                             "pass another --tag or --out")
        return report
    return transcribe(config).report


def utility_method(args) -> str:
    """Return the record's method name, which names the settings that change what is learnt.

    Each setting then gets its own row, because the suite averages the records of one method.
    """
    parts = [f"synthgen-ensemble K={args.num_teachers}"]
    if args.procedural_fraction:
        parts.append(f"strokes {args.procedural_fraction:.0%}")
    if args.query_pool > 1:
        parts.append(f"pool {args.query_pool}")
    if args.student_shift:
        parts.append(f"shift {args.student_shift}")
    if args.pseudo_label_weight:
        parts.append("pseudo-labels")
    return ", ".join(parts)


def stage_utility(args, data: str, records: list) -> None:
    import statistics

    for epsilon in args.epsilons:
        reports = [transcribe_once(args, data, epsilon, seed) for seed in args.seeds]
        accuracies = [report["evaluation"]["student_accuracy"] for report in reports]
        report = reports[0]
        settings = reported_settings(report)
        spread = round(statistics.stdev(accuracies), 2) if len(accuracies) > 1 else None
        common = dict(dataset=args.dataset, unit=report["unit"], mechanism=report["mechanism"]["name"],
                      epsilon=epsilon, delta=DELTA, K=args.num_teachers, seeds=len(accuracies),
                      seed_values=list(args.seeds), variant=args.tag, method=utility_method(args), settings=settings,
                      noise_std=report["mechanism"].get("noise_std"), epsilon_spent=report["epsilon"])
        records.append(record("ensemble", "student_accuracy", round(statistics.mean(accuracies), 2), spread=spread,
                              per_seed=accuracies, note=args.note, **common))
        # A resumed run's wall time covers only the part after the interruption.
        timed = [r for r in reports if not r.get("replayed_examples")]
        if timed:
            seconds = round(statistics.mean(r["wall_seconds"] for r in timed), 1)
            records.append(record("ensemble", "transcribe_seconds", seconds, **{**common, "seeds": len(timed)}))
        logger.info("eps %g: student accuracy %s%% over seeds %s (example-level, epsilon spent %.4g)", epsilon,
                    accuracies, args.seeds, report["epsilon"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="train,speedup,utility")
    parser.add_argument("--num-teachers", type=int, default=250)
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--teacher-batch-size", type=int, default=16)
    parser.add_argument("--teacher-width", type=int, default=16)
    parser.add_argument("--teacher-hidden", type=int, default=64)
    parser.add_argument("--trained-seconds", type=float, help="wall seconds of an ensemble trained earlier with "
                        "'synthgen train-teachers' into the --out folder, to record beside its accuracy")
    parser.add_argument("--query-batch", type=int, default=256, help="images per query in the speedup stage")
    parser.add_argument("--epsilons", default="10", help="comma-separated target epsilons of the utility stage")
    parser.add_argument("--mechanism", default="noisy-label", help="noisy-label (GNMax for an ensemble) or gaussian")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--student-steps", type=int, default=10)
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--replay-batch", type=int, default=256)
    parser.add_argument("--adversarial-weight", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--query-pool", type=int, default=1, help="candidates per query chosen by the student (1: none)")
    parser.add_argument("--student-shift", type=int, default=0, help="largest shift of student inputs, in pixels")
    parser.add_argument("--pseudo-label-weight", type=float, default=0.0)
    parser.add_argument("--pseudo-label-threshold", type=float, default=0.95)
    parser.add_argument("--procedural-fraction", type=float, default=0.0, help="part of each batch drawn as strokes")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the utility stage (public: the "
                        "generator, the student and the latent draws)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shard plan and the teachers")
    parser.add_argument("--tag", default="default", help="name of the setting, part of the run folder")
    parser.add_argument("--note", default=None, help="note stored with the student_accuracy records")
    parser.add_argument("--no-record", action="store_true", help="measure only; do not write results")
    parser.add_argument("--out", default="runs/benchmark-ensemble")
    args = parser.parse_args()
    args.epsilons = [float(e) for e in args.epsilons.split(",")]
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(args.threads)
    from synthgen.data import locate_dataset

    data = str(locate_dataset(args.dataset))
    records: list = []
    stages = args.stages.split(",")
    if "train" in stages:
        stage_train(args, data, records)
    if "speedup" in stages:
        stage_speedup(args, records)
    if "utility" in stages:
        stage_utility(args, data, records)
    print(json.dumps([{k: r[k] for k in ("metric", "value", "epsilon", "unit") if k in r} for r in records], indent=1))
    if not args.no_record:
        path = write_records("ensemble", records, replace_keys=("metric", "unit", "mechanism", "epsilon", "method",
                                                                "dataset", "K", "aggregate", "batch", "variant"))
        logger.info("records written to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
