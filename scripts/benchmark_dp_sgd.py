"""Measure what each DP-SGD setting of `synthgen train-teacher --dp` adds, one variant at a time.

Every variant trains the teacher on all of real MNIST at the same example-level (epsilon,
delta) under replace-one. Each changes one setting of the base recipe: a GroupNorm CNN, batch
512, Adam at 2e-3, clipping norm 1 and an EMA of the weights with decay 0.999, no augmentation
and no weight standardisation. The noise multiplier is
recalibrated for each variant, so every row spends the same privacy. The records go to
benchmarks/results/dp_sgd.json with a `variant` field.

The settings were chosen before looking at any accuracy. The accuracies are measured on the
real test split, so choosing a recipe by them would be tuning on private data, which synthgen
does not account. Use them as a guide for other datasets, not to pick a winner
on this one.

Usage: python scripts/benchmark_dp_sgd.py [--variants base,no-ema] [--epsilon 1] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import record, write_records  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
logger = logging.getLogger("benchmark")

BASE = dict(batch_size=512, lr=2e-3, width=16, hidden=64, max_grad_norm=1.0, ema_decay=0.999)
# One change to the base recipe per variant.
VARIANTS = {
    "base": {},
    "no-ema": {"ema_decay": 0.0},
    "batch-1024": {"batch_size": 1024},
    "batch-256": {"batch_size": 256},
    "clip-0.1": {"max_grad_norm": 0.1},
    "weight-std": {"weight_standardization": True},
    "augmult-4": {"augment_multiplicity": 4},
}


def run_variant(args, data: str, name: str) -> dict:
    from synthgen.config import TeacherTrainConfig
    from synthgen.data import load_image_data
    from synthgen.teacher import train_teacher_dp

    out = Path(args.out) / f"{name}-eps{args.epsilon:g}"
    meta_path = out / "synthgen_teacher.json"
    seconds = None
    if not meta_path.is_file():
        settings = dict(BASE, **VARIANTS[name])
        config = TeacherTrainConfig(data=data, out=str(out), dp=True, epsilon=args.epsilon, delta=args.delta,
                                    epochs=args.epochs, seed=args.seed, ledger=str(Path(args.out) / "ledger.duckdb"),
                                    resume=(out / "private" / "dp_training.json").is_file(), **settings)
        started = time.time()
        train_teacher_dp(config, load_image_data(data, "train"), load_image_data(data, "test"))
        seconds = round(time.time() - started, 1)
    meta = json.loads(meta_path.read_text())
    return {"accuracy": meta["test_accuracy"], "seconds": seconds, "sigma": meta["dp"]["noise_multiplier"],
            "steps": meta["dp"]["steps"], "epsilon": meta["dp"]["epsilon"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/benchmark-dp-sgd")
    args = parser.parse_args()
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from synthgen.data import locate_dataset

    data = str(locate_dataset("mnist"))
    records = []
    try:
        for name in args.variants.split(","):
            result = run_variant(args, data, name)
            common = dict(unit="example", mechanism="dp-sgd", method="opacus-dp-sgd", epsilon=result["epsilon"],
                          delta=args.delta, seeds=1, seed=args.seed, variant=name, steps=result["steps"],
                          noise_multiplier=result["sigma"], epochs=args.epochs)
            records.append(record("dp_sgd", "teacher_accuracy", result["accuracy"], **common,
                                  note="one change to the base recipe per variant; same epsilon for all; accuracy on "
                                       "the real test split (evaluation on private data)"))
            if result["seconds"] is not None:
                records.append(record("dp_sgd", "teacher_seconds", result["seconds"], **common))
            logger.info("variant %s: %.2f%% at epsilon %.3g (sigma %.3g, %d steps)", name, result["accuracy"],
                        result["epsilon"], result["sigma"], result["steps"])
    finally:
        if records:
            path = write_records("dp_sgd", records, replace_keys=("metric", "variant", "epsilon", "seed"))
            logger.info("wrote %d records to %s", len(records), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
