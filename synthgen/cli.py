"""The ``synthgen`` command line. Options mirror the fields of the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
import typing
from pathlib import Path

from .app_cli import add_commands as add_app_commands
from .audit_cli import add_commands as add_audit_commands
from .config import (
    TeacherTrainConfig,
    TranscribeConfig,
    build_config,
    check_teacher_train_options,
    check_transcribe_options,
    load_config_file,
)
from .dataset_cli import add_commands as add_dataset_commands
from .ensemble_cli import add_commands as add_ensemble_commands
from .hub_cli import add_commands as add_hub_commands

logger = logging.getLogger("synthgen")

_EPILOG = ("Exit status: 0 on success, 2 on invalid input or settings, 3 when the privacy budget is exhausted, "
           "4 when 'privacy recompute' finds that a card disagrees with its own privacy facts, 5 when the "
           "environment failed (disk full, I/O error, or the ledger locked by another run): fix the cause and run "
           "the command again.")

# Operating-system errors that the user fixes outside synthgen, with the usual remedy.
_OS_ERROR_HINTS = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free space within your disk quota",
    errno.EACCES: "fix the file permissions",
    errno.EPERM: "fix the file permissions",
    errno.EROFS: "choose a writable folder",
}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        kind = hints[field.name]
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} (default: {field.default})")
            continue
        base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
        converter = base[0] if base[0] in (int, float, str) else str
        parser.add_argument(flag, dest=field.name, type=converter, default=argparse.SUPPRESS,
                            help=f"{help_text} (default: {field.default})")


def _collect(args: argparse.Namespace, cls):
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    for field in dataclasses.fields(cls):
        if field.name in vars(args):
            values[field.name] = getattr(args, field.name)
    return build_config(cls, values)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train_teacher(args) -> int:
    from .data import load_image_data
    from .teacher import train_teacher, train_teacher_dp

    config = _collect(args, TeacherTrainConfig)
    if not config.data:
        raise ValueError("no private data given: pass --data FOLDER_OR_HUB_ID")
    if (config.resume or config.stop_after is not None) and not config.dp:
        raise ValueError("--resume and --stop-after apply to DP training only: add --dp, or drop them")
    check_teacher_train_options(config)
    train = _limit_training_split(load_image_data(config.data, "train"), config.limit, config.seed)
    test = load_image_data(config.data, config.eval_split) if config.eval_split else None
    teacher = (train_teacher_dp if config.dp else train_teacher)(config, train, test)
    if teacher is None:  # stopped by --stop-after
        print(json.dumps({"teacher": config.out, "completed": False}, indent=2))
        return 0
    summary = {"teacher": config.out, "test_accuracy": teacher.meta.test_accuracy,
               "note": "accuracy on the real test split (evaluation on private data)"}
    if teacher.meta.dp:
        summary.update({"unit": "example", "epsilon": teacher.meta.dp["epsilon"], "delta": teacher.meta.dp["delta"]})
    print(json.dumps(summary, indent=2))
    return 0


def _limit_training_split(train, limit: int | None, seed: int):
    """Draw `limit` random examples of `train`, or keep them all, with a warning when `limit` exceeds its size."""
    if limit is None:
        return train
    if limit > len(train):
        logger.warning("--limit %d is larger than the training split (%d examples); training on all %d",
                       limit, len(train), len(train))
    return train.subset(limit, seed=seed)


def _cmd_transcribe(args) -> int:
    from .transcribe import transcribe

    config = _collect(args, TranscribeConfig)
    check_transcribe_options(config)
    result = transcribe(config)
    if not result.main_process:
        return 0  # another rank of a distributed run; rank 0 prints the summary
    if not result.completed:
        print(json.dumps({"run_dir": str(result.run_dir), "completed": False}, indent=2))
        return 0
    report = result.report
    summary = {
        "run_dir": str(result.run_dir),
        "generator": str(result.run_dir / "generator"),
        "student": str(result.run_dir / "student"),
        "privacy_report": str(result.run_dir / "privacy_report.json"),
        "samples": str(result.run_dir / "samples.png"),
        "unit": report["unit"],
        "epsilon": report.get("epsilon"),
        "delta": report.get("delta"),
        "student_accuracy": report["evaluation"]["student_accuracy"],
        "accuracy_note": "on the real test split: evaluation on private data",
    }
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_ledger(args) -> int:
    from .privacy.ledger import Ledger, LedgerKey, default_ledger_path

    if args.ledger_command == "show":
        path = Path(args.ledger).expanduser() if args.ledger else default_ledger_path()
        if not path.is_file():
            if args.ledger:  # a mistyped path must not read as "nothing spent"
                raise ValueError(f"no privacy ledger at --ledger {path}; check the path (a DP training or a "
                                 "transcription creates the ledger)")
            logger.info("no privacy ledger at %s yet: nothing has been spent", path)
            print("[]")
            return 0
    with Ledger(args.ledger) as ledger:
        if args.ledger_command == "show":
            rows = ledger.summary()
            for row in rows:
                # The epsilon of the row's whole scope, composed over all its spends, at the delta
                # of the scope's cap (1e-5 when it has none).
                key = LedgerKey(row["dataset_fingerprint"], row["teacher_fingerprint"], row["unit"])
                cap = ledger.budget(key)
                delta = cap[1] if cap else 1e-5
                row.update(scope=key.scope, scope_epsilon=round(ledger.spent_epsilon(key, delta), 6),
                           at_delta=delta, scope_cap=cap[0] if cap else None)
            print(json.dumps(rows, indent=2, default=str))
        elif args.ledger_command == "set-budget":
            from .privacy.accounting import validate_delta, validate_epsilon

            validate_epsilon(args.epsilon)
            validate_delta(args.delta)
            kind, _, fingerprint = args.scope.partition(":")
            if kind not in ("teacher", "dataset") or not fingerprint:
                raise ValueError(f"scope must be 'teacher:<fingerprint>' or 'dataset:<fingerprint>', got {args.scope!r}")
            unit = "teacher" if kind == "teacher" else "example"
            key = LedgerKey(fingerprint if kind == "dataset" else "", fingerprint if kind == "teacher" else "", unit)
            ledger.set_budget(key, args.epsilon, args.delta)
            print(f"budget of {args.scope} set to epsilon {args.epsilon} at delta {args.delta}")
    return 0


def _os_error_message(args: argparse.Namespace, error: OSError) -> str:
    """Describe an operating-system error for the user: what failed, on which file, and what to do."""
    command = args.command
    name = errno.errorcode.get(error.errno, "unknown errno") if error.errno else type(error).__name__
    where = f" on {error.filename}" if error.filename else ""
    hint = _OS_ERROR_HINTS.get(error.errno, "fix the cause")
    message = f"{command} failed: {error.strerror or error} ({name}){where}; {hint} and run the command again"
    if command == "transcribe" or (command == "train-teacher" and getattr(args, "dp", False)):
        message += "; the files written so far and the ledger stay consistent, and an interrupted run continues with --resume"
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthgen",
        description="Differentially private model transcription: turn a classifier into a DP student and a DP "
                    "generator without touching the private data again.",
        epilog=_EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train-teacher", help="train a classifier (the teacher) on private data",
                                epilog=_EPILOG)
    train.add_argument("--config", help="YAML or JSON file with option values; command-line options override it")
    _add_dataclass_options(train, TeacherTrainConfig)
    train.set_defaults(handler=_cmd_train_teacher)

    transcribe = commands.add_parser("transcribe", help="transcribe a teacher into a DP student and generator",
                                     epilog=_EPILOG)
    transcribe.add_argument("--config", help="YAML or JSON file with option values; command-line options override it")
    _add_dataclass_options(transcribe, TranscribeConfig)
    transcribe.set_defaults(handler=_cmd_transcribe)

    ledger = commands.add_parser("ledger", help="inspect the privacy ledger or set a budget cap")
    ledger.add_argument("--ledger", help="ledger file (default $SYNTHGEN_LEDGER or ~/.local/share/synthgen/ledger.duckdb)")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    ledger_commands.add_parser("show", help="print spends per dataset, teacher and mechanism")
    set_budget = ledger_commands.add_parser("set-budget", help="set the epsilon cap of a scope")
    set_budget.add_argument("scope", help="'teacher:<fingerprint>' or 'dataset:<fingerprint>'")
    set_budget.add_argument("epsilon", type=float, help="cap on total epsilon")
    set_budget.add_argument("--delta", type=float, default=1e-5, help="delta at which the cap applies (default 1e-5)")
    ledger.set_defaults(handler=_cmd_ledger)
    add_dataset_commands(commands)
    add_hub_commands(commands)
    add_audit_commands(commands)
    add_ensemble_commands(commands)
    add_app_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from .privacy.ledger import BudgetExceededError, LedgerLockedError

    try:
        return args.handler(args)
    except BudgetExceededError as error:
        logger.error("%s", error)
        return 3
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        logger.error("%s", error)
        return 2
    except LedgerLockedError as error:
        logger.error("%s", error)
        return 5
    except OSError as error:
        logger.error("%s", _os_error_message(args, error))
        return 5
    except KeyboardInterrupt:
        logger.error("interrupted; an interrupted transcription continues with --resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
