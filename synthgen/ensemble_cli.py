"""The `train-teachers` and `assemble-teachers` commands. Heavy imports wait for the handlers."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from .config import LIMIT_FIX, THREADS_FIX, check_int_option, option

_EPILOG = ("The ensemble is private: it is a function of the private data and is never released. Accuracies are "
           "measured on the real test split (evaluation on private data). Exit status: 0 on success, 2 on invalid "
           "input or settings.")


@dataclass
class EnsembleTrainConfig:
    data: str = option("", "private training data: a folder of IDX, parquet or class-folder images, a Hub dataset id, "
                       "or mnist or fashion-mnist (the local copies synthgen finds or fetches)",
                       required=True)
    out: str = option("runs/ensemble", "folder to write the ensemble to (stacked weights, shard plan, metadata)")
    num_teachers: int = option(100, "number K of teachers, one per disjoint shard of the training set (K >= 2)")
    epochs: int = option(20, "passes of each teacher over its own shard")
    batch_size: int = option(32, "examples per optimiser step of each teacher, drawn from its shard")
    lr: float = option(2e-3, "learning rate (Adam, the same for every teacher)")
    width: int = option(16, "channel width of each teacher CNN")
    hidden: int = option(64, "hidden layer size of each teacher CNN")
    seed: int = option(0, "seed of the shard plan, the initialisations and the batch order")
    eval_split: str | None = option("test", "split to report the teachers' and the vote's test accuracy on "
                                    "(evaluation on private data); empty to skip")
    limit: int | None = option(None, "train on a random subset of this many examples (quick runs and tests)")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    overwrite: bool = option(False, "replace the ensemble that --out already contains (a folder with other files is "
                             "never replaced)")


def _cmd_train_teachers(args) -> int:
    from .cli import _collect, _limit_training_split
    from .data import load_image_data
    from .ensemble import check_num_teachers, train_ensemble

    config = _collect(args, EnsembleTrainConfig)
    if not config.data:
        raise ValueError("no private data given: pass --data FOLDER_OR_HUB_ID")
    check_num_teachers(config.num_teachers)
    if config.limit is not None:
        check_int_option("--limit", config.limit, 1, LIMIT_FIX)
    if config.threads is not None:
        check_int_option("--threads", config.threads, 1, THREADS_FIX)
    train = _limit_training_split(load_image_data(config.data, "train"), config.limit, config.seed)
    test = load_image_data(config.data, config.eval_split) if config.eval_split else None
    teacher = train_ensemble(config, train, test)
    print(json.dumps({
        "ensemble": config.out,
        "unit": "example",
        "num_teachers": teacher.num_teachers,
        "shard_plan_fingerprint": teacher.plan.fingerprint,
        "test_accuracy": teacher.meta.training.get("test_accuracy"),
        "note": "accuracy on the real test split (evaluation on private data)",
    }, indent=2))
    return 0


def _cmd_assemble_teachers(args) -> int:
    from .data import load_image_data
    from .ensemble import assemble_ensemble

    data = load_image_data(args.data, "train")
    teacher = assemble_ensemble(args.member, data, args.out, overwrite=args.overwrite)
    print(json.dumps({
        "ensemble": args.out,
        "num_teachers": teacher.num_teachers,
        "shard_plan_fingerprint": teacher.plan.fingerprint,
        "disjointness": teacher.plan.disjointness,
    }, indent=2))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `train-teachers` and `assemble-teachers` to the `synthgen` parser."""
    from .cli import _add_dataclass_options

    train = subparsers.add_parser(
        "train-teachers", epilog=_EPILOG,
        help="train K teachers on disjoint shards of private data (example-level transcription)",
        description="Split the private training set into K disjoint shards (deterministic from --seed) and train "
                    "one teacher per shard, all K as one stacked model. Transcribing the saved ensemble is "
                    "example-level DP, and needs no further access to the data.",
    )
    train.add_argument("--config", help="YAML or JSON file with option values; command-line options override it")
    _add_dataclass_options(train, EnsembleTrainConfig)
    train.set_defaults(handler=_cmd_train_teachers)

    assemble = subparsers.add_parser(
        "assemble-teachers", epilog=_EPILOG,
        help="combine K synthgen teachers trained on disjoint parts of the data into one ensemble",
        description="Stack K teachers from 'synthgen train-teacher' that the user trained on disjoint parts of "
                    "--data. synthgen cannot check the disjointness: the privacy report states it as the user's "
                    "statement.",
    )
    assemble.add_argument("--member", action="append", required=True,
                          help="a teacher folder; repeat once per member (at least 2)")
    assemble.add_argument("--data", required=True, help="the whole private training set the members' parts come from")
    assemble.add_argument("--out", required=True, help="folder to write the ensemble to")
    assemble.add_argument("--overwrite", action="store_true",
                          help="replace the ensemble that --out already contains (a folder with other files is never "
                               "replaced)")
    assemble.set_defaults(handler=_cmd_assemble_teachers)
