"""Time scripts/quickstart.sh from a fresh clone (install included) and record the result.

Clones the current commit into a temporary folder, runs quickstart.sh there with a new .venv,
and writes benchmarks/results/quickstart.json: wall seconds, the DP teacher's and the student's
test accuracy, and the epsilon the run reports.

Usage: python scripts/benchmark_quickstart.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, record, write_records  # noqa: E402
import os  # noqa: E402


def last_json_block(text: str) -> dict:
    blocks = re.findall(r"^\{\n.*?^\}", text, flags=re.S | re.M)
    if not blocks:
        raise RuntimeError("quickstart printed no JSON summary")
    return json.loads(blocks[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="synthgen-quickstart-"))
    clone = workdir / "synthgen"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        started = time.time()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TQDM_DISABLE": "1",
               "SYNTHGEN_DATASETS": str(ROOT.parent / "shared" / "datasets")}
        for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONFIG_FILE"):
            if name in os.environ:
                env[name] = os.environ[name]
        result = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=clone, env=env, capture_output=True, text=True)
        seconds = time.time() - started
        (workdir / "quickstart.log").write_text(result.stdout + "\n" + result.stderr)
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            raise SystemExit(f"quickstart.sh failed with exit code {result.returncode}; log in {workdir}")
        teacher = json.loads((clone / "runs" / "quickstart" / "teacher" / "synthgen_teacher.json").read_text())
        summary = last_json_block(result.stdout)
        common = dict(unit="example", mechanism="dp-teacher", epsilon=summary["epsilon"], delta=summary["delta"],
                      benchmark="quickstart")
        records = [
            record(metric="quickstart_seconds", value=round(seconds, 1), **common,
                   note="scripts/quickstart.sh from a fresh clone, virtual environment and install included"),
            record(metric="teacher_accuracy", value=teacher["test_accuracy"], method="opacus-dp-sgd",
                   **{**common, "mechanism": "dp-sgd"}),
            record(metric="student_accuracy", value=summary["student_accuracy"], **common),
        ]
        path = write_records("quickstart", records, replace_keys=("metric", "mechanism"))
        print(json.dumps({"seconds": round(seconds, 1), **summary}, indent=2))
        print(f"wrote {path}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
