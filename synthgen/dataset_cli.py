"""The `build-dataset`, `catalog` and `evaluate` commands. Heavy imports wait for the handlers,
so that `synthgen --help` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("synthgen")

_BUILD_EPILOG = (
    "Several processes: 'torchrun --nproc_per_node N scripts/build_dataset.py ...' or 'accelerate launch "
    "--multi_gpu --num_processes N scripts/build_dataset.py ...' on a GPU node; each process writes the shards whose "
    "index modulo N is its rank into the same --out, which must be on a filesystem every process (and node) shares. "
    "Hub settings come from HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE. Exit status: 0 on success, 2 on invalid input, "
    "a generator without a privacy guarantee, or a Hub failure.")
_CATALOG_EPILOG = ("Views: dataset_provenance, budget_spent, synthetic_rows (parquet shards read in place), "
                   "class_counts. Exit status: 0 on success, 2 on invalid input or a failed query.")
_EVALUATE_EPILOG = ("The real test split is scored once per seed, after the epoch is chosen on a synthetic "
                    "validation split. Exit status: 0 on success, 2 on invalid input.")


def _integer(text: str) -> int:
    """Parse an integer; the range checks in the builder and the evaluation name the option."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _cmd_build(args) -> int:
    from .build import BuildConfig, build_dataset

    config = BuildConfig(
        generator=args.generator, revision=args.revision, num_samples=args.num_samples, per_class=args.per_class,
        seed=args.seed, shard_size=args.shard_size, out=args.out, push_to_hub=args.push_to_hub, private=args.private,
        split=args.split, name=args.name, license=args.license, overwrite=args.overwrite, resume=args.resume,
        device=args.device, threads=args.threads, catalog=args.catalog, record=not args.no_catalog,
        precision=args.precision, augment=args.augment,
    )
    result = build_dataset(config)
    if result.process_index == 0:
        privacy = result.manifest["privacy"]
        print(json.dumps({
            "out": str(result.out) if result.out else None, "rows": result.rows, "shards": result.shards,
            "rows_written": result.rows_written, "images_per_second": round(result.images_per_second, 1),
            "repo_id": result.repo_id, "commit": result.commit, "generator": result.manifest["settings"]["generator"],
            "unit": privacy["unit"], "epsilon": privacy["epsilon"], "delta": privacy["delta"],
            "privacy_cost_of_sampling": 0,
        }, indent=2))
    return 0


def _print_frame(frame, output_format: str) -> None:
    if output_format == "json":
        print(frame.to_json(orient="records", indent=2, date_format="iso", default_handler=str))
    elif output_format == "csv":
        frame.to_csv(sys.stdout, index=False)
    else:
        import pandas

        with pandas.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200,
                                   "display.max_colwidth", 80):
            print(frame.to_string(index=False) if len(frame) else "(no rows)")


def _cmd_catalog(args) -> int:
    from .catalog import Catalog, CatalogError

    command = args.catalog_command or "show"
    if command in ("show", "sql") and args.db and not Path(args.db).expanduser().is_file():
        # Opening would create an empty catalog, and a mistyped path would then read as "nothing recorded".
        raise CatalogError(f"no catalog at --db {Path(args.db).expanduser()}; check the path (the add- commands and "
                           "dataset builds create it)")
    with Catalog(args.db) as catalog:
        if command == "sql":
            _print_frame(catalog.read_only_sql(args.query), args.format)
        elif command == "add-run":
            for run_dir in args.run_dirs:
                row = catalog.record_run(run_dir)
                logger.info("recorded run %s (%s-level epsilon %s)", row["run_dir"], row["unit"], row["epsilon"])
            catalog.sync_ledger(args.ledger, missing_ok=args.ledger is None)
        elif command == "add-release":
            from .generator_source import load_generator

            source = load_generator(args.repo_id, args.revision)
            catalog.record_release(source.location, source.commit, source.report, revision=source.revision,
                                   card_url=source.card_url)
            logger.info("recorded release %s at commit %s", source.location, source.commit)
        elif command == "add-dataset":
            for folder in args.folders:
                row = catalog.record_dataset_folder(folder)
                logger.info("recorded dataset %s (%d rows)", row["dataset_id"], row["rows"])
        elif command == "sync-ledger":
            print(json.dumps(catalog.sync_ledger(args.ledger), indent=2))
        else:
            print(json.dumps({"catalog": str(catalog.path), "tables": catalog.summary()}, indent=2))
            print("\ndataset_provenance:")
            _print_frame(catalog.datasets(), "table")
            print("\nbudget_spent:")
            _print_frame(catalog.budget(), "table")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import EvaluateConfig, evaluate_synthetic

    config = EvaluateConfig(
        dataset=args.dataset, real_test=args.real_test, split=args.split, real_split=args.real_split,
        revision=args.revision, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        validation_fraction=args.validation_fraction, targets=args.targets, temperature=args.temperature,
        seed=args.seed, seeds=args.seeds, limit=args.limit, device=args.device, dataset_name=args.dataset_name,
        results=args.results, catalog=args.catalog, record=not args.no_catalog,
    )
    result = evaluate_synthetic(config)
    print(json.dumps({
        "synthetic_dataset": args.dataset, "real_test": args.real_test,
        "test_accuracy": result.test_accuracy, "test_accuracy_std": result.test_accuracy_std,
        "validation_accuracy": result.validation_accuracy, "seeds": result.per_seed,
        "train_rows": result.train_rows, "validation_rows": result.validation_rows, "test_rows": result.test_rows,
        **{f"generator_{key}": value for key, value in result.privacy.items()},
        "results": str(result.results_path) if result.results_path else None,
        "note": "accuracy on the real test split: evaluation only, not covered by the privacy guarantee",
    }, indent=2))
    return 0


def _add_build(commands) -> None:
    build = commands.add_parser(
        "build-dataset", epilog=_BUILD_EPILOG,
        help="sample a labelled synthetic dataset (parquet shards and a dataset card) from a DP generator")
    build.add_argument("generator", metavar="GENERATOR",
                       help="a run folder from 'synthgen transcribe', a release or pipeline folder, or a Hub "
                            "repository NAMESPACE/NAME")
    build.add_argument("--revision", help="branch, tag or commit of a Hub generator (default main)")

    size = build.add_mutually_exclusive_group(required=True)
    size.add_argument("--num-samples", type=_integer, metavar="N", help="number of rows (images)")
    size.add_argument("--per-class", type=_integer, metavar="M",
                      help="rows per class: the first M samples the student labels as each class")
    build.add_argument("--seed", type=_integer, default=0,
                       help="seed of the latents, 0 to 2**63-1 (default 0); the same seed gives the same rows")
    build.add_argument("--shard-size", type=_integer, default=10_000,
                       help="rows per parquet shard (default 10000); rows do not depend on it")

    build.add_argument("--out", help="output folder (new or empty, or see --resume and --overwrite)")
    build.add_argument("--push-to-hub", metavar="REPO",
                       help="also upload the dataset to this Hub dataset repository NAMESPACE/NAME (the generator "
                            "must be a Hub repository)")
    build.add_argument("--private", action="store_true", help="create the Hub dataset repository as private")
    build.add_argument("--split", default="train", help="split name, in the shard file names (default train)")
    build.add_argument("--name", help="dataset name for the card and the catalog (default GENERATOR-synthetic)")
    build.add_argument("--license", default="apache-2.0", help="license identifier in the card (default apache-2.0)")
    build.add_argument("--overwrite", action="store_true",
                       help="replace an earlier synthgen build in --out (a folder with synthgen_dataset.json): "
                            "removes its card, manifest, build state and shards, and keeps other files")
    build.add_argument("--resume", action="store_true",
                       help="continue an interrupted build in --out with the same settings, skipping complete shards")

    build.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    build.add_argument("--threads", type=_integer, help="torch CPU threads per process (default: torch's)")
    build.add_argument("--precision", default="float32",
                       help="generator precision: 'float32' (default) or 'bfloat16', about 5 times faster on CPUs "
                            "with AMX or AVX-512 BF16; the images differ slightly, so it is part of the dataset's "
                            "definition and a resumed build must use the same value")
    build.add_argument("--augment", default="none",
                       help="transforms applied to each generated image before the student labels it: 'none' "
                            "(default), 'affine' (small random rotation, scale, shear and shift; for digits), "
                            "'hflip' (random mirror; for clothing), 'mixup' (half the images blended with another "
                            "image, the student labelling the blend), or several joined by '+', such as "
                            "'hflip+mixup'. Post-processing: no privacy cost. Part of the dataset's definition")
    build.add_argument("--catalog", help="catalog file (default $SYNTHGEN_CATALOG or "
                                         "~/.local/share/synthgen/catalog.duckdb)")
    build.add_argument("--no-catalog", action="store_true", help="do not record the dataset in the catalog")
    build.set_defaults(handler=_cmd_build)


def _add_catalog(commands) -> None:
    catalog = commands.add_parser("catalog", epilog=_CATALOG_EPILOG,
                                  help="query or extend the DuckDB catalog of runs, ledger spends, releases, "
                                       "datasets and evaluations")
    catalog.add_argument("--db", help="catalog file (default $SYNTHGEN_CATALOG or "
                                      "~/.local/share/synthgen/catalog.duckdb)")
    sub = catalog.add_subparsers(dest="catalog_command")
    sub.add_parser("show", help="print the table sizes, dataset provenance and budget spent (the default)")
    sql = sub.add_parser("sql", help="run one read-only SQL query and print the result")
    sql.add_argument("query", help='for example "SELECT * FROM dataset_provenance"')
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    add_run = sub.add_parser("add-run", help="record finished run folders and sync the ledger they used")
    add_run.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    add_run.add_argument("--ledger", help="privacy ledger to sync (default $SYNTHGEN_LEDGER or the default ledger)")
    add_release = sub.add_parser("add-release", help="pull a Hub release and record its commit and privacy facts")
    add_release.add_argument("repo_id", metavar="REPO")
    add_release.add_argument("--revision", help="branch, tag or commit (default main)")
    add_dataset = sub.add_parser("add-dataset", help="record dataset folders written by build-dataset")
    add_dataset.add_argument("folders", nargs="+", metavar="FOLDER")
    sync = sub.add_parser("sync-ledger", help="copy the privacy ledger's spends and compute each scope's epsilon")
    sync.add_argument("--ledger", help="privacy ledger (default $SYNTHGEN_LEDGER or "
                                       "~/.local/share/synthgen/ledger.duckdb)")
    catalog.set_defaults(handler=_cmd_catalog, catalog_command=None)


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="measure the utility of synthetic data")
    kinds = evaluate.add_subparsers(dest="evaluate_command", required=True)
    synthetic = kinds.add_parser(
        "synthetic", epilog=_EVALUATE_EPILOG,
        help="train a fixed classifier only on a synthetic dataset and report its real test accuracy")
    synthetic.add_argument("dataset", metavar="DATASET",
                           help="a folder from build-dataset, a parquet file, or a Hub dataset NAMESPACE/NAME")
    synthetic.add_argument("--real-test", required=True,
                           help="real data with a test split: IDX, parquet or class-folder images, or a Hub id")
    synthetic.add_argument("--split", default="train", help="split of the synthetic dataset (default train)")
    synthetic.add_argument("--real-split", default="test", help="split of the real data to score (default test)")
    synthetic.add_argument("--revision", help="revision of a Hub dataset")

    synthetic.add_argument("--epochs", type=_integer, default=10, help="training epochs (default 10)")
    synthetic.add_argument("--batch-size", type=_integer, default=128, help="batch size (default 128)")
    synthetic.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    synthetic.add_argument("--validation-fraction", type=float, default=0.1,
                           help="fraction of synthetic rows held out to choose the epoch (default 0.1)")
    synthetic.add_argument("--targets", default="hard", choices=("hard", "soft"),
                           help="'hard': learn the label column (default); 'soft': learn the student's probabilities "
                                "column by distillation at --temperature (datasets built by synthgen-dataset/2 or "
                                "later)")
    synthetic.add_argument("--temperature", type=float, default=4.0,
                           help="distillation temperature of --targets soft (default 4)")
    synthetic.add_argument("--seed", type=_integer, default=0, help="first seed (default 0)")
    synthetic.add_argument("--seeds", type=_integer, default=1,
                           help="classifiers to train, with seeds SEED, SEED+1, ...; reports mean and std (default 1)")
    synthetic.add_argument("--limit", type=_integer, help="use only the first N synthetic rows")

    synthetic.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'")
    synthetic.add_argument("--dataset-name", help="name of the real data in the result record (default: the "
                                                  "--real-test folder name)")
    synthetic.add_argument("--results", metavar="FILE",
                           help="JSON file of result records to add this evaluation's record to, replacing a record "
                                "of the same dataset, generator and settings; checked before training (default: no "
                                "file, the result goes to the catalog and standard output)")
    synthetic.add_argument("--catalog", help="catalog file (default $SYNTHGEN_CATALOG or the default catalog)")
    synthetic.add_argument("--no-catalog", action="store_true", help="do not record the evaluation in the catalog")
    synthetic.set_defaults(handler=_cmd_evaluate)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `build-dataset`, `catalog` and `evaluate` to the synthgen command line."""
    _add_build(commands)
    _add_catalog(commands)
    _add_evaluate(commands)
