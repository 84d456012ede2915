"""Time the catalog's provenance and per-class queries over about a million synthetic rows.

The rows are cheap stand-ins with the builder's exact schema (the Arrow schema of the `datasets`
features in synthgen.build). They are not sampled from a generator, because sampling a million
images takes over an hour on 2 CPU cores and the queries never read the image column. The image
cells cycle through 256 distinct PNG-encoded 28x28 noise images, so the files stay small.

The datasets are recorded through the catalog's own API (`Catalog.record_dataset` with a complete
manifest), so the queries run through the `synthetic_rows`, `class_counts` and
`dataset_provenance` views that read the shards in place with `read_parquet`.

Each query runs once cold (first run after opening the catalog) and then --repeats times; the
record's value is the median of the repeats.

Records go to benchmarks/results/catalog.json: provenance_query_seconds and
per_class_query_seconds.

Usage: python scripts/benchmark_catalog.py [--rows 1000000] [--datasets 4] [--shard-size 50000]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import record, write_records  # noqa: E402

logger = logging.getLogger("benchmark")

CLASS_NAMES = [str(digit) for digit in range(10)]
# Rows per generator and privacy setting: which generator made which dataset at what epsilon.
PROVENANCE_QUERY = """
SELECT p.generator, p.generator_commit, p.unit, p.epsilon, p.delta,
       count(DISTINCT s.dataset_id) AS datasets, count(*) AS rows, min(s.sample_index) AS first_sample,
       max(s.sample_index) AS last_sample
FROM synthetic_rows s JOIN dataset_provenance p USING (dataset_id)
GROUP BY ALL ORDER BY p.epsilon
"""
PER_CLASS_QUERY = "SELECT * FROM class_counts"


def write_dataset(folder: Path, rows: int, shard_size: int, seed: int, generator: str, epsilon: float,
                  pngs: list[bytes]) -> dict:
    """Write `rows` stand-in rows as parquet shards with the builder's schema; return a complete manifest."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthgen.build import DATA_DIR, FORMAT, dataset_features, shard_name

    schema = dataset_features(CLASS_NAMES).arrow_schema
    rng = np.random.default_rng(seed)
    shards = math.ceil(rows / shard_size)
    files = []
    (folder / DATA_DIR).mkdir(parents=True, exist_ok=True)
    for index in range(shards):
        start, stop = index * shard_size, min((index + 1) * shard_size, rows)
        count = stop - start
        table = pa.Table.from_pydict({
            "image": [{"bytes": pngs[i % len(pngs)], "path": None} for i in range(start, stop)],
            "label": rng.integers(0, len(CLASS_NAMES), count).tolist(),
            "generator": [generator] * count,
            "generator_commit": [f"sha256:{seed:064x}"] * count,
            "seed": [seed] * count,
            "sample_index": list(range(start, stop)),
            "confidence": rng.uniform(0.1, 1.0, count).astype(np.float32).tolist(),
            "probabilities": rng.dirichlet(np.ones(len(CLASS_NAMES)), count).astype(np.float32).tolist(),
        }, schema=schema)
        name = f"{DATA_DIR}/{shard_name('train', index, shards)}"
        pq.write_table(table, folder / name, row_group_size=10_000)
        files.append(name)
    return {
        "format": FORMAT, "complete": True, "name": folder.name, "rows": rows, "shards": shards,
        "settings": {"generator": generator, "generator_kind": "hub", "generator_commit": f"sha256:{seed:064x}",
                     "generator_revision": "main", "seed": seed, "num_samples": rows, "per_class": None,
                     "shard_size": shard_size, "split": "train"},
        "privacy": {"unit": "example", "epsilon": epsilon, "delta": 1e-5, "mechanism": "gaussian"},
        "class_names": CLASS_NAMES, "files": files, "completed": "2026-01-01T00:00:00+00:00",
    }


def noise_pngs(count: int) -> list[bytes]:
    import numpy as np

    from synthgen.data import encode_png

    rng = np.random.default_rng(0)
    return [encode_png(rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)) for _ in range(count)]


def time_query(catalog, query: str, repeats: int) -> tuple[float, list[float], "pandas.DataFrame"]:
    """Return (cold seconds, warm seconds per repeat, result) of one query."""
    started = time.perf_counter()
    frame = catalog.sql(query)
    cold = time.perf_counter() - started
    warm = []
    for _ in range(repeats):
        started = time.perf_counter()
        catalog.sql(query)
        warm.append(time.perf_counter() - started)
    return cold, warm, frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows over all datasets (default 1000000)")
    parser.add_argument("--datasets", type=int, default=4, help="datasets the rows are split into (default 4)")
    parser.add_argument("--shard-size", type=int, default=50_000, help="rows per parquet shard (default 50000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each query after the cold one")
    parser.add_argument("--work", help="folder for the shards and the catalog (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.rows < args.datasets or args.datasets < 1 or args.shard_size < 1 or args.repeats < 1:
        parser.error("--rows must be >= --datasets >= 1, and --shard-size and --repeats >= 1")

    import duckdb

    from synthgen.catalog import Catalog

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="synthgen-benchmark-catalog-"))
    try:
        pngs = noise_pngs(256)
        started = time.perf_counter()
        manifests = []
        per_dataset = args.rows // args.datasets
        for index in range(args.datasets):
            rows = per_dataset + (args.rows - per_dataset * args.datasets if index == args.datasets - 1 else 0)
            folder = work / f"dataset-{index}"
            generator = f"bench/generator-{index % 2}"
            epsilon = (1.0, 10.0)[index % 2]
            manifests.append((folder, write_dataset(folder, rows, args.shard_size, index, generator, epsilon, pngs)))
        write_seconds = time.perf_counter() - started
        size = sum(path.stat().st_size for path in work.rglob("*.parquet"))
        logger.info("wrote %d rows in %d datasets (%.0f MB of parquet) in %.1f s", args.rows, args.datasets,
                    size / 1e6, write_seconds)

        catalog_path = work / "catalog.duckdb"
        with Catalog(catalog_path) as catalog:
            for folder, manifest in manifests:
                catalog.record_dataset(manifest, path=folder)
        with Catalog(catalog_path) as catalog:  # a fresh connection, so the first query runs cold
            provenance = time_query(catalog, PROVENANCE_QUERY, args.repeats)
            per_class = time_query(catalog, PER_CLASS_QUERY, args.repeats)
        total = int(provenance[2]["rows"].sum())
        if total != args.rows or int(per_class[2]["rows"].sum()) != args.rows:
            raise SystemExit(f"the queries counted {total} and {int(per_class[2]['rows'].sum())} rows, expected "
                             f"{args.rows}")
        for name, (cold, warm, frame) in (("provenance", provenance), ("per-class", per_class)):
            logger.info("%s query: cold %.3f s, warm median %.3f s (%d result rows)", name, cold,
                        statistics.median(warm), len(frame))

        common = dict(
            dataset="stand-in rows", rows=args.rows, datasets=args.datasets, shard_size=args.shard_size,
            shards=sum(manifest["shards"] for _, manifest in manifests), parquet_megabytes=round(size / 1e6, 1),
            repeats=args.repeats, duckdb=duckdb.__version__, cpu_cores=len(os.sched_getaffinity(0)),
            load_average=round(os.getloadavg()[0], 2),
        )
        rows_note = ("stand-in rows with the builder's schema (labels and confidences random, image cells cycling "
                     "through 256 PNG noise images), not sampled from a generator; ")
        records = [
            record("catalog", "provenance_query_seconds", round(statistics.median(provenance[1]), 4), **common,
                   cold_seconds=round(provenance[0], 4), query=" ".join(PROVENANCE_QUERY.split()),
                   note=rows_note + "median of the warm runs; rows per generator, commit and epsilon through the "
                                    "synthetic_rows (read_parquet) and dataset_provenance views"),
            record("catalog", "per_class_query_seconds", round(statistics.median(per_class[1]), 4), **common,
                   cold_seconds=round(per_class[0], 4), query=PER_CLASS_QUERY,
                   note=rows_note + "median of the warm runs; rows and mean confidence per dataset and class "
                                    "through the class_counts view"),
        ]
        logger.info("wrote %s", write_records("catalog", records))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
