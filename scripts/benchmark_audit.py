"""Audit finished MNIST runs with `synthgen audit` and record the numbers.

For each run folder it runs the audit (members: training images of the run's teacher; non-members:
the real test split) and writes records to benchmarks/results/audit.json: AUC and TPR at 0.1% and
1% FPR of the loss-threshold and LiRA attacks on the student and the teacher, the generator's
distance attack, and the TPR bound that the run's (epsilon, delta) implies.

Usage:
    python scripts/benchmark_audit.py [RUN_DIR ...] [--audit-size 1000] [--shadow-models 8]

Without run folders it audits every finished private run under runs/benchmark-transcribe.
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
from bench_common import ROOT, record, write_records  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
logger = logging.getLogger("benchmark_audit")

METRIC_NAMES = {"auc": "auc", "tpr_at_0.001_fpr": "tpr_at_0.1fpr", "tpr_at_0.01_fpr": "tpr_at_1fpr"}


def finished_private_runs(folder: Path) -> list[Path]:
    runs = []
    for report in sorted(folder.glob("*/privacy_report.json")):
        if json.loads(report.read_text()).get("private"):
            runs.append(report.parent)
    return runs


def records_of(run: Path, audit: dict, report: dict, seconds: float | None, command: str) -> list[dict]:
    mechanism = report["mechanism"]["name"]
    common = dict(unit=report["unit"], mechanism=mechanism, epsilon=report["epsilon"], delta=report["delta"], seeds=1,
                  run=run.name, audit_size=audit["settings"]["audit_size"],
                  shadow_models=audit["settings"]["shadow_models"], command=command)
    records = []
    for attack, targets in audit["attacks"].items():
        for target, metrics in targets.items():
            for key, suffix in METRIC_NAMES.items():
                fpr = key.removeprefix("tpr_at_").removesuffix("_fpr")
                bound = metrics["dp_tpr_bound"].get(f"at_{fpr}_fpr") if key != "auc" else None
                records.append(record("audit", f"{target}_{suffix}", round(metrics[key]["value"], 4), attack=attack,
                                      ci95=[round(v, 4) for v in metrics[key]["ci95"]], dp_tpr_bound=bound,
                                      **common))
    nearest = audit["nearest_neighbour"]["closer_to_training_fraction"]
    records.append(record("audit", "closer_to_training_fraction", round(nearest["value"], 4),
                          ci95=[round(v, 4) for v in nearest["ci95"]], **common))
    if seconds is not None:
        records.append(record("audit", "audit_seconds", round(seconds, 1), **common))
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="finished run folders (default: runs/benchmark-transcribe/*)")
    parser.add_argument("--audit-size", type=int, default=1000)
    parser.add_argument("--shadow-models", type=int, default=8)
    parser.add_argument("--shadow-epochs", type=int, default=10)
    parser.add_argument("--reuse", action="store_true",
                        help="record a run's existing audit.json when it was made with the same settings")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/results/audit.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from synthgen.audit import AuditConfig, run_audit, summarise
    from synthgen.data import locate_dataset

    data = str(locate_dataset("mnist"))
    runs = [Path(r) for r in args.runs] or finished_private_runs(ROOT / "runs" / "benchmark-transcribe")
    if not runs:
        raise SystemExit("no finished private run to audit; run scripts/benchmark_transcribe.py first")
    command = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    all_records = []
    for run in runs:
        report = json.loads((run / "privacy_report.json").read_text())
        config = AuditConfig(run_dir=str(run), private_data=data, audit_size=args.audit_size,
                             shadow_models=args.shadow_models, shadow_epochs=args.shadow_epochs)
        existing = run / "audit.json"
        wanted = {"audit_size": config.audit_size, "shadow_models": config.shadow_models,
                  "shadow_epochs": config.shadow_epochs, "seed": config.seed}
        if args.reuse and existing.is_file() and all(
                json.loads(existing.read_text())["settings"].get(k) == v for k, v in wanted.items()):
            audit, seconds = json.loads(existing.read_text()), None
            logger.info("%s: using its existing audit.json", run.name)
        else:
            started = time.time()
            audit = run_audit(config)
            seconds = time.time() - started
        logger.info("%s (%s, epsilon %.3g): %s", run.name, report["unit"], report["epsilon"],
                    json.dumps(summarise(audit)))
        all_records += records_of(run, audit, report, seconds, command)
    if not args.no_record:
        path = write_records("audit", all_records,
                             replace_keys=("metric", "attack", "unit", "mechanism", "epsilon", "method", "dataset"))
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
