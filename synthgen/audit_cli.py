"""The `audit` command. Heavy imports wait for the handler, so that `synthgen --help` stays fast."""

from __future__ import annotations

import argparse
import json

_EPILOG = ("Writes RUN_DIR/audit.json. The audit evaluates on private data: its numbers are not covered by the "
           "DP guarantee. Exit status: 0 on success, 2 on invalid input or settings.")


def _cmd_audit(args) -> int:
    from .audit import AuditConfig, run_audit, summarise

    config = AuditConfig(
        run_dir=args.run_dir, private_data=args.private_data, heldout_data=args.heldout_data,
        heldout_split=args.heldout_split, teacher=args.teacher, teacher_factory=args.teacher_factory,
        trust_pickle=args.trust_pickle, audit_size=args.audit_size, shadow_models=args.shadow_models,
        shadow_epochs=args.shadow_epochs, shadow_width=args.shadow_width, shadow_hidden=args.shadow_hidden,
        synthetic_samples=args.synthetic_samples, bootstrap=args.bootstrap, seed=args.seed, threads=args.threads,
    )
    result = run_audit(config)
    print(json.dumps({"audit": f"{args.run_dir.rstrip('/')}/audit.json", **summarise(result)}, indent=2))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `audit` command to the `synthgen` parser."""
    audit = subparsers.add_parser(
        "audit", epilog=_EPILOG,
        help="membership-inference audit of a finished run (student, with the teacher as contrast)",
        description="Attack a finished run's student and teacher with a loss-threshold and a LiRA membership-"
                    "inference attack, measure the generator's distance to training and held-out images, and "
                    "compare each TPR with the bound that the run's (epsilon, delta) implies.",
    )
    audit.add_argument("run_dir", help="folder of a finished transcription")
    audit.add_argument("--private-data", required=True,
                       help="the teacher's private training data (members of the audit)")
    audit.add_argument("--heldout-data", help="data with the held-out split (default: --private-data)")
    audit.add_argument("--heldout-split", default="test", help="split of non-members (default: test)")
    audit.add_argument("--teacher", help="teacher to attack for contrast (default: the one the run recorded)")
    audit.add_argument("--teacher-factory", help="package.module:function for a .safetensors teacher")
    audit.add_argument("--trust-pickle", action="store_true", help="load a pickle teacher checkpoint")
    audit.add_argument("--audit-size", type=int, default=1000,
                       help="members audited, and as many held-out examples (default: 1000)")
    audit.add_argument("--shadow-models", type=int, default=8, help="LiRA shadow models (default: 8)")
    audit.add_argument("--shadow-epochs", type=int, default=10, help="training epochs of each shadow (default: 10)")
    audit.add_argument("--shadow-width", type=int, help="shadow CNN channel width (default: the teacher's, or 16)")
    audit.add_argument("--shadow-hidden", type=int, help="shadow CNN hidden layer size (default: the teacher's, or 64)")
    audit.add_argument("--synthetic-samples", type=int, default=1000,
                       help="generator samples for the distance measures (default: 1000)")
    audit.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples per interval (default: 500)")
    audit.add_argument("--seed", type=int, default=0, help="seed of the samples, shadows and bootstrap (default: 0)")
    audit.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    audit.set_defaults(handler=_cmd_audit)
