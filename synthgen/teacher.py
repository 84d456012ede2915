"""Teachers: train one on private data, or load one the user brings, with its metadata.

A teacher is private: it is a function of the private data and is never released. It is
saved as a folder with ``config.json`` and safetensors weights (a ``Classifier``) plus
``synthgen_teacher.json`` with the metadata transcription needs. Users may instead bring
safetensors weights with a ``module:factory`` import path, a TorchScript archive, or a
``torch.export`` archive. Pickle checkpoints can run arbitrary code when loaded, so they are
rejected unless the caller states that the file is trusted.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._io import atomic_directory, atomic_write_json, check_output_folder
from .config import TeacherTrainConfig, check_teacher_train_options
from .data import ImageData

logger = logging.getLogger(__name__)

META_FILE = "synthgen_teacher.json"


class TeacherError(ValueError):
    """Raised for a teacher that cannot be loaded or does not fit the data."""


@dataclass
class TeacherMeta:
    input_shape: list[int]  # (C, H, W) of the images the teacher takes
    class_names: list[str]
    mean: list[float] = field(default_factory=lambda: [0.0])  # normalisation synthgen applies before the module
    std: list[float] = field(default_factory=lambda: [1.0])
    format: str = "synthgen"  # synthgen | safetensors | torchscript | torch.export | pickle
    dataset_fingerprint: str | None = None
    # The dataset whose ledger budget the training and its transcriptions are charged to: the
    # whole dataset when the training data was a subset of it (None in older metadata: the same
    # as dataset_fingerprint).
    ledger_fingerprint: str | None = None
    num_examples: int | None = None  # size of the private training set; private, never released
    test_accuracy: float | None = None  # on the real test split; evaluation on private data
    training: dict = field(default_factory=dict)
    dp: dict | None = None  # DP-SGD facts when the teacher itself was trained with DP

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TeacherMeta":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class TeacherBank(nn.Module):
    """K teachers queried together; counts every example sent through a forward pass.

    Returns logits of shape (K, B, classes) for pixel images (B, C, H, W) in [0, 1].
    """

    def __init__(self, modules: list[nn.Module], mean: list[float], std: list[float]):
        super().__init__()
        self.members = nn.ModuleList(modules)
        self.num_teachers = len(modules)
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.forward_examples = 0  # examples seen by any teacher forward pass, counted once per example
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.forward_examples += images.shape[0]
        normalised = (images - self._mean) / self._std
        return torch.stack([member(normalised) for member in self.members])


@dataclass
class LoadedTeacher:
    module: nn.Module
    meta: TeacherMeta
    fingerprint: str

    def bank(self) -> TeacherBank:
        return TeacherBank([self.module], self.meta.mean, self.meta.std)


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and values, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape first: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return []


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / META_FILE).is_file():
            return "synthgen"
        raise TeacherError(f"{path} is a folder without {META_FILE}; give a teacher saved by 'synthgen train-teacher'")
    if path.suffix == ".safetensors":
        return "safetensors"
    names = _zip_names(path)
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json") or n.endswith("archive_format") for n in names):
        return "torch.export"
    if any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    return "pickle"


def _import_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise TeacherError(f"teacher factory must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise TeacherError(f"cannot import teacher factory {spec!r}: {error}") from error


def load_teacher(
    path: str | os.PathLike,
    factory: str | None = None,
    meta: TeacherMeta | str | os.PathLike | None = None,
    data: ImageData | None = None,
    trust_pickle: bool = False,
) -> LoadedTeacher:
    """Load a teacher and its metadata, then check it against `data` when given.

    Args:
        path: a synthgen teacher folder, a ``.safetensors`` file (needs `factory`), a
            TorchScript archive or a ``torch.export`` archive (``.pt2``).
        factory: ``module:function`` that builds the architecture for safetensors weights.
        meta: metadata for a teacher that was not trained by synthgen (a ``TeacherMeta`` or a
            JSON file with its fields); otherwise input shape and class names come from `data`.
        data: the private data, for the shape and class checks.
        trust_pickle: load a pickle checkpoint, which can execute code from the file.
    """
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"teacher {path} not found")
    kind = detect_format(path)
    if kind == "synthgen":
        from .models import Classifier

        weights = _synthgen_weights_file(path)
        state = _read_safetensors(weights)
        try:
            module = Classifier.from_pretrained(str(path), low_cpu_mem_usage=False, use_safetensors=True)
        except OSError as error:  # diffusers reports unreadable config or weights as OSError
            raise TeacherError(f"cannot load teacher {path}: {error}") from error
        _check_weights_complete(module, state, weights, path)
        loaded_meta = TeacherMeta.from_dict(json.loads((path / META_FILE).read_text()))
    else:
        module = _load_foreign(path, kind, factory, trust_pickle)
        loaded_meta = _foreign_meta(meta, data, kind)
    module.eval()
    state = module.state_dict() if hasattr(module, "state_dict") else {}
    teacher = LoadedTeacher(module, loaded_meta, fingerprint_state(state))
    if data is not None:
        check_teacher_fits(teacher, data)
    return teacher


class _ExportedTeacher(nn.Module):
    """Wraps a torch.export graph module, which rejects eval(); its mode is fixed at export."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.graph_module = graph_module

    def train(self, mode: bool = True) -> "_ExportedTeacher":
        self.training = mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.graph_module(images)


def _synthgen_weights_file(folder: Path) -> Path:
    """Return the one safetensors weights file of a teacher folder, rejecting pickle weights."""
    from .generator_source import PICKLE_SUFFIXES

    files = list(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
    if not files and pickles:
        raise TeacherError(
            f"{folder} carries pickle weights {pickles} and no .safetensors file; synthgen loads safetensors "
            "weights only, because unpickling can run code. Convert the weights with safetensors.torch.save_file "
            "or train the teacher again with 'synthgen train-teacher'"
        )
    if len(files) != 1:
        raise TeacherError(f"{folder} must hold exactly one .safetensors file, found {len(files)}")
    return files[0]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, naming the file when it is corrupted or truncated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise TeacherError(
            f"{path} is not a valid safetensors file ({error}); it is corrupted or truncated: copy or save it again"
        ) from error


def _check_weights_complete(module: nn.Module, state: dict, weights: Path, folder: Path) -> None:
    """Fail unless the saved weights cover the model exactly (diffusers only warns on missing keys)."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise TeacherError(f"weights in {weights} do not match the architecture in {folder / 'config.json'}: {error}") from error


def _load_foreign(path: Path, kind: str, factory: str | None, trust_pickle: bool) -> nn.Module:
    if kind == "safetensors":
        if factory is None:
            raise TeacherError(f"{path} contains only weights: pass --teacher-factory package.module:function to build the model")
        state = _read_safetensors(path)
        module = _import_factory(factory)()
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise TeacherError(f"weights in {path} do not fit the model from {factory}: {error}") from error
        return module
    if kind == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    if kind == "torch.export":
        return _ExportedTeacher(torch.export.load(str(path)).module())
    if not trust_pickle:
        raise TeacherError(
            f"{path} is a pickle checkpoint, and loading it can run any code it contains. Convert it to "
            "safetensors (with --teacher-factory), TorchScript or torch.export, or pass --trust-pickle if you "
            "trust the file"
        )
    logger.warning("loading pickle checkpoint %s because --trust-pickle was given", path)
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and factory is not None:
        module = _import_factory(factory)()
        module.load_state_dict(obj, strict=True)
        return module
    raise TeacherError(f"{path} contains a {type(obj).__name__}, not a torch.nn.Module; pass --teacher-factory for a state dict")


def _foreign_meta(meta, data: ImageData | None, kind: str) -> TeacherMeta:
    if isinstance(meta, TeacherMeta):
        result = meta
    elif meta is not None:
        result = TeacherMeta.from_dict(json.loads(Path(meta).read_text()))
    elif data is not None:
        result = TeacherMeta(input_shape=list(data.shape), class_names=list(data.class_names))
    else:
        raise TeacherError("a teacher not trained by synthgen needs --teacher-meta or the private data to describe its input")
    result.format = kind
    if data is not None and result.dataset_fingerprint is None:
        result.dataset_fingerprint = data.fingerprint
        result.num_examples = len(data)
    return result


def check_teacher_fits(teacher: LoadedTeacher, data: ImageData) -> None:
    """Raise TeacherError unless the teacher takes the data's images and predicts its classes."""
    meta = teacher.meta
    if list(meta.input_shape) != list(data.shape):
        raise TeacherError(
            f"teacher expects images of shape {tuple(meta.input_shape)} but the data has {data.shape}; "
            "use the teacher trained on this dataset"
        )
    if meta.num_classes != len(data.class_names):
        raise TeacherError(
            f"teacher predicts {meta.num_classes} classes but the data has {len(data.class_names)}; "
            "use the teacher trained on this dataset"
        )
    probe = torch.from_numpy(data.images[:2]).float() / 255
    try:
        with torch.no_grad():
            logits = teacher.bank()(probe)
    except Exception as error:  # a foreign module can raise anything on a wrong shape
        raise TeacherError(f"teacher failed on images of shape {data.shape}: {error}") from error
    if logits.shape[-1] != len(data.class_names):
        raise TeacherError(f"teacher returns {logits.shape[-1]} outputs but the data has {len(data.class_names)} classes")


# ---------------------------------------------------------------- training


def evaluate_accuracy(model: nn.Module, data: ImageData, batch_size: int = 1000) -> float:
    """Return accuracy in percent of `model` (pixel images in [0, 1] -> logits) on `data`."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            images = torch.from_numpy(data.images[start : start + batch_size]).to(device).float() / 255
            labels = torch.from_numpy(data.labels[start : start + batch_size]).to(device)
            correct += int((model(images).argmax(dim=1) == labels).sum())
    return 100.0 * correct / max(len(data), 1)


def train_teacher(config: TeacherTrainConfig, train: ImageData, test: ImageData | None = None) -> LoadedTeacher:
    """Train a ``Classifier`` teacher on `train` and save it to ``config.out``."""
    from tqdm.auto import tqdm

    from .models import Classifier

    if config.augment_multiplicity != 1 or config.weight_standardization:
        raise ValueError("augment_multiplicity and weight_standardization are DP-SGD settings; add --dp, or leave "
                         f"them at 1 and off (got {config.augment_multiplicity}, {config.weight_standardization})")
    check_teacher_train_options(config)
    validate_head(config)
    check_output_folder(config.out, (META_FILE,), "teacher", config.overwrite)
    torch.manual_seed(config.seed)
    channels, height, _ = train.shape
    pixels = train.images.astype(np.float32) / 255
    mean = pixels.mean(axis=(0, 2, 3)).tolist()
    std = pixels.std(axis=(0, 2, 3)).tolist()
    model = Classifier(image_size=height, channels=channels, num_classes=len(train.class_names), width=config.width,
                       hidden=config.hidden, mean=tuple(mean), std=tuple(std), class_names=list(train.class_names),
                       frontend=config.frontend, head=config.head)
    optimizer = make_optimizer(config, model.parameters())
    total_steps = config.epochs * max(len(train) // config.batch_size, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr * 3, total_steps=total_steps)
    images = torch.from_numpy(train.images)
    labels = torch.from_numpy(train.labels)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(len(train) // config.batch_size, 1)
    logger.info("training teacher on %d private examples for %d epochs", len(train), config.epochs)
    progress = tqdm(total=config.epochs * steps_per_epoch, desc="teacher", unit="step")
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for i in range(steps_per_epoch):
            batch = order[i * config.batch_size : (i + 1) * config.batch_size]
            loss = F.cross_entropy(model(images[batch].float() / 255), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    progress.close()
    accuracy = evaluate_accuracy(model, test) if test is not None else None
    if accuracy is not None:
        logger.info("teacher accuracy on the real test split: %.2f%% (evaluation on private data)", accuracy)
    meta = TeacherMeta(
        input_shape=list(train.shape), class_names=list(train.class_names), mean=[0.0] * channels, std=[1.0] * channels,
        format="synthgen", dataset_fingerprint=train.fingerprint, ledger_fingerprint=train.ledger_fingerprint,
        num_examples=len(train), test_accuracy=accuracy,
        training={**{k: v for k, v in asdict(config).items() if k not in ("out", "overwrite")},
                  "normalization": {"mean": mean, "std": std, "applied_by": "model"}},
    )
    save_teacher(model, meta, config.out)
    return LoadedTeacher(model.eval(), meta, fingerprint_state(model.state_dict()))


def validate_head(config: TeacherTrainConfig) -> None:
    """Raise ValueError for a head the front end cannot take, before any file or ledger entry is written.

    The Classifier checks the same, but only once the model is built.
    """
    if config.head not in ("dense", "conv"):
        raise ValueError(f"head must be 'dense' or 'conv', got {config.head!r}")
    if config.head == "conv" and (config.frontend != "scatter" or config.hidden < 1):
        raise ValueError("head 'conv' is the convolutional head on scattering features: it needs --frontend scatter "
                         f"and --hidden >= 1, got frontend {config.frontend!r} and hidden {config.hidden}; use "
                         "--head dense otherwise")


def make_optimizer(config: TeacherTrainConfig, parameters) -> torch.optim.Optimizer:
    """Return the optimizer that `config` names, at its learning rate."""
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")


def save_teacher(model, meta: TeacherMeta, out: str | os.PathLike) -> Path:
    """Save a Classifier teacher and its metadata as one folder, atomically."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp))
        atomic_write_json(tmp / META_FILE, meta.to_dict())
    logger.info("teacher saved to %s", out)
    return out


def train_teacher_dp(config: TeacherTrainConfig, train: ImageData, test: ImageData | None = None) -> LoadedTeacher | None:
    """Train a teacher with DP-SGD (Opacus), resumable after an interruption; see synthgen.dp_training."""
    from .dp_training import train_teacher_dp as train_dp

    return train_dp(config, train, test)
