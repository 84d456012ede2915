"""Build a labelled synthetic dataset from a DP generator: parquet shards, a card, a manifest.

Sampling is post-processing of the DP release (the generator and the student), so a dataset
costs no privacy and inherits the generator's guarantee.

Row i of a dataset is sample i of the generator's stream for the seed (see `synthgen.sampling`),
so the rows do not depend on the shard size or on the number of processes.

Output folder:

    README.md                          dataset card, written when every shard is complete
    synthgen_dataset.json              manifest: settings, generator, privacy facts, "complete"
    data/<split>-00000-of-000NN.parquet
    .synthgen-build/                   plan of a --per-class build while it is unfinished

A shard is written under a temporary name and renamed when complete, so a shard with its final
name is always whole. An interrupted build continues with --resume and skips complete shards.

Scale-out: under `torchrun` or `accelerate launch`, every process builds the shards whose index
modulo the number of processes equals its rank, into the same output folder. On several nodes
that folder must be on a shared filesystem. The main process writes the card and the manifest
at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np

from ._io import atomic_write_bytes, atomic_write_json, atomic_write_text, sweep_stale_temporaries
from .generator_source import accountant_name
from .sampling import (BLOCK_SIZE, PRECISIONS, SAMPLER, SamplingError, describe_augment, draw_block, parse_augment,
                       plan_per_class, prepare_pipeline)

logger = logging.getLogger(__name__)

# Version of the build's layout. 2 added the probabilities column, so shards of a format-1 build
# and of this one cannot be mixed in one dataset.
FORMAT = "synthgen-dataset/2"
MANIFEST_FILE = "synthgen_dataset.json"
CARD_FILE = "README.md"
DATA_DIR = "data"
STATE_DIR = ".synthgen-build"
PLAN_FILE = "plan.npz"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
# Names that shard_name() gives: --overwrite removes only these files from data/.
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*-[0-9]{5,}-of-[0-9]{5,}\.parquet$")


class BuildError(ValueError):
    """The dataset cannot be built as requested; the message states why and what to do."""


@dataclass
class BuildConfig:
    """Settings of one dataset build; `synthgen build-dataset` has an option of the same name for each."""

    generator: str  # run folder, release folder or Hub repository id
    revision: str | None = None  # Hub branch, tag or commit
    num_samples: int | None = None  # rows; exclusive with per_class
    per_class: int | None = None  # rows per student label; exclusive with num_samples
    seed: int = 0  # seed of the latents, in [0, 2**63)
    shard_size: int = 10_000  # rows per parquet shard
    out: str | None = None  # output folder; a temporary folder when only push_to_hub is given
    push_to_hub: str | None = None  # dataset repository NAMESPACE/NAME
    private: bool = False  # create the Hub repository as private
    split: str = "train"  # split name, used in the shard file names
    name: str | None = None  # dataset name for the card and the catalog
    license: str = "apache-2.0"  # license identifier in the card
    overwrite: bool = False  # replace the dataset files in a non-empty output folder
    resume: bool = False  # continue an interrupted build with the same settings
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    threads: int | None = None  # torch CPU threads per process
    precision: str = "float32"  # generator precision, "float32" or "bfloat16" (part of the dataset's definition)
    augment: str = "none"  # transforms before labelling: "none", or names from AUGMENTATIONS joined by "+"
    catalog: str | None = None  # catalog file; default $SYNTHGEN_CATALOG or the user data folder
    record: bool = True  # record the dataset in the catalog


@dataclass
class BuildResult:
    out: Path | None  # None when the folder was temporary (push only)
    rows: int
    shards: int
    shards_written: int  # by this process in this call; complete shards skipped are not counted
    rows_written: int
    seconds: float
    manifest: dict
    repo_id: str | None = None
    commit: str | None = None
    process_index: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- checks


def _check_int(name: str, value, minimum: int, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BuildError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def validate_config(config: BuildConfig) -> None:
    """Raise BuildError for settings that cannot work, before anything is loaded or written."""
    if (config.num_samples is None) == (config.per_class is None):
        raise BuildError("give exactly one of --num-samples N (rows) or --per-class M (rows per class), got "
                         f"num_samples={config.num_samples!r} and per_class={config.per_class!r}")
    if config.num_samples is not None:
        _check_int("num_samples", config.num_samples, 1, "--num-samples")
    else:
        _check_int("per_class", config.per_class, 1, "--per-class")
    _check_int("shard_size", config.shard_size, 1, "--shard-size")
    _check_int("seed", config.seed, 0, "--seed")
    if config.seed >= 2**63:
        raise BuildError(f"--seed must be below 2**63, got {config.seed}")
    if config.threads is not None:
        _check_int("threads", config.threads, 1, "--threads")
    if config.precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    try:
        parse_augment(config.augment)
    except SamplingError as error:
        raise BuildError(f"--{error}") from None
    if not isinstance(config.split, str) or not _SPLIT_NAME.match(config.split):
        raise BuildError(f"--split must be a plain name of letters, digits and underscores (it becomes part of the "
                         f"shard file names), got {config.split!r}")
    if not config.out and not config.push_to_hub:
        raise BuildError("give --out DIR, --push-to-hub NAMESPACE/NAME, or both")
    if config.overwrite and config.resume:
        raise BuildError("--overwrite and --resume exclude each other: --overwrite starts over, --resume continues")
    if config.resume and not config.out:
        raise BuildError("--resume continues the build in the --out folder, and without --out a build starts in a "
                         "new temporary folder; give the --out of the interrupted build, or drop --resume")
    if config.push_to_hub:
        check_dataset_repo_id(config.push_to_hub)


def check_dataset_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise BuildError(f"--push-to-hub must be a dataset repository NAMESPACE/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise BuildError(f"invalid dataset repository id {repo_id!r}: {str(error).splitlines()[0]}") from None


# ---------------------------------------------------------------- shards


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def dataset_features(class_names: list[str]):
    from datasets import ClassLabel, Features, Image, Sequence, Value

    return Features({
        "image": Image(),
        "label": ClassLabel(names=list(class_names)),
        "generator": Value("string"),
        "generator_commit": Value("string"),
        "seed": Value("int64"),
        "sample_index": Value("int64"),
        "confidence": Value("float32"),
        # The student's softmax over all classes: soft targets for distillation. Post-processing
        # of the student, like the label.
        "probabilities": Sequence(Value("float32"), length=len(class_names)),
    })


class _BlockCache:
    """Generate each block once while consecutive rows fall into it."""

    def __init__(self, pipeline, seed: int, augment: str | None = None):
        self.pipeline, self.seed, self.augment = pipeline, seed, augment
        self.block: int | None = None
        self.value = None

    def get(self, block: int):
        if block != self.block:
            self.value = draw_block(self.pipeline, self.seed, block, self.augment)
            self.block = block
        return self.value


def _shard_rows_complete(path: Path, expected: int) -> bool:
    """Return whether `path` is a readable parquet file with `expected` rows."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows == expected
    except (OSError, ValueError) as error:  # pyarrow raises ArrowInvalid (a ValueError) for a damaged file
        logger.warning("shard %s is unreadable (%s); writing it again", path, error)
        return False


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_shard(path: Path, indices: np.ndarray, cache: _BlockCache, provenance: dict, features,
                planned_labels: np.ndarray | None = None) -> None:
    """Generate the rows `indices` and write them as one parquet shard, renamed into place when complete."""
    from datasets import Dataset

    from .data import encode_png

    images, labels, confidences, probabilities = [], [], [], []
    for index in indices.tolist():
        pixels, block_labels, block_confidences, block_probabilities = cache.get(index // BLOCK_SIZE)
        offset = index % BLOCK_SIZE
        images.append({"bytes": encode_png(pixels[offset]), "path": None})
        labels.append(int(block_labels[offset]))
        confidences.append(float(block_confidences[offset]))
        probabilities.append(block_probabilities[offset].tolist())
    if planned_labels is not None and not np.array_equal(np.asarray(labels), planned_labels):
        raise BuildError(f"the student's labels for shard {path.name} differ from the per-class plan made at the start "
                         "of the build; the generator or the student is not deterministic on this device")
    columns = {
        "image": images,
        "label": labels,
        "generator": [provenance["generator"]] * len(labels),
        "generator_commit": [provenance["generator_commit"]] * len(labels),
        "seed": [provenance["seed"]] * len(labels),
        "sample_index": indices.tolist(),
        "confidence": confidences,
        "probabilities": probabilities,
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Dataset.from_dict(columns, features=features).to_parquet(str(temporary))
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_rows(data_dir: Path, pipeline, seed: int, rows: int, shard_size: int, class_names: list[str],
               provenance: dict, split: str = "train", augment: str | None = None) -> list[Path]:
    """Write rows 0 to rows-1 of the sample stream for `seed` as parquet shards into `data_dir`.

    The rows equal those of `build_dataset` with the same settings, but no card, manifest or
    privacy check is written or made. It is meant for a non-private control run in a benchmark,
    which the builder rejects. `pipeline` must come from `prepare_pipeline`, and `provenance`
    must contain "generator" and "generator_commit".
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    features = dataset_features(class_names)
    cache = _BlockCache(pipeline, seed, augment)
    shards = math.ceil(rows / shard_size)
    files = []
    for index in range(shards):
        indices = np.arange(index * shard_size, min((index + 1) * shard_size, rows), dtype=np.int64)
        path = data_dir / shard_name(split, index, shards)
        write_shard(path, indices, cache, {**provenance, "seed": seed}, features)
        files.append(path)
    return files


# ---------------------------------------------------------------- the output folder


def _settings(config: BuildConfig, source) -> dict:
    return {
        "format": FORMAT,
        **source.provenance(),
        "seed": config.seed,
        "num_samples": config.num_samples,
        "per_class": config.per_class,
        "shard_size": config.shard_size,
        "split": config.split,
        "block_size": BLOCK_SIZE,
        # Left out at the default, so that builds recorded before the option existed still resume.
        **({"precision": config.precision} if config.precision != "float32" else {}),
        **({"augment": "+".join(parse_augment(config.augment))} if parse_augment(config.augment) else {}),
    }


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BuildError(f"{path} is not a readable build manifest ({error}); remove it or pass --overwrite") from None
    return manifest if isinstance(manifest, dict) else None


def _plan_output(out: Path, config: BuildConfig, settings: dict) -> str:
    """Decide what to do with the output folder: "fresh", "resume", "overwrite" or "complete".

    Only reads the folder, so every process can call it before anything is written.
    """
    if out.exists() and not out.is_dir():
        raise BuildError(f"output path {out} is a file; give a folder with --out")
    if not out.exists() or not [entry for entry in out.iterdir() if not _is_temporary(entry)]:
        if config.resume:
            raise BuildError(f"--resume was given but {out} contains no build to continue; drop --resume to start a "
                             "new build there")
        return "fresh"
    if not (out / MANIFEST_FILE).is_file():
        # Without a manifest nothing shows which files a build wrote, so none may be removed.
        raise BuildError(f"output folder {out} is not empty and contains no {MANIFEST_FILE}, so it is not a synthgen "
                         "dataset, and a build removes only files that a build wrote. Choose an empty or new folder, "
                         "or remove the files in it yourself")
    if config.overwrite:
        return "overwrite"
    manifest = _read_manifest(out)
    if not config.resume:
        hint = ("; it contains an unfinished build with the same settings: pass --resume to continue it"
                if manifest and manifest.get("settings") == settings and not manifest.get("complete") else "")
        raise BuildError(f"output folder {out} is not empty{hint}. Pass --overwrite to replace the dataset files in "
                         "it, or choose an empty or new folder")
    if manifest is None:
        raise BuildError(f"--resume was given but {out / MANIFEST_FILE} is not a build manifest (no JSON object), so "
                         "there is no synthgen build to continue; choose an empty folder or pass --overwrite")
    previous = manifest.get("settings") or {}
    if previous.get("format") != FORMAT:
        raise BuildError(f"cannot resume the build in {out}: it was started in the layout {previous.get('format')!r}, "
                         f"and this synthgen writes {FORMAT!r}, whose shards have other columns. Finish it with the "
                         "synthgen version that started it, or pass --overwrite to build it again")
    changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
    if changed:
        details = ", ".join(f"{key}: {previous.get(key)!r} then, {settings.get(key)!r} now" for key in changed)
        raise BuildError(f"cannot resume the build in {out}: its settings differ ({details}). Rerun with the earlier "
                         "settings (a Hub branch that moved needs --revision with the earlier commit), or pass "
                         "--overwrite")
    return "complete" if manifest.get("complete") else "resume"


def _is_temporary(entry: Path) -> bool:
    """Return whether `entry` is a temporary file that a killed atomic write left behind."""
    return entry.name.startswith(".") and entry.name.endswith(".tmp")


def _clear_dataset_files(out: Path) -> None:
    """Remove the card, the build state and the shards of the build in `out`; other files stay.

    The manifest stays, marked incomplete, until the caller replaces it with the new build's. A
    process killed in between leaves a folder that --overwrite still recognises as a synthgen
    dataset, and that --resume with the old settings does not take for complete.
    """
    manifest = _readable_manifest(out)
    if manifest is not None and manifest.get("complete"):
        atomic_write_json(out / MANIFEST_FILE, {**manifest, "complete": False})
    (out / CARD_FILE).unlink(missing_ok=True)
    if (out / STATE_DIR).is_dir():
        shutil.rmtree(out / STATE_DIR)
    data_dir = out / DATA_DIR
    if data_dir.is_dir():
        for entry in data_dir.iterdir():
            if _SHARD_NAME.match(entry.name) and entry.is_file():
                entry.unlink()
        if not any(data_dir.iterdir()):
            data_dir.rmdir()


def _readable_manifest(out: Path) -> dict | None:
    """Return the manifest in `out`, or None when it is unreadable, so that --overwrite can replace it."""
    try:
        return _read_manifest(out)
    except BuildError:
        return None


def _size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")):
        if rows < limit:
            return label
    return "n>1T" if rows >= 10**12 else "1B<n<10B"


def _privacy_facts(source) -> dict:
    report = source.report
    facts = {key: report.get(key) for key in ("unit", "unit_description", "epsilon", "delta")}
    facts["accountant"] = accountant_name(report)
    facts["mechanism"] = (report.get("mechanism") or {}).get("name")
    facts["generator_card"] = source.card_url
    facts["sampling_cost"] = ("none: sampling the generator, any seeded transforms of its images and labelling with "
                              "the student are post-processing of the DP release")
    return facts


def _new_manifest(config: BuildConfig, source, settings: dict, rows: int, shards: int) -> dict:
    return {
        "format": FORMAT,
        "complete": False,
        "name": config.name or _default_name(source),
        "settings": settings,
        "rows": rows,
        "shards": shards,
        "class_names": list(source.class_names),
        "image_shape": list(source.image_shape),
        "size_category": _size_category(rows),
        "privacy": _privacy_facts(source),
        "sampler": _sampler(config),
        "software": {"synthgen": metadata.version("synthgen"), "torch": metadata.version("torch"),
                     "datasets": metadata.version("datasets")},
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _sampler(config: BuildConfig) -> str:
    parts = [SAMPLER]
    if config.precision != "float32":
        parts.append("generator in bfloat16 and channels-last except its last convolution")
    if parse_augment(config.augment):
        parts.append(describe_augment(config.augment))
    return "; ".join(parts)


def _default_name(source) -> str:
    return source.location.rstrip("/").split("/")[-1] + "-synthetic"


def _label_counts(out: Path, files: list[Path], num_classes: int) -> list[int]:
    import pyarrow.parquet as pq

    counts = np.zeros(num_classes, dtype=np.int64)
    for path in files:
        labels = pq.read_table(path, columns=["label"]).column("label").to_numpy()
        counts += np.bincount(labels, minlength=num_classes)
    return counts.tolist()


def _finalize(out: Path, manifest: dict, files: list[Path], config: BuildConfig, source, seconds: float) -> dict:
    """Write the card and mark the manifest complete; the manifest is written last."""
    from .dataset_card import render_dataset_card

    manifest = dict(manifest)
    manifest["label_counts"] = _label_counts(out, files, len(manifest["class_names"]))
    manifest["files"] = [path.relative_to(out).as_posix() for path in files]
    manifest["completed"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest["build_seconds"] = round(seconds, 2)
    manifest["complete"] = True
    card = render_dataset_card(manifest, source.report, repo_id=config.push_to_hub, license=config.license)
    atomic_write_text(out / CARD_FILE, card)
    atomic_write_json(out / MANIFEST_FILE, manifest)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------- processes


def _resolve_device(name: str):
    import torch

    if name == "auto":
        # `accelerate launch --cpu` sets ACCELERATE_USE_CPU=True for the processes it starts.
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            return torch.device("cpu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BuildError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"--device {name} was requested but torch finds no CUDA device; use --device cpu")
    return device


# Variables that carry the process rank: torchrun (and `accelerate launch --multi_gpu`, which runs
# torchrun) set RANK; mpirun (`accelerate launch --cpu --mpirun_hostfile`) sets one of the others.
_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _process_state(device):
    """Return accelerate's view of the launched processes (one process when not launched)."""
    from accelerate import PartialState

    _warn_single_cpu_launch()
    # cpu=True makes accelerate treat a torchrun launch on CPUs as multi-process (gloo);
    # without it only GPU launches are detected.
    return PartialState(cpu=device.type == "cpu")


def _warn_single_cpu_launch() -> None:
    """Warn when `accelerate launch --cpu --num_processes N` started this script as a single process.

    accelerate 1.16 starts CPU processes through its simple launcher, which runs the script once
    unless --mpirun_hostfile is given. It still sets MASTER_ADDR for N > 1, and no rank variable.
    """
    launched_on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if launched_on_cpu and "MASTER_ADDR" in os.environ and not any(name in os.environ for name in _RANK_VARIABLES):
        logger.warning("'accelerate launch --cpu' started this build as one process, which writes every shard (the "
                       "dataset is the same). For several CPU processes use 'accelerate launch --multi_gpu "
                       "--num_processes N ... --device cpu' or 'torchrun --nproc_per_node N'")


# ---------------------------------------------------------------- the build


def build_dataset(config: BuildConfig) -> BuildResult:
    """Build the dataset described by `config` in this process (and its peers, when launched).

    Returns:
        The result of this process. Only the main process writes the card, records the dataset
        in the catalog and pushes it.

    Raises:
        BuildError and other ValueErrors (invalid settings, output folder, generator or Hub
        repository), FileNotFoundError (a generator that does not exist).
    """
    import torch

    from .generator_source import load_generator

    started = time.time()
    validate_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = _resolve_device(config.device)
    state = _process_state(device)
    if state.num_processes > 1 and device.type == "cuda":
        device = state.device
    if state.num_processes > 1 and not config.out:
        raise BuildError("a build in several processes needs --out on a filesystem that every process can write; "
                         "--push-to-hub alone stages the dataset in a temporary folder of one process")
    if config.push_to_hub:
        _check_push_possible(config.push_to_hub)

    # 1. load the generator, the main process first, so that two pulls never install one snapshot at once
    with state.main_process_first():
        source = load_generator(config.generator, config.revision)
    if config.push_to_hub and source.kind != "hub":
        raise BuildError(
            f"--push-to-hub needs a generator published on the Hub, so that the dataset card can link its privacy "
            f"datasheet and no local path is published; publish {source.location} with 'synthgen push' first and "
            "build from that repository")
    pipeline = prepare_pipeline(source.pipeline, device, config.precision)
    settings = _settings(config, source)

    # 2. decide what to do with the output folder. Nothing is written before every process has checked it.
    temporary_out = None
    if config.out:
        out = Path(config.out).expanduser().resolve()
    else:
        temporary_out = Path(tempfile.mkdtemp(prefix="synthgen-dataset-"))
        out = temporary_out
    try:
        action = _plan_output(out, config, settings)
        state.wait_for_everyone()
        return _build_in(out, action, config, source, pipeline, settings, state, started, temporary_out is not None)
    finally:
        if temporary_out is not None:
            shutil.rmtree(temporary_out, ignore_errors=True)


def _build_in(out: Path, action: str, config: BuildConfig, source, pipeline, settings: dict, state, started: float,
              temporary: bool) -> BuildResult:
    class_names = list(source.class_names)
    data_dir = out / DATA_DIR
    plan_path = out / STATE_DIR / PLAN_FILE

    # 3. the main process plans the rows and lays out the folder. The manifest comes first, so
    # that a folder killed at any later point can be resumed, and a missing plan is made again.
    if state.is_main_process and action != "complete":
        planned = None
        if config.per_class is not None and not (action == "resume" and plan_path.is_file()):
            planned = plan_per_class(pipeline, config.seed, config.per_class, class_names, config.augment)
        if action == "overwrite":
            logger.info("--overwrite: removing the dataset files of %s", out)
            _clear_dataset_files(out)
        sweep_stale_temporaries(out)
        if action != "resume":
            rows = config.num_samples if config.num_samples is not None else config.per_class * len(class_names)
            atomic_write_json(out / MANIFEST_FILE, _new_manifest(config, source, settings, rows,
                                                                 math.ceil(rows / config.shard_size)))
        if planned is not None:
            atomic_write_bytes(plan_path, _npz_bytes(indices=planned[0], labels=planned[1]))
        data_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(data_dir)
    state.wait_for_everyone()

    # 4. every process writes its own shards
    manifest = _read_manifest(out)
    if config.per_class is not None and action != "complete":
        with np.load(plan_path) as plan:
            indices, planned_labels = plan["indices"], plan["labels"]
    else:
        indices = np.arange(manifest["rows"], dtype=np.int64)
        planned_labels = None
    rows, shards = manifest["rows"], manifest["shards"]
    files = [data_dir / shard_name(config.split, k, shards) for k in range(shards)]
    written_shards = written_rows = 0
    if action != "complete":
        written_shards, written_rows = _write_own_shards(files, indices, planned_labels, config, source, pipeline,
                                                         state)
    state.wait_for_everyone()
    build_seconds = time.time() - started

    result = BuildResult(None if temporary else out, rows, shards, written_shards, written_rows, build_seconds,
                         manifest, process_index=state.process_index)
    if not state.is_main_process:
        return result

    # 5. the main process checks every shard, writes the card and marks the build complete
    if action != "complete":
        incomplete = [path.name for k, path in enumerate(files)
                      if not path.is_file() or not _shard_rows_complete(path, _shard_length(k, rows, config.shard_size))]
        if incomplete:
            raise BuildError(f"shards {incomplete[:5]} of {out} are missing after every process finished; the "
                             "processes may not share one filesystem. Rerun with --resume")
        result.manifest = _finalize(out, manifest, files, config, source, build_seconds)
    logger.info("dataset %s: %d rows in %d shards (%d rows written now, %.1f images/s), generator %s at %s-level "
                "epsilon %.4g, delta %g; sampling cost no privacy", "(temporary folder)" if temporary else out, rows,
                shards, written_rows, result.images_per_second, source.location, source.report["unit"],
                source.report["epsilon"], source.report["delta"])

    # 6. publish and record
    if config.push_to_hub:
        try:
            result.repo_id, result.commit = push_dataset(out, config.push_to_hub, private=config.private,
                                                         manifest=result.manifest)
        except BuildError as error:
            retry = ("build it again" if temporary else
                     f"the dataset in {out} is complete, so the same command with --resume pushes it without "
                     "building it again")
            raise BuildError(f"{error}. To retry, {retry}") from None
    if config.record:
        _record_in_catalog(config, source, out, result, temporary)
    return result


def _shard_length(index: int, rows: int, shard_size: int) -> int:
    return min(shard_size, rows - index * shard_size)


def _npz_bytes(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _write_own_shards(files: list[Path], indices: np.ndarray, planned_labels: np.ndarray | None, config: BuildConfig,
                      source, pipeline, state) -> tuple[int, int]:
    from tqdm.auto import tqdm

    features = dataset_features(source.class_names)
    provenance = {**source.provenance(), "seed": config.seed}
    cache = _BlockCache(pipeline, config.seed, config.augment)
    mine = [k for k in range(len(files)) if k % state.num_processes == state.process_index]
    todo = []
    for k in mine:
        expected = _shard_length(k, len(indices), config.shard_size)
        if files[k].is_file() and _shard_rows_complete(files[k], expected):
            continue
        todo.append(k)
    skipped = len(mine) - len(todo)
    logger.info("process %d of %d: %d shards to write, %d complete shards skipped", state.process_index,
                state.num_processes, len(todo), skipped)
    written_rows = 0
    total = sum(_shard_length(k, len(indices), config.shard_size) for k in todo)
    with tqdm(total=total, desc=f"building (process {state.process_index})", unit="img") as progress:
        for k in todo:
            start, stop = k * config.shard_size, min((k + 1) * config.shard_size, len(indices))
            labels = planned_labels[start:stop] if planned_labels is not None else None
            write_shard(files[k], indices[start:stop], cache, provenance, features, labels)
            written_rows += stop - start
            progress.update(stop - start)
            logger.debug("wrote %s (%d rows)", files[k], stop - start)
    return len(todo), written_rows


# ---------------------------------------------------------------- Hub and catalog


def _check_push_possible(repo_id: str) -> None:
    """Fail before the build when the Hub cannot take the push (offline, unreachable, bad token)."""
    from huggingface_hub import HfApi

    from .hub import HubSettings

    settings = HubSettings.resolve()
    if settings.offline:
        raise BuildError(f"HF_HUB_OFFLINE is set, but --push-to-hub {repo_id} needs the Hub; unset HF_HUB_OFFLINE")
    settings.check_online()
    with _hub_errors(settings.endpoint, repo_id, "checking the token for"):
        HfApi(endpoint=settings.endpoint, token=settings.token).whoami()


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo_id: str, action: str) -> Iterator[None]:
    """Turn huggingface_hub and connection errors into BuildErrors that name the endpoint and the fix."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    where = f"{action} {repo_id} on {endpoint} failed"
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise BuildError(f"{where}: the Hub rejected the token (HTTP {status}); set HF_TOKEN to a token with "
                             "write access") from None
        raise BuildError(f"{where}: HTTP {status} ({str(error).splitlines()[0]})") from None
    except (httpx2.ConnectError, httpx2.TimeoutException) as error:
        raise BuildError(f"{where}: cannot connect ({error}); check HF_ENDPOINT and the network") from None


def push_dataset(out: Path, repo_id: str, private: bool = False, manifest: dict | None = None) -> tuple[str, str]:
    """Upload a complete dataset folder (card, manifest, shards) as one commit; return (repo_id, commit)."""
    from huggingface_hub import HfApi

    from .hub import HubSettings

    manifest = manifest or _read_manifest(out)
    if not manifest or not manifest.get("complete"):
        raise BuildError(f"{out} contains no complete dataset; finish the build (--resume) before pushing it")
    settings = HubSettings.resolve()
    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    privacy = manifest["privacy"]
    message = (f"Synthetic dataset: {manifest['rows']} rows from {manifest['settings']['generator']}, "
               f"{privacy['unit']}-level ({privacy['epsilon']:.4g}, {privacy['delta']:g})-DP")
    with _hub_errors(settings.endpoint, repo_id, "pushing"):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        # delete_patterns="*" deletes files of an earlier version that this one lacks, so the
        # commit contains exactly this dataset (the Hub keeps .gitattributes).
        commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(out),
                                   allow_patterns=[CARD_FILE, MANIFEST_FILE, f"{DATA_DIR}/*.parquet"],
                                   delete_patterns="*", commit_message=message)
    logger.info("pushed dataset %s as commit %s", repo_id, commit.oid)
    return repo_id, commit.oid


def _record_in_catalog(config: BuildConfig, source, out: Path, result: BuildResult, temporary: bool) -> None:
    import duckdb

    from .catalog import Catalog, CatalogError

    try:
        with Catalog(config.catalog) as catalog:
            ledger = None
            if source.kind == "run":
                ledger = catalog.record_run(source.path)["ledger"]
            elif source.kind == "hub":
                catalog.record_release(source.location, source.commit, source.report, revision=source.revision,
                                       card_url=source.card_url)
            catalog.record_dataset(result.manifest, path=None if temporary else out, repo_id=result.repo_id,
                                   commit=result.commit)
            # The run's own ledger when it names one, else the default ledger.
            catalog.sync_ledger(ledger, missing_ok=True)
    except (CatalogError, duckdb.Error, OSError) as error:
        logger.warning("the dataset is complete but was not recorded in the catalog (%s); record it later with "
                       "'synthgen catalog add-dataset %s'", error, out if not temporary else config.push_to_hub)
