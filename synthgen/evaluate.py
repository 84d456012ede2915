"""Utility of a synthetic dataset: train a fixed classifier on it alone, score it on real test data.

Protocol: the classifier is trained on synthetic rows only. A validation split drawn from the
synthetic rows selects the epoch. The real test split is scored once per seed, after selection,
so it never influences training or selection. The real test accuracy is
evaluation on real data and is not covered by any privacy guarantee.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# The fixed classifier: synthgen's Classifier at these widths, input normalised by the constant
# (0.5, 0.5) rather than by statistics of any data, trained with Adam.
CLASSIFIER_WIDTH = 32
CLASSIFIER_HIDDEN = 128
CLASSIFIER = f"synthgen Classifier (width {CLASSIFIER_WIDTH}, hidden {CLASSIFIER_HIDDEN}), Adam"

# Fields that identify a result record; a new record replaces an old one with the same values.
# "targets" is stored only for soft targets, and "limit", "first_seed" and "validation_fraction"
# only when they differ from the defaults, so records written before these fields existed keep
# the key they had.
_RECORD_KEY = ("benchmark", "metric", "dataset", "unit", "mechanism", "epsilon", "method", "synthetic_dataset",
               "targets", "epochs", "limit", "seeds", "first_seed", "validation_fraction")
# Values of key fields that a record does not contain: the settings that records written without
# the field were made with. They must stay fixed even if the defaults of EvaluateConfig change.
_RECORD_KEY_DEFAULTS = {"epochs": 10, "seeds": 1, "first_seed": 0, "validation_fraction": 0.1}
# Targets the classifier can learn. "hard" is the label column, with cross-entropy. "soft" is the
# probabilities column (the student's softmax) at a temperature T, as in Hinton, Vinyals and Dean,
# "Distilling the Knowledge in a Neural Network" (2015). The targets are softmax(log p / T), and
# the classifier's logits are divided by T. The loss is multiplied by T^2, so its gradients keep
# their size across temperatures.
TARGETS = ("hard", "soft")
PROBABILITY_FLOOR = 1e-30  # float32 probabilities that underflowed to 0 get this before the logarithm
PROBABILITY_SUM_TOLERANCE = 1e-3  # float32 softmax rows sum to 1 within about 1e-6


class EvaluationError(ValueError):
    """The evaluation cannot run as requested; the message states why and what to do."""


@dataclass
class EvaluateConfig:
    """Settings of `synthgen evaluate synthetic`; each has an option of the same name."""

    dataset: str  # build folder, parquet file or folder, or Hub dataset repository id
    real_test: str  # real data with a test split: IDX, parquet or class-folder images, or a Hub id
    split: str = "train"  # split of the synthetic dataset
    real_split: str = "test"  # split of the real data to score
    revision: str | None = None  # revision of a Hub dataset
    epochs: int = 10  # passes over the synthetic training rows
    batch_size: int = 128
    lr: float = 1e-3  # Adam learning rate
    validation_fraction: float = 0.1  # synthetic rows held out for epoch selection
    targets: str = "hard"  # "hard" (label column) or "soft" (probabilities column); see TARGETS
    temperature: float = 4.0  # distillation temperature of soft targets
    seed: int = 0  # first seed; seed i of `seeds` is seed + i
    seeds: int = 1  # classifiers trained; the record gives their mean and standard deviation
    limit: int | None = None  # use only the first `limit` synthetic rows
    device: str = "auto"
    dataset_name: str | None = None  # name of the real data in the result record; default: folder name
    results: str | None = None  # JSON file of result records to add the record to; None or "" writes none
    catalog: str | None = None
    record: bool = True  # record the evaluation in the catalog


@dataclass
class EvaluationResult:
    test_accuracy: float  # mean over seeds, percent
    test_accuracy_std: float | None  # over seeds; None for one seed
    validation_accuracy: float  # mean over seeds of the selected epoch's synthetic validation accuracy
    per_seed: list[dict]
    train_rows: int
    validation_rows: int
    test_rows: int
    privacy: dict  # unit, epsilon, delta, mechanism of the generator, when known
    record: dict = field(default_factory=dict)
    results_path: Path | None = None


def describe_classifier(config: "EvaluateConfig") -> str:
    """Return the classifier and what it learns from, as recorded in result records and the catalog."""
    if config.targets == "soft":
        return f"{CLASSIFIER}, soft targets (the student's probabilities at temperature {config.temperature:g})"
    return CLASSIFIER


def targets_field(config: "EvaluateConfig") -> str | None:
    """Return the `targets` field of a result record: None for hard labels, so their records keep
    the key they had before soft targets existed."""
    return f"soft, T={config.temperature:g}" if config.targets == "soft" else None


def distillation_loss(logits, probabilities, temperature: float):
    """Return the mean cross-entropy of softmax(`logits` / T) against softmax(log `probabilities` / T), times T^2.

    Its gradient in the logits is T (softmax(logits / T) - targets) per row, divided by the
    batch size (Hinton, Vinyals and Dean, 2015).
    """
    import torch
    from torch.nn import functional as F

    targets = torch.softmax(probabilities.clamp_min(PROBABILITY_FLOOR).log() / temperature, dim=1)
    return F.cross_entropy(logits / temperature, targets) * temperature**2


# ---------------------------------------------------------------- data


def _manifest_of(folder: Path) -> dict | None:
    from .build import MANIFEST_FILE

    path = folder / MANIFEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_synthetic(source: str, split: str = "train", revision: str | None = None, probabilities: bool = False):
    """Load a synthetic dataset as (ImageData, build manifest or None, probabilities or None).

    With `probabilities`, the third item is the float32 array (N, classes) of the dataset's
    probabilities column, or None when it has none (builds of synthgen-dataset/1 and other
    datasets). Without it, the column is not read and the third item is None.
    """
    import datasets

    from .data import dataset_to_image_data
    from .generator_source import looks_like_repo_id

    path = Path(source).expanduser()
    if path.exists():
        manifest = _manifest_of(path) if path.is_dir() else None
        if path.is_file():
            files = [str(path)]
        else:
            files = sorted(str(p) for p in (path / "data").glob(f"{split}-*.parquet"))
            files = files or sorted(str(p) for p in path.glob("*.parquet"))
        if not files:
            raise EvaluationError(f"{path} contains no parquet files for split {split!r}; give a folder written by "
                                  "'synthgen build-dataset', a parquet file, or a Hub dataset id")
        if manifest is not None and not manifest.get("complete"):
            raise EvaluationError(f"the build in {path} is not complete; finish it with --resume first")
        table = datasets.Dataset.from_parquet(files)
    elif looks_like_repo_id(source):
        try:
            table = datasets.load_dataset(source, split=split, revision=revision)
        except Exception as error:  # the Hub client raises many types for offline and missing repos
            raise EvaluationError(f"could not load the Hub dataset {source!r} ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}); check the id, --revision "
                                  "and HF_ENDPOINT") from None
        manifest = _hub_manifest(source, revision)
    else:
        raise FileNotFoundError(f"synthetic dataset {source!r} not found: give a build folder, a parquet file or a "
                                "Hub dataset id NAMESPACE/NAME")
    data = dataset_to_image_data(table, source, split)
    return data, manifest, _probabilities(table, len(data.class_names)) if probabilities else None


def _probabilities(table, classes: int) -> np.ndarray | None:
    """Return the probabilities column of a datasets.Dataset as float32 (N, `classes`), or None.

    Raises EvaluationError unless every row is a list of `classes` finite values >= 0 that sum to 1.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if "probabilities" not in table.column_names:
        return None
    column = table.data.column("probabilities")  # a chunked arrow array
    problem = "each row must be a list of one probability per class"
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        raise EvaluationError(f"the probabilities column has type {column.type}; {problem}")
    if column.null_count:
        raise EvaluationError(f"the probabilities column has {column.null_count} empty (null) rows; {problem}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != classes).any():
        raise EvaluationError(f"the probabilities column has rows of {sorted(set(lengths.tolist()))} values but the "
                              f"label column has {classes} classes; {problem}")
    flat = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    values = (np.concatenate(flat) if flat else np.zeros(0)).astype(np.float32).reshape(len(table), classes)
    sums = values.sum(axis=1)
    if not np.isfinite(values).all() or (values < 0).any() or (np.abs(sums - 1) > PROBABILITY_SUM_TOLERANCE).any():
        raise EvaluationError("the probabilities column has values that are not finite, are negative, or do not sum "
                              "to 1 in a row; it must hold the student's softmax")
    return values


def _hub_manifest(repo_id: str, revision: str | None) -> dict | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    from .build import MANIFEST_FILE

    try:
        path = hf_hub_download(repo_id, MANIFEST_FILE, repo_type="dataset", revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError):
        logger.warning("%s has no %s; the result record will not carry the generator's privacy facts", repo_id,
                       MANIFEST_FILE)
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def split_validation(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, validation) row positions: a seeded permutation, the first part held out."""
    order = np.random.default_rng(seed).permutation(count)
    held_out = max(1, int(round(count * fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])


# ---------------------------------------------------------------- training


def train_and_select(train, validation, num_classes: int, config: EvaluateConfig, seed: int, device,
                     soft_targets: np.ndarray | None = None):
    """Train the fixed classifier on `train` and return it at the epoch with the best `validation` accuracy.

    With `soft_targets` (float32 probabilities (len(train), classes)) the classifier learns them at
    `config.temperature` (see TARGETS). The validation accuracy is still measured against the labels.
    """
    import torch
    from torch.nn import functional as F
    from tqdm.auto import tqdm

    from .models import Classifier
    from .teacher import evaluate_accuracy

    torch.manual_seed(seed)
    channels, height, _ = train.shape
    model = Classifier(image_size=height, channels=channels, num_classes=num_classes, width=CLASSIFIER_WIDTH,
                       hidden=CLASSIFIER_HIDDEN).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    images = torch.from_numpy(train.images)
    labels = torch.from_numpy(train.labels)
    probabilities = None if soft_targets is None else torch.from_numpy(soft_targets)
    shuffle = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(train) / config.batch_size)
    best = (-1.0, 0, None)  # (validation accuracy, epoch, state)
    with tqdm(total=config.epochs * steps, desc=f"classifier (seed {seed})", unit="step") as progress:
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=shuffle)
            for start in range(0, len(train), config.batch_size):
                batch = order[start:start + config.batch_size]
                logits = model(images[batch].to(device).float() / 255)
                if probabilities is None:
                    loss = F.cross_entropy(logits, labels[batch].to(device))
                else:
                    loss = distillation_loss(logits, probabilities[batch].to(device), config.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.update(1)
            accuracy = evaluate_accuracy(model, validation)
            logger.debug("seed %d epoch %d: synthetic validation accuracy %.2f%%", seed, epoch, accuracy)
            if accuracy > best[0]:
                best = (accuracy, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return model.eval(), best[0], best[1]


def _check_compatible(synthetic, real) -> None:
    if synthetic.shape != real.shape:
        raise EvaluationError(f"synthetic images have shape {synthetic.shape} but the real test images have "
                              f"{real.shape} (channels, height, width); evaluate on data of the generator's kind")
    if len(synthetic.class_names) != len(real.class_names):
        raise EvaluationError(f"the synthetic dataset has {len(synthetic.class_names)} classes but the real test data "
                              f"has {len(real.class_names)}")
    if list(synthetic.class_names) != list(real.class_names):
        logger.warning("class names differ (synthetic %s, real %s); labels are matched by index",
                       synthetic.class_names, real.class_names)


def _validate(config: EvaluateConfig) -> None:
    for name, minimum in (("epochs", 1), ("batch_size", 1), ("seeds", 1)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise EvaluationError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
    if config.limit is not None and (not isinstance(config.limit, int) or config.limit < 2):
        raise EvaluationError(f"--limit must be an integer >= 2, got {config.limit!r}")
    if not 0 < config.validation_fraction < 1:
        raise EvaluationError(f"--validation-fraction must be in (0, 1), got {config.validation_fraction!r}")
    if not config.lr > 0:
        raise EvaluationError(f"--lr must be > 0, got {config.lr!r}")
    if config.targets not in TARGETS:
        raise EvaluationError(f"--targets must be one of {', '.join(TARGETS)}, got {config.targets!r}")
    if config.targets == "soft" and not (isinstance(config.temperature, (int, float))
                                         and math.isfinite(config.temperature) and config.temperature > 0):
        raise EvaluationError(f"--temperature must be a finite number > 0, got {config.temperature!r}; "
                              "distillation commonly uses 4")


def evaluate_synthetic(config: EvaluateConfig) -> EvaluationResult:
    """Train the fixed classifier on the synthetic dataset only and score it on the real test split.

    Raises:
        EvaluationError, DataError (ValueErrors) and FileNotFoundError for unusable inputs.
    """
    import torch

    from .data import ImageData, load_image_data
    from .teacher import evaluate_accuracy

    _validate(config)
    if config.results:
        read_result_records(config.results)  # so that an invalid file is rejected before training
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    soft = config.targets == "soft"
    synthetic, manifest, probabilities = load_synthetic(config.dataset, config.split, config.revision,
                                                        probabilities=soft)
    if soft and probabilities is None:
        raise EvaluationError(f"{config.dataset} has no probabilities column, so it has no soft targets. Build it "
                              "again with this synthgen's 'synthgen build-dataset', or pass --targets hard")
    if config.limit is not None:
        synthetic = ImageData(synthetic.images[:config.limit], synthetic.labels[:config.limit],
                              synthetic.class_names, synthetic.source, synthetic.split)
        probabilities = None if probabilities is None else probabilities[:config.limit]
    real = load_image_data(config.real_test, config.real_split)
    _check_compatible(synthetic, real)
    if len(synthetic) < 2:
        raise EvaluationError(f"the synthetic dataset has {len(synthetic)} row(s); at least 2 are needed")

    logger.info("evaluating %s: %d synthetic rows, %d seeds x %d epochs, real test split %s (%d images)",
                config.dataset, len(synthetic), config.seeds, config.epochs, config.real_test, len(real))
    per_seed = []
    for seed in range(config.seed, config.seed + config.seeds):
        train_rows, validation_rows = split_validation(len(synthetic), config.validation_fraction, seed)
        train = ImageData(synthetic.images[train_rows], synthetic.labels[train_rows], synthetic.class_names)
        validation = ImageData(synthetic.images[validation_rows], synthetic.labels[validation_rows],
                               synthetic.class_names)
        model, validation_accuracy, epoch = train_and_select(
            train, validation, len(synthetic.class_names), config, seed, device,
            None if probabilities is None else probabilities[train_rows])
        test_accuracy = evaluate_accuracy(model, real)  # the only use of the real test split
        logger.info("seed %d: epoch %d selected (synthetic validation %.2f%%), real test accuracy %.2f%%", seed,
                    epoch, validation_accuracy, test_accuracy)
        per_seed.append({"seed": seed, "selected_epoch": epoch, "validation_accuracy": validation_accuracy,
                         "test_accuracy": test_accuracy})

    tests = np.array([entry["test_accuracy"] for entry in per_seed])
    privacy = {key: (manifest or {}).get("privacy", {}).get(key) for key in ("unit", "epsilon", "delta", "mechanism")}
    result = EvaluationResult(
        test_accuracy=float(tests.mean()),
        test_accuracy_std=float(tests.std(ddof=1)) if len(tests) > 1 else None,
        validation_accuracy=float(np.mean([entry["validation_accuracy"] for entry in per_seed])),
        per_seed=per_seed, train_rows=len(train), validation_rows=len(validation), test_rows=len(real),
        privacy=privacy,
    )
    result.record = _result_record(config, result, manifest)
    _save(config, result, manifest)
    return result


# ---------------------------------------------------------------- records


def _source_commit() -> str:
    """Return the short git commit of the synthgen checkout, or its version outside a checkout."""
    from importlib import metadata

    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"synthgen {metadata.version('synthgen')}"


def hardware() -> str:
    """Describe the machine: GPU name, or the CPU model and the cores this process may use."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU, {cores} CPU cores ({cpu})"
    return f"{cores} CPU cores ({cpu}), no GPU"


def _result_record(config: EvaluateConfig, result: EvaluationResult, manifest: dict | None) -> dict:
    settings = (manifest or {}).get("settings", {})
    return {
        "benchmark": "synthetic_utility",
        "dataset": config.dataset_name or Path(config.real_test).name.lower(),
        "unit": result.privacy["unit"],
        "mechanism": result.privacy["mechanism"],
        "epsilon": result.privacy["epsilon"],
        "delta": result.privacy["delta"],
        "metric": "synthetic_accuracy",
        "value": result.test_accuracy,
        "spread": result.test_accuracy_std,
        "seeds": config.seeds,
        "method": "synthgen",
        "commit": _source_commit(),
        "hardware": hardware(),
        "command": " ".join(shlex.quote(arg) for arg in sys.argv),
        "date": dt.date.today().isoformat(),
        "synthetic_dataset": config.dataset,
        "generator": settings.get("generator"),
        "generator_commit": settings.get("generator_commit"),
        "train_rows": result.train_rows,
        "validation_rows": result.validation_rows,
        "test_rows": result.test_rows,
        "validation_accuracy": result.validation_accuracy,
        "classifier": describe_classifier(config),
        "epochs": config.epochs,
        **({"targets": targets_field(config)} if config.targets == "soft" else {}),
        **({"limit": config.limit} if config.limit is not None else {}),
        **_unless_key_default("first_seed", config.seed),
        **_unless_key_default("validation_fraction", config.validation_fraction),
        "note": "real test split scored once per seed, after epoch selection on a synthetic validation split; "
                "evaluation on real data, not covered by the privacy guarantee",
    }


def _unless_key_default(name: str, value) -> dict:
    """Return {name: value}, or {} when `value` is the one a record without the field is keyed by."""
    return {} if value == _RECORD_KEY_DEFAULTS[name] else {name: value}


def read_result_records(path: str | os.PathLike) -> list[dict]:
    """Return the result records in the JSON file at `path`, or [] when it does not exist.

    Raises:
        EvaluationError: the file cannot be read or is not a JSON list of objects.
    """
    path = Path(path)
    fix = "give --results a new file or a JSON list of result records, or move this file away"
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationError(f"results file {path} cannot be read ({error}); {fix}") from None
    except json.JSONDecodeError as error:
        raise EvaluationError(f"results file {path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(records, list) or not all(isinstance(entry, dict) for entry in records):
        raise EvaluationError(f"results file {path} is not a JSON list of result records (objects); {fix}")
    return records


def write_result_record(path: str | os.PathLike, record: dict) -> Path:
    """Merge `record` into the JSON list at `path`, replacing a record with the same key fields."""
    from ._io import atomic_write_text

    path = Path(path)
    existing = read_result_records(path)

    def key(entry: dict) -> tuple:
        return tuple(json.dumps(entry.get(name, _RECORD_KEY_DEFAULTS.get(name))) for name in _RECORD_KEY)

    merged = [entry for entry in existing if key(entry) != key(record)] + [record]
    atomic_write_text(path, json.dumps(merged, indent=2) + "\n")
    return path


def _save(config: EvaluateConfig, result: EvaluationResult, manifest: dict | None) -> None:
    import duckdb

    from .catalog import Catalog, CatalogError

    target = Path(config.results) if config.results else None
    if target is not None:
        result.results_path = write_result_record(target, result.record)
        logger.info("result record written to %s", result.results_path)
    if not config.record:
        return
    local = Path(config.dataset).expanduser()
    dataset_id = str(local.resolve()) if local.is_dir() else None
    row = {
        "evaluation_id": uuid.uuid4().hex, "dataset": config.dataset, "dataset_id": dataset_id,
        "real_test": config.real_test, "classifier": describe_classifier(config), "seeds": config.seeds,
        "epochs": config.epochs,
        "train_rows": result.train_rows, "validation_rows": result.validation_rows, "test_rows": result.test_rows,
        "validation_accuracy": result.validation_accuracy, "test_accuracy": result.test_accuracy,
        "test_accuracy_std": result.test_accuracy_std, "unit": result.privacy["unit"],
        "epsilon": result.privacy["epsilon"], "delta": result.privacy["delta"],
    }
    try:
        with Catalog(config.catalog) as catalog:
            catalog.record_evaluation(row)
    except (CatalogError, duckdb.Error, OSError) as error:
        logger.warning("the evaluation was not recorded in the catalog: %s", error)
