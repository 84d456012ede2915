"""Write docs/bad-input.md from the catalogue in tests/test_bad_input.py, and its case count.

Usage: python scripts/render_bad_input.py [--no-record]

The record (metric bad_input_cases) goes to benchmarks/results/bad_input.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import record, write_records  # noqa: E402
from tests.test_bad_input import CATALOGUE, render_catalogue  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/results/bad_input.json")
    args = parser.parse_args()
    doc = ROOT / "docs" / "bad-input.md"
    doc.write_text(render_catalogue())
    print(f"wrote {doc}: {len(CATALOGUE)} cases")
    if not args.no_record:
        gaps = sum(1 for case in CATALOGUE if case.gap)
        path = write_records("bad_input", [record("bad_input", "bad_input_cases", len(CATALOGUE), seeds=None,
                                                  known_gaps=gaps, hardware=None)])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
