"""Publish a finished run on a Hugging Face Hub and pull a release back.

A release is exactly the files in `RELEASE_FILES` plus the two model folders: the DPSDPipeline
(generator and student as config.json plus safetensors), the run's privacy report, its sample
grid and the model card. Nothing else from the run folder leaves the machine. In particular,
`private/` (data paths, fingerprints, checkpoints) and `metrics.jsonl` (repeated evaluations
on the private test split) are never uploaded.

Hub settings are read when a function is called, with huggingface_hub's names: `HF_ENDPOINT`
(a company Hub works the same), `HF_TOKEN`, `HF_HUB_OFFLINE` (load a pulled revision from the
cache without any request) and `HF_HUB_CACHE` or `HF_HOME`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import DPSDPipeline

logger = logging.getLogger(__name__)

REPORT_FILE = "privacy_report.json"
CARD_FILE = "README.md"
RELEASE_FILES = ("model_index.json", CARD_FILE, REPORT_FILE, "samples.png")
AUDIT_FILE = "audit.json"  # released when the run was audited with `synthgen audit`
MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
MODEL_CLASSES = {"generator": "Generator", "student": "Classifier"}
# Everything a pull downloads. Other files in the repository are never fetched.
ALLOW_PATTERNS = [*RELEASE_FILES, AUDIT_FILE, *(f"{part}/*" for part in MODEL_CLASSES)]
# Formats that torch or pickle deserialise by running code from the file.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")
# Keys of the run's private files (and of the teacher's metadata) whose values must not appear
# in any released file.
_PRIVATE_VALUE_KEYS = ("teacher", "private_data", "eval_data", "teacher_meta", "teacher_factory", "ledger", "out",
                       "dataset_fingerprint", "teacher_fingerprint", "run_id", "data")
# Report keys that describe the private data. A report that contains one is not released.
_PRIVATE_REPORT_KEYS = ("num_examples", "dataset_fingerprint", "teacher_fingerprint", "private_data", "ledger")
_STAGING_PREFIX = ".synthgen-pull-"
_STALE_STAGING_SECONDS = 24 * 3600


class ReleaseError(ValueError):
    """Raised when a release cannot be pushed or pulled. The message names the cause and the fix."""


class UnsafeReleaseError(ReleaseError):
    """Raised for content synthgen does not publish or load: pickle weights, classes other than its
    own, or values from the run's private files."""


class IncompleteReleaseError(ReleaseError):
    """Raised when a file that every release needs is missing from the run folder or the repository."""


class HubConnectionError(ReleaseError):
    """Raised when the Hub endpoint cannot be reached."""


class HubAuthenticationError(ReleaseError):
    """Raised when the Hub rejects the token."""


class HubNotFoundError(ReleaseError):
    """Raised when the repository or revision does not exist, or is private and the token cannot read it."""


class ReleaseNotCachedError(ReleaseError):
    """Raised in offline mode when the revision is not in the local cache."""


@dataclass(frozen=True)
class HubSettings:
    """Hub endpoint, offline switch, cache folder and token, resolved from arguments and the environment."""

    endpoint: str
    offline: bool
    cache_dir: Path
    token: str | bool | None = None  # None uses HF_TOKEN or the stored login, and False sends no token

    @classmethod
    def resolve(cls, endpoint: str | None = None, token: str | bool | None = None, offline: bool | None = None,
                cache_dir: str | os.PathLike | None = None) -> "HubSettings":
        from huggingface_hub import constants

        # Read now rather than at import: huggingface_hub fixes its constants when it is first
        # imported, which in a notebook or an app happens before the caller sets these.
        endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        if offline is None:
            value = os.environ.get("HF_HUB_OFFLINE")
            offline = constants.HF_HUB_OFFLINE if value is None else value.strip().lower() in ("1", "true", "yes", "on")
        if cache_dir is None:
            if os.environ.get("HF_HUB_CACHE"):
                cache_dir = os.environ["HF_HUB_CACHE"]
            elif os.environ.get("HF_HOME"):
                cache_dir = os.path.join(os.environ["HF_HOME"], "hub")
            else:
                cache_dir = constants.HF_HUB_CACHE
        return cls(endpoint, bool(offline), Path(cache_dir).expanduser().resolve(), token)

    def check_online(self) -> None:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ReleaseError(
                "HF_HUB_OFFLINE was set when huggingface_hub was imported in this process, so it blocks every "
                "request; unset it before starting Python, or set HF_HUB_OFFLINE=1 to load a pulled revision"
            )


@dataclass
class PushedRelease:
    repo_id: str
    revision: str
    commit: str  # the commit hash the release was written as
    commit_url: str
    files: list[str]


@dataclass
class PulledRelease:
    """A release loaded from a Hub repository, with the commit it resolved to."""

    repo_id: str
    revision: str
    commit: str
    path: Path  # the snapshot folder in the Hugging Face cache
    pipeline: DPSDPipeline
    report: dict
    card_path: Path
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "path": str(self.path),
                "unit": self.report.get("unit"), "epsilon": self.report.get("epsilon"),
                "delta": self.report.get("delta"), "files": self.files}


# ---------------------------------------------------------------- errors


@contextlib.contextmanager
def _translate_hub_errors(settings: HubSettings, repo_id: str, revision: str | None, action: str) -> Iterator[None]:
    """Turn huggingface_hub and HTTP errors into ReleaseErrors that name the fix."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    try:
        yield
    except RevisionNotFoundError:
        raise HubNotFoundError(f"revision {revision!r} not found in {repo_id} on {settings.endpoint}; pass an "
                               "existing branch, tag or commit hash with --revision") from None
    except RemoteEntryNotFoundError as error:
        raise IncompleteReleaseError(f"{action} {where} failed: a file the repository lists could not be "
                                     f"downloaded from {settings.endpoint} ({_first_line(error)})") from None
    except RepositoryNotFoundError:
        raise HubNotFoundError(f"repository {repo_id} not found on {settings.endpoint}, or it is private and the "
                               "token cannot read it; check the repository id and HF_TOKEN") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            from huggingface_hub import get_token

            sent = settings.token if isinstance(settings.token, str) else (None if settings.token is False
                                                                           else get_token())
            problem = "rejected the token" if sent else "requires a token and none was sent"
            raise HubAuthenticationError(f"{action} {where} failed: {settings.endpoint} {problem} (HTTP "
                                         "401); set HF_TOKEN to a valid token"
                                         + (" with write access" if action == "pushing" else "")) from None
        if status == 403:
            raise HubAuthenticationError(f"{action} {where} failed: the token has no permission for this repository "
                                         "(HTTP 403); use a token with access to it") from None
        raise ReleaseError(f"{action} {where} failed: {settings.endpoint} returned HTTP {status} "
                           f"({_first_line(error)})") from None
    except (httpx2.ConnectError, httpx2.TimeoutException) as error:
        raise HubConnectionError(f"{action} {where} failed: cannot connect to the Hub at {settings.endpoint} "
                                 f"({error}); check HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1 to load a "
                                 "revision pulled before") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise HubConnectionError(f"{action} {where} failed: the Hub at {settings.endpoint} could not be used "
                                 f"({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- staging a release


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ReleaseError(f"repository id must be NAMESPACE/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ReleaseError(f"invalid repository id {repo_id!r}: {_first_line(error)}") from None


def _pickle_files(paths) -> list[str]:
    return sorted(str(path) for path in paths if str(path).lower().endswith(PICKLE_SUFFIXES))


def _required_files() -> list[str]:
    return [*RELEASE_FILES, *(f"{part}/{name}" for part in MODEL_CLASSES for name in MODEL_FILES)]


def _private_values(run_dir: Path) -> set[str]:
    """Collect the strings from the run's private files that must never be released."""
    from .teacher import META_FILE

    values: set[str] = set()

    def collect(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _PRIVATE_VALUE_KEYS and isinstance(value, str) and value:
                    values.add(value)
                    if ":" in value:  # a fingerprint "sha256:<hex>" is as telling without its prefix
                        values.add(value.split(":", 1)[1])
                    if os.sep in value or value.startswith("."):
                        values.add(str(Path(value).expanduser().resolve()))
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    private = run_dir / "private"
    sources = sorted(private.glob("*.json")) if private.is_dir() else []
    run_config = private / "run_config.json"
    if run_config.is_file():
        # The teacher's metadata names its training data and that data's fingerprint.
        teacher = json.loads(run_config.read_text()).get("config", {}).get("teacher") or ""
        if (Path(teacher) / META_FILE).is_file():
            sources.append(Path(teacher) / META_FILE)
    for path in sources:
        try:
            collect(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("could not read %s to check the release for private values: %s", path, error)
    values.add(str(run_dir.resolve() / "private"))
    # Short values such as "." or "data" would match ordinary text.
    return {value for value in values if len(value) >= 8}


def check_release_folder(folder: Path, run_dir: Path | None = None) -> list[str]:
    """Check a staged release before upload and return its files (relative, sorted).

    Raises:
        UnsafeReleaseError: a file outside the release layout, a pickle file, a report key that
            describes the private data, or a value from the run's private files in any file.
        IncompleteReleaseError: a file every release needs is missing.
    """
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    allowed = {*_required_files(), AUDIT_FILE}
    extra = [name for name in files if name not in allowed]
    if extra:
        raise UnsafeReleaseError(f"the staged release contains files outside the release layout: {extra}")
    missing = [name for name in _required_files() if name not in files]
    if missing:
        raise IncompleteReleaseError(f"the staged release lacks {missing}")
    report = json.loads((folder / REPORT_FILE).read_text())
    leaked_keys = sorted(_find_keys(report, set(_PRIVATE_REPORT_KEYS)))
    if leaked_keys:
        raise UnsafeReleaseError(f"{REPORT_FILE} contains keys that describe the private data: {leaked_keys}")
    if run_dir is not None:
        secrets = _private_values(run_dir)
        for name in files:
            content = (folder / name).read_bytes()
            found = sorted(value for value in secrets if value.encode() in content)
            if found:
                raise UnsafeReleaseError(f"{name} contains {len(found)} value(s) from the run's private files "
                                         "(data paths, fingerprints or run ids); remove them before publishing")
    return files


def _find_keys(node, keys: set[str]) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        found |= keys & set(node)
        for value in node.values():
            found |= _find_keys(value, keys)
    elif isinstance(node, list):
        for item in node:
            found |= _find_keys(item, keys)
    return found


def _read_json(path: Path, kind: str) -> dict:
    """Return the JSON object in `path`; raise ReleaseError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReleaseError(f"{path} is not a readable JSON {kind} ({error}); write it again with synthgen") from None
    if not isinstance(value, dict):
        raise ReleaseError(f"{path} is not a JSON {kind} (an object); write it again with synthgen")
    return value


def stage_release(run_dir: str | os.PathLike, folder: str | os.PathLike, repo_id: str | None = None,
                  revision: str | None = None, license: str = "apache-2.0") -> list[str]:  # noqa: A002
    """Write the release of a finished run into `folder` (empty or new) and check it.

    Model weights, the privacy report, the sample grid and the audit (if the run has one) are
    copied byte for byte. model_index.json and the card are written fresh. Returns the staged
    files (relative paths).
    """
    from .cards import render_card
    from .models import Classifier, Generator
    from .pipeline import DPSDPipeline

    run_dir, folder = Path(run_dir), Path(folder)
    if not (run_dir / REPORT_FILE).is_file():
        raise IncompleteReleaseError(f"{run_dir} contains no finished run ({REPORT_FILE} is missing); finish the "
                                     "transcription first, or resume it with --resume")
    report = _read_json(run_dir / REPORT_FILE, "privacy report")
    if not report.get("private"):
        raise ReleaseError(f"run {run_dir} is not private (mechanism {report.get('mechanism', {}).get('name')!r}); "
                           "only DP runs can be published")
    for part in MODEL_CLASSES:
        source = run_dir / part
        pickles = _pickle_files(path.name for path in source.glob("*")) if source.is_dir() else []
        if pickles:
            raise UnsafeReleaseError(f"{source} contains pickle files {pickles}; a release carries safetensors only")
        for name in MODEL_FILES:
            if not (source / name).is_file():
                raise IncompleteReleaseError(f"{source / name} is missing; the run folder is incomplete")
    if not (run_dir / "samples.png").is_file():
        raise IncompleteReleaseError(f"{run_dir / 'samples.png'} is missing; the run folder is incomplete")

    # A datasheet whose own numbers do not recompute must not be published: the report was
    # altered, or written by a synthgen whose accounting differs from this one.
    from .cards import release_facts
    from .recompute import recompute_card

    audit = _read_json(run_dir / AUDIT_FILE, "audit") if (run_dir / AUDIT_FILE).is_file() else None
    try:
        recomputation = recompute_card(release_facts(report, audit))
    except ValueError as error:
        raise ReleaseError(f"the release of {run_dir} cannot be checked: {error}") from None
    if not recomputation.passed:
        failed = "; ".join(f"{check.name}: {check.detail}" for check in recomputation.checks if not check.passed)
        raise ReleaseError(f"the privacy report of {run_dir} does not agree with its own events ({failed}); nothing "
                           "was published. Run 'synthgen privacy recompute' on the run to see every check, and "
                           "publish only a report that synthgen wrote")

    # Loading both parts checks that they are the classes the pipeline expects.
    pipeline = DPSDPipeline(generator=Generator.from_pretrained(run_dir / "generator", use_safetensors=True),
                            student=Classifier.from_pretrained(run_dir / "student", use_safetensors=True))
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_config(folder)  # model_index.json
    for part in MODEL_CLASSES:
        (folder / part).mkdir()
        for name in MODEL_FILES:
            shutil.copyfile(run_dir / part / name, folder / part / name)
    shutil.copyfile(run_dir / REPORT_FILE, folder / REPORT_FILE)
    shutil.copyfile(run_dir / "samples.png", folder / "samples.png")
    if audit is not None:
        shutil.copyfile(run_dir / AUDIT_FILE, folder / AUDIT_FILE)
    card = render_card(report, repo_id=repo_id, revision=revision, license=license, audit=audit)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return check_release_folder(folder, run_dir)


# ---------------------------------------------------------------- push


def _valid_branch_name(name: str) -> bool:
    """Return whether git accepts `name` as a branch (the rules of git check-ref-format).

    NOTE: a Hub server may reject some names that git accepts; those still fail at the branch
    request, after the repository was created.
    """
    if not name.strip() or name != name.strip() or name == "@" or name.endswith((".", "/", ".lock")):
        return False
    if name.startswith(("/", "-")) or ".." in name or "//" in name or "@{" in name:
        return False
    if any(character in name for character in " ~^:?*[\\") or any(ord(character) < 32 or ord(character) == 127
                                                                    for character in name):
        return False
    return not any(part.startswith(".") for part in name.split("/"))


def push(run_dir: str | os.PathLike, repo_id: str, revision: str | None = None, private: bool = False,
         license: str = "apache-2.0", commit_message: str | None = None, endpoint: str | None = None,  # noqa: A002
         token: str | bool | None = None) -> PushedRelease:
    """Publish a finished run as a release: pipeline, privacy report, samples and model card.

    Args:
        run_dir: a finished run folder from `synthgen transcribe`.
        repo_id: NAMESPACE/NAME of the model repository; it is created if missing.
        revision: the branch to commit to (created from main if missing); default main.
        private: create the repository as private; an existing public repository is rejected.
        license: the license identifier written into the card.
        commit_message: the commit title; default names the unit and epsilon.
        endpoint, token: override HF_ENDPOINT and HF_TOKEN.

    Returns:
        The pushed release, with the commit hash it was written as.

    Raises:
        ReleaseError (a ValueError) and its subclasses, with a message that names the fix.
    """
    from huggingface_hub import HfApi

    _check_repo_id(repo_id)
    if revision is not None and (re.fullmatch(r"[0-9a-f]{40}", revision) or not _valid_branch_name(revision)):
        raise ReleaseError(f"--revision must name a branch to commit to, got {revision!r}; pass a branch name such "
                           "as v1 (it is created from main if missing)")
    settings = HubSettings.resolve(endpoint=endpoint, token=token)
    if settings.offline:
        raise ReleaseError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset HF_HUB_OFFLINE")
    settings.check_online()
    branch = revision or "main"
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="synthgen-release-") as staging:
        files = stage_release(run_dir, staging, repo_id=repo_id, revision=branch)
        report = json.loads((Path(staging) / REPORT_FILE).read_text())
        logger.info("pushing %s to %s on %s (branch %s): unit %s, epsilon %.4g at delta %g, %d files", run_dir,
                    repo_id, settings.endpoint, branch, report.get("unit"), report.get("epsilon"),
                    report.get("delta"), len(files))
        api = HfApi(endpoint=settings.endpoint, token=settings.token)
        with _translate_hub_errors(settings, repo_id, branch, "pushing"):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if private and not api.repo_info(repo_id).private:
                raise ReleaseError(f"{repo_id} already exists and is public, but --private was requested; make the "
                                   "repository private on the Hub first, or choose another repository")
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            message = commit_message or (f"Release: {report.get('unit')}-level ({report.get('epsilon'):.4g}, "
                                         f"{report.get('delta'):g})-DP generator and student")
            # delete_patterns="*" removes files of an earlier release that this one does not have
            # (huggingface_hub keeps .gitattributes), so the revision holds exactly this release.
            commit = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=branch,
                                       commit_message=message, delete_patterns="*")
    logger.info("pushed %s as commit %s of %s in %.1f s", repo_id, commit.oid, branch, time.time() - started)
    return PushedRelease(repo_id, branch, commit.oid, str(commit.commit_url), files)


# ---------------------------------------------------------------- pull


def _check_listing(repo_id: str, commit: str, files: list[str]) -> None:
    pickles = _pickle_files(files)
    if pickles:
        raise UnsafeReleaseError(f"{repo_id} at commit {commit} carries pickle files {pickles}; synthgen loads "
                                 "safetensors weights only and rejects repositories that carry pickle files")
    missing = [name for name in _required_files() if name not in files]
    if missing:
        raise IncompleteReleaseError(f"{repo_id} at commit {commit} is not a complete synthgen release: it lacks "
                                     f"{missing}")


def load_release_folder(path: str | os.PathLike, device: str = "cpu") -> tuple[DPSDPipeline, dict]:
    """Load the pipeline and privacy report of a release folder, from safetensors only.

    The classes are synthgen's own; a model_index.json that names any other class is rejected,
    so nothing named by the repository is imported.
    """
    from .models import Classifier, Generator
    from .pipeline import DPSDPipeline

    path = Path(path)
    files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    _check_listing(str(path), "(local)", files)
    index = json.loads((path / "model_index.json").read_text())
    expected = {part: ["synthgen.models", name] for part, name in MODEL_CLASSES.items()}
    declared = {key: value for key, value in index.items() if not key.startswith("_")}
    if index.get("_class_name") != "DPSDPipeline" or declared != expected:
        raise UnsafeReleaseError(f"{path / 'model_index.json'} declares {index.get('_class_name')!r} with parts "
                                 f"{declared}; synthgen loads only DPSDPipeline with {expected}")
    parts = {}
    for part, cls in (("generator", Generator), ("student", Classifier)):
        config = json.loads((path / part / "config.json").read_text())
        if config.get("_class_name") != cls.__name__:
            raise UnsafeReleaseError(f"{path / part / 'config.json'} is a {config.get('_class_name')!r}, "
                                     f"expected {cls.__name__}")
        parts[part] = cls.from_pretrained(path / part, use_safetensors=True)
    pipeline = DPSDPipeline(**parts).to(device)
    report = json.loads((path / REPORT_FILE).read_text())
    return pipeline, report


def _sweep_stale_staging(cache_dir: Path) -> None:
    """Remove staging folders that a killed pull left behind (older than a day)."""
    if not cache_dir.is_dir():
        return
    for entry in cache_dir.glob(f"{_STAGING_PREFIX}*.tmp"):
        try:
            if time.time() - entry.stat().st_mtime > _STALE_STAGING_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _install_snapshot(staging: Path, cache_dir: Path, repo_id: str, commit: str, revision: str) -> Path:
    """Move a complete snapshot from the staging cache into the Hugging Face cache.

    The layout is huggingface_hub's: blobs/<etag>, snapshots/<commit>/<path> (relative symlinks
    to the blobs), trees/<commit>.json and refs/<branch>. Blobs go first; the rename of the
    snapshot folder makes the revision visible in one step; the ref is written last.
    """
    from huggingface_hub.file_download import repo_folder_name

    from ._io import atomic_write_text

    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    source, target = staging / folder, cache_dir / folder
    (target / "blobs").mkdir(parents=True, exist_ok=True)
    for blob in (source / "blobs").iterdir() if (source / "blobs").is_dir() else []:
        destination = target / "blobs" / blob.name
        if destination.exists():
            continue  # a blob is named by its hash: an existing one has the same content
        if blob.is_symlink():
            # Xet downloads link blobs into a store inside the staging cache, so the content is copied.
            partial = destination.with_name(destination.name + f".{os.getpid()}.tmp")
            shutil.copyfile(blob.resolve(), partial)
            os.replace(partial, destination)
        else:
            os.replace(blob, destination)
    if (source / "trees").is_dir():
        (target / "trees").mkdir(exist_ok=True)
        for tree in (source / "trees").iterdir():
            os.replace(tree, target / "trees" / tree.name)
    snapshot = target / "snapshots" / commit
    snapshot.parent.mkdir(exist_ok=True)
    old = None
    if snapshot.exists():
        old = snapshot.with_name(f".{commit}.old-{os.getpid()}")
        os.replace(snapshot, old)
    os.replace(source / "snapshots" / commit, snapshot)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if revision != commit:
        atomic_write_text(target / "refs" / revision, commit)
    return snapshot


def _cached_snapshot(cache_dir: Path, repo_id: str, commit: str, files: list[str]) -> Path | None:
    """Return the cached snapshot of `commit` when it contains every file a pull downloads, else None."""
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import filter_repo_objects

    snapshot = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    expected = list(filter_repo_objects(files, allow_patterns=ALLOW_PATTERNS))
    # is_file follows the snapshot's symlinks, so a link to a missing blob counts as missing.
    missing = [name for name in expected if not (snapshot / name).is_file()]
    if missing:
        logger.info("the cached snapshot %s lacks %s; downloading the commit again", snapshot, missing[:5])
        return None
    return snapshot


def pull(repo_id: str, revision: str | None = None, device: str = "cpu", endpoint: str | None = None,
         token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> PulledRelease:
    """Download a release into the Hugging Face cache and load it.

    Online, the revision is resolved to a commit and the file list is checked before anything is
    downloaded. A commit whose snapshot is already complete in the cache is loaded from there
    without a download. Otherwise the snapshot goes to a staging folder inside the cache folder,
    is loaded, and only then moves into the cache, so a failed pull leaves no cache entry behind. Offline
    (HF_HUB_OFFLINE=1), the revision is loaded from the cache without any request.

    Args:
        repo_id: NAMESPACE/NAME of the model repository.
        revision: branch, tag or commit hash; default main.
        device: torch device for the pipeline.
        endpoint, token, cache_dir: override HF_ENDPOINT, HF_TOKEN (False sends no token) and the
            cache folder.

    Returns:
        The release, with the commit hash the revision resolved to.

    Raises:
        ReleaseError (a ValueError) and its subclasses, with a message that names the fix.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    _check_repo_id(repo_id)
    settings = HubSettings.resolve(endpoint=endpoint, token=token, cache_dir=cache_dir)
    revision = revision or "main"

    if settings.offline:
        try:
            path = Path(snapshot_download(repo_id, revision=revision, cache_dir=settings.cache_dir,
                                          local_files_only=True, allow_patterns=ALLOW_PATTERNS))
        except (LocalEntryNotFoundError, IncompleteSnapshotError):
            raise ReleaseNotCachedError(f"HF_HUB_OFFLINE is set and revision {revision!r} of {repo_id} is not in the "
                                        f"cache {settings.cache_dir}; pull it once with network access") from None
        pipeline, report = load_release_folder(path, device)
        logger.info("loaded %s revision %s (commit %s) from the cache, offline", repo_id, revision, path.name)
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        return PulledRelease(repo_id, revision, path.name, path, pipeline, report, path / CARD_FILE, files)

    settings.check_online()
    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    with _translate_hub_errors(settings, repo_id, revision, "pulling"):
        info = api.model_info(repo_id, revision=revision)
    commit = info.sha
    files = sorted(sibling.rfilename for sibling in info.siblings or [])
    _check_listing(repo_id, commit, files)
    released = sorted(name for name in files if name in {*_required_files(), AUDIT_FILE})
    cached = _cached_snapshot(settings.cache_dir, repo_id, commit, files)
    if cached is not None:
        # A commit never changes, so a snapshot that contains every file of its listing is that commit.
        pipeline, report = load_release_folder(cached, device)
        if revision != commit:
            from ._io import atomic_write_text

            atomic_write_text(cached.parent.parent / "refs" / revision, commit)
        logger.info("%s revision %s (commit %s) is already in the cache %s; nothing downloaded", repo_id, revision,
                    commit, cached)
        return PulledRelease(repo_id, revision, commit, cached, pipeline, report, cached / CARD_FILE, released)
    logger.info("pulling %s revision %s (commit %s) from %s", repo_id, revision, commit, settings.endpoint)

    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    _sweep_stale_staging(settings.cache_dir)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=".tmp", dir=settings.cache_dir))
    try:
        with _translate_hub_errors(settings, repo_id, revision, "pulling"):
            staged = Path(snapshot_download(repo_id, revision=commit, cache_dir=staging, endpoint=settings.endpoint,
                                            token=settings.token, allow_patterns=ALLOW_PATTERNS))
        pipeline, report = load_release_folder(staged, device)
        path = _install_snapshot(staging, settings.cache_dir, repo_id, commit, revision)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("pulled %s: commit %s, unit %s, epsilon %s, in %s", repo_id, commit, report.get("unit"),
                report.get("epsilon"), path)
    return PulledRelease(repo_id, revision, commit, path, pipeline, report, path / CARD_FILE, released)
