"""The `push`, `pull` and `privacy recompute` commands. Heavy imports wait for the handlers,
so that `synthgen --help` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("synthgen")

RECOMPUTE_MISMATCH_EXIT = 4
_HUB_EPILOG = ("Hub settings come from HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and HF_HUB_CACHE or HF_HOME. "
               "Exit status: 0 on success, 2 on invalid input, or when the Hub cannot be reached or rejects the "
               "request.")
_RECOMPUTE_EPILOG = ("Exit status: 0 when every number on the card agrees with the recomputation, 2 on invalid "
                     f"input, {RECOMPUTE_MISMATCH_EXIT} when the card disagrees with the recomputed epsilon or "
                     "its own privacy events.")


def _cmd_push(args) -> int:
    from .hub import push

    result = push(args.run_dir, args.repo_id, revision=args.revision, private=args.private, license=args.license,
                  commit_message=args.message)
    print(json.dumps({"repo_id": result.repo_id, "revision": result.revision, "commit": result.commit,
                      "commit_url": result.commit_url, "files": result.files}, indent=2))
    return 0


def _cmd_pull(args) -> int:
    from .hub import pull
    from .transcribe import resolve_device

    # Checked before the download, so that a typo costs no transfer.
    if args.samples < 0:
        raise ValueError(f"--samples must be an integer >= 0, got {args.samples}; pass 0 or omit it to write no "
                         "samples")
    resolve_device(args.device)
    release = pull(args.repo_id, revision=args.revision, device=args.device, cache_dir=args.cache_dir)
    summary = release.summary()
    if args.samples:
        import torch

        output = release.pipeline(num_images=args.samples, generator=torch.Generator().manual_seed(args.seed))
        folder = Path(args.samples_dir or f"{args.repo_id.replace('/', '--')}-{release.commit[:12]}-samples")
        folder.mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(output.images, output.labels)):
            image.save(folder / f"{index:05d}_label{int(label)}.png")
        summary["samples"] = str(folder)
    print(json.dumps(summary, indent=2))
    return 0


def _load_card_metadata(target: str, revision: str | None) -> tuple[dict, str]:
    """Find the card named by `target` (file, folder, run folder or Hub repo) and parse its YAML."""
    from .cards import parse_card, render_card

    path = Path(target)
    if path.exists():
        if path.is_dir() and (path / "README.md").is_file():
            path = path / "README.md"
        elif path.is_dir() and (path / "privacy_report.json").is_file():
            from .hub import _read_json

            report = _read_json(path / "privacy_report.json", "privacy report")
            return parse_card(render_card(report)), f"the card rendered from {path / 'privacy_report.json'}"
        if not path.is_file():
            raise FileNotFoundError(f"{target} contains neither a model card (README.md) nor a privacy report")
        return parse_card(path.read_text(encoding="utf-8")), str(path)
    if target.count("/") != 1 or target.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{target} is neither an existing path nor a Hub repository id NAMESPACE/NAME")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    from .hub import HubSettings, ReleaseError, ReleaseNotCachedError, _check_repo_id, _translate_hub_errors

    _check_repo_id(target)
    settings = HubSettings.resolve()
    if not settings.offline:
        settings.check_online()
    where = target + (f" at revision {revision!r}" if revision else "")
    with _translate_hub_errors(settings, target, revision, "reading the card of"):
        try:
            card = hf_hub_download(target, "README.md", revision=revision, endpoint=settings.endpoint,
                                   cache_dir=settings.cache_dir, local_files_only=settings.offline)
        except RemoteEntryNotFoundError:
            raise ReleaseError(f"{where} has no README.md, so it is not a synthgen release; give a repository that "
                               "'synthgen push' wrote") from None
        except LocalEntryNotFoundError:
            if not settings.offline:
                raise
            raise ReleaseNotCachedError(f"HF_HUB_OFFLINE is set and the card of {where} is not in the cache; pull "
                                        "it once with network access, or unset HF_HUB_OFFLINE") from None
    return parse_card(Path(card).read_text(encoding="utf-8")), f"{target}" + (f"@{revision}" if revision else "")


def _cmd_recompute(args) -> int:
    from .recompute import recompute_card

    metadata, source = _load_card_metadata(args.target, args.revision)
    result = recompute_card(metadata)
    output = {"source": source, **result.to_dict()}
    print(json.dumps(output, indent=2))
    if result.card_accountant_version and result.card_accountant_version != result.accountant_version:
        logger.warning("the card was computed with dp_accounting %s, this is %s; small differences can come from that",
                       result.card_accountant_version, result.accountant_version)
    if not result.passed:
        logger.error("the card disagrees with the recomputation: %s", ", ".join(output["failed_checks"]))
        return RECOMPUTE_MISMATCH_EXIT
    logger.info("epsilon %.6g at delta %g recomputed from %s: the card agrees", result.pld_epsilon, result.delta,
                source)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `push`, `pull` and `privacy recompute` to the synthgen command line."""
    push = commands.add_parser("push", help="publish a finished run on a Hugging Face Hub with its privacy datasheet",
                               epilog=_HUB_EPILOG)
    push.add_argument("run_dir", help="finished run folder from 'synthgen transcribe'")
    push.add_argument("repo_id", help="model repository NAMESPACE/NAME; created if missing")
    push.add_argument("--revision", help="branch to commit to, created from main if missing (default main)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--license", default="apache-2.0", help="license identifier for the card (default apache-2.0)")
    push.add_argument("--message", help="commit message (default names the unit and epsilon)")
    push.set_defaults(handler=_cmd_push)

    pull = commands.add_parser("pull", help="download a release into the Hugging Face cache and load it",
                               epilog=_HUB_EPILOG)
    pull.add_argument("repo_id", help="model repository NAMESPACE/NAME")
    pull.add_argument("--revision", help="branch, tag or commit hash (default main); the output records the commit "
                                         "it resolved to")
    pull.add_argument("--cache-dir", help="Hugging Face cache folder (default $HF_HUB_CACHE or $HF_HOME/hub)")
    pull.add_argument("--device", default="cpu", help="torch device to load the pipeline on (default cpu)")
    pull.add_argument("--samples", type=int, default=0, help="also write this many sampled images as PNG files")
    pull.add_argument("--samples-dir", help="folder for --samples, files named INDEX_labelLABEL.png "
                                            "(default NAMESPACE--NAME-COMMIT-samples)")
    pull.add_argument("--seed", type=int, default=0, help="seed of the sampled latents (default 0)")
    pull.set_defaults(handler=_cmd_pull)

    privacy = commands.add_parser("privacy", help="check the privacy claim of a release", epilog=_RECOMPUTE_EPILOG)
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    recompute = privacy_commands.add_parser(
        "recompute", epilog=_RECOMPUTE_EPILOG,
        help="recompute epsilon from a model card's YAML with both accountants and compare it with the card")
    recompute.add_argument("target", metavar="PATH_OR_REPO",
                           help="a model card (README.md), a release or run folder, or a Hub repository NAMESPACE/NAME")
    recompute.add_argument("--revision", help="revision of a Hub repository (default main)")
    recompute.set_defaults(handler=_cmd_recompute)
